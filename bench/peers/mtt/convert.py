"""Expert trajectories between the official MTT format and our expert store (bench/peers/mtt).

Official (`buffer.py`): `replay_buffer_<n>.pt` holds a list of experts, each a list over epochs
0..E of the ConvNet's parameter tensors in `parameters()` order and PyTorch layouts: per block
conv weight (out, in, 3, 3), conv bias, GroupNorm weight, GroupNorm bias; then the classifier's
weight (classes, C*h*w), flattening the last block's (C, h, w) maps, and its bias.
Ours (methods/trajectory.py `ExpertStore`): one (E + 1, P) row per epoch, flattened by
`jax.flatten_util.ravel_pytree` of the flax ConvNet-3's parameters (`conv_k` kernel HWIO and
bias, `norm_k` scale and bias, `readout` kernel (h*w*C, classes) flattening (h, w, C) maps).
The networks are the same function of these numbers (same padding, instance norm, pooling); the
conversion only moves them. `check_logits` verifies that on real images: the official network's
logits (official.py `logits`) against ours with the converted parameters.

Runs under the project's Python; it reads `.pt` files with `kip.readers.read_torch` (no torch)
and hands trajectories to the PyTorch side as an `.npz` (official.py `import-buffer` writes the
`.pt` files).
"""

from __future__ import annotations

import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kip.readers import read_torch
from methods.experts import expert_model
from methods.trajectory import ExpertStore

__all__ = ["IMAGE_SHAPE", "NUM_CLASSES", "network", "official_tensors", "to_ours", "to_official",
           "buffer_files", "read_official", "official_to_store", "store_to_npz", "check_logits"]

IMAGE_SHAPE, NUM_CLASSES = (28, 28, 1), 10


def network(settings: dict):
  """Our expert network of a store's settings and a parameter template (numpy leaves)."""
  model = expert_model(settings, IMAGE_SHAPE, NUM_CLASSES)
  params = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)), train=False)["params"]
  return model, jax.tree_util.tree_map(np.asarray, params)


def _blocks(template: dict) -> int:
  return len([k for k in template if re.fullmatch(r"conv_\d+", k)])


def official_tensors(template: dict) -> list[tuple[str, str, tuple[int, ...]]]:
  """The official ConvNet's tensors in `parameters()` order as (our module, our leaf, PyTorch
  shape)."""
  out = []
  for k in range(_blocks(template)):
    h, w, cin, cout = template[f"conv_{k}"]["kernel"].shape
    out += [(f"conv_{k}", "kernel", (cout, cin, h, w)), (f"conv_{k}", "bias", (cout,)),
            (f"norm_{k}", "scale", (cout,)), (f"norm_{k}", "bias", (cout,))]
  features, classes = template["readout"]["kernel"].shape
  return out + [("readout", "kernel", (classes, features)), ("readout", "bias", (classes,))]


def _readout_maps(template: dict) -> tuple[int, int]:
  """(channels, side) of the maps the readout flattens."""
  channels = template[f"conv_{_blocks(template) - 1}"]["kernel"].shape[-1]
  side = int(round(np.sqrt(template["readout"]["kernel"].shape[0] // channels)))
  return channels, side


def to_ours(tensors: list[np.ndarray], template: dict) -> np.ndarray:
  """One official snapshot (tensors in `parameters()` order) -> our flat (P,) float32 vector."""
  layout = official_tensors(template)
  if len(tensors) != len(layout):
    raise ValueError(f"a snapshot of {len(tensors)} tensors; the network has {len(layout)}")
  channels, side = _readout_maps(template)
  params = {name: {} for name in template}
  for (module, leaf, shape), t in zip(layout, tensors, strict=True):
    t = np.asarray(t, np.float32)
    if t.shape != shape:
      raise ValueError(f"{module}.{leaf}: official shape {t.shape}, expected {shape}")
    if module.startswith("conv_") and leaf == "kernel":
      t = t.transpose(2, 3, 1, 0)  # (out, in, h, w) -> (h, w, in, out)
    elif module == "readout" and leaf == "kernel":  # features (C, h, w) -> (h, w, C)
      t = t.reshape(-1, channels, side, side).transpose(2, 3, 1, 0).reshape(-1, t.shape[0])
    params[module][leaf] = t
  return np.asarray(ravel_pytree(params)[0], np.float32)


def to_official(theta: np.ndarray, template: dict) -> list[np.ndarray]:
  """Our flat (P,) vector -> the official snapshot (tensors in `parameters()` order)."""
  _, unravel = ravel_pytree(template)
  params = jax.tree_util.tree_map(np.asarray, unravel(jnp.asarray(theta)))
  channels, side = _readout_maps(template)
  out = []
  for module, leaf, _ in official_tensors(template):
    t = params[module][leaf]
    if module.startswith("conv_") and leaf == "kernel":
      t = t.transpose(3, 2, 0, 1)
    elif module == "readout" and leaf == "kernel":
      t = t.reshape(side, side, channels, -1).transpose(3, 2, 0, 1).reshape(t.shape[-1], -1)
    out.append(np.ascontiguousarray(t, np.float32))
  return out


def buffer_files(folder: str) -> list[str]:
  """replay_buffer_<n>.pt of `folder`, by n."""
  files = glob.glob(os.path.join(folder, "replay_buffer_*.pt"))
  return sorted(files, key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[-1]))


def read_official(folder: str) -> list[list[list[np.ndarray]]]:
  """Every expert of the folder's replay buffers, in file order."""
  experts = [e for path in buffer_files(folder) for e in read_torch(path)]
  if not experts:
    raise FileNotFoundError(f"no replay_buffer_*.pt in {folder}")
  return experts


def official_to_store(folder: str, path: str, settings: dict) -> ExpertStore:
  """Our expert store at `path` holding the official experts of `folder` (converted); `settings`
  must name dataset, preprocess, width, depth and norm (what `methods.mtt` builds the network
  from) and says where the experts came from."""
  _, template = network(settings)
  experts = read_official(folder)
  epochs = len(experts[0]) - 1
  num_params = int(ravel_pytree(template)[0].size)
  store = ExpertStore.create(path, settings, num_params, epochs)
  for i, snapshots in enumerate(experts):
    if i not in store.experts():
      trajectory = np.stack([to_ours(s, template) for s in snapshots])
      store.add(i, trajectory, {"expert": i, "converted_from": os.path.abspath(folder)})
  return store


def store_to_npz(store_path: str, npz_path: str) -> int:
  """Our store's experts as an `.npz` of flat trajectories in the official parameter order
  (`trajectories`: (experts, epochs + 1, P) float32) for official.py `import-buffer`; returns
  the number of experts."""
  store = ExpertStore.open(store_path)
  _, template = network(store.settings)
  trajectories = np.stack([
      np.stack([np.concatenate([t.reshape(-1) for t in to_official(row, template)])
                for row in np.asarray(store.trajectory(i))])
      for i in store.experts()])
  np.savez(npz_path + ".tmp.npz", trajectories=trajectories)
  os.replace(npz_path + ".tmp.npz", npz_path)
  return len(trajectories)


def check_logits(logits_npz: str, theta: np.ndarray, settings: dict) -> float:
  """Largest |official - ours| logit over the images of official.py `logits`' output, relative
  to the largest |logit|, with our network at the flat parameters `theta` (our order)."""
  model, template = network(settings)
  _, unravel = ravel_pytree(template)
  with np.load(logits_npz) as f:
    images, official = f["images"], f["logits"]
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(model.apply({"params": unravel(jnp.asarray(theta))},
                                  jnp.asarray(images.transpose(0, 2, 3, 1)), train=False))
  return float(np.max(np.abs(ours - official)) / np.max(np.abs(official)))
