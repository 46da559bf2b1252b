"""Every named protocol for training finite networks on a set: the field's common evaluations
(`kip.train.COMMON_PROTOCOLS`: kip, dc, dsa) and those of single methods, joined in `PROTOCOLS`,
the registry `experiments.transfer`, `experiments.benchmark`, `experiments.pretrain` and
`experiments.kd` use; and the `cpu` preset of `experiments.transfer`.

- `report`: the evaluation of the report that ran DataDAM and PAD on MNIST and MHIST (50 epochs,
  cosine annealing; its unstated settings taken from DC's).
- `frepo`: FRePo's evaluation (Zhou et al., NeurIPS 2022, official code): MSE, Adam 3e-4 with
  warm-up and cosine decay, DSA without flips, FRePo's ConvNet, steps by set size.
- `rfad`: RFAD's finite-network evaluation (Loo et al., NeurIPS 2022, official code; its best
  MNIST hyperparameters by set size: 10 images lr 1e-3, up to 100 lr 1e-2, more lr 1e-2 without
  weight decay): MSE on labels x 8 with a centred output and weight decay toward the
  initialisation, 20,000 constant-rate steps.
- `krr_st_pretrain`, `krr_st_finetune`: KRR-ST's pre-training on a distilled set and fine-tuning on
  the target data (Lee et al., ICLR 2024, official code).

A new method's protocol is one more entry here; nothing in `kip/` changes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

from kip.train import COMMON_PROTOCOLS, Protocol

__all__ = ["METHOD_PROTOCOLS", "PROTOCOLS", "CpuPreset", "CPU_PRESETS", "cpu_preset"]

METHOD_PROTOCOLS: dict[str, Protocol] = {
    "report": Protocol(
        name="report", source="the evaluation of the report that ran DataDAM and PAD on MNIST "
        "and MHIST (ANCHORS.md, seed settings: SGD, lr 0.01, cosine annealing, 50 epochs; its "
        "unstated momentum, weight decay, batch and augmentation taken from DC's: 0.9, 5e-4, "
        "256, none)",
        loss="xent", lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=256, schedule="cosine",
        width=128, norm="instance", epochs=50, partial_batches=True, dc_padding=True,
        net="convnet3"),
    "frepo": Protocol(
        name="frepo", source="FRePo's evaluation (Zhou et al., NeurIPS 2022, official code)",
        loss="mse", lr=3e-4, momentum=0.0, weight_decay=0.0, batch_size=500,
        schedule="warmup_cosine", width=128, norm="none", optimizer="adam", warmup_steps=500,
        final_lr_fraction=0.01, augment="color_crop_cutout_scale_rotate", net="frepo_convnet",
        steps_by_size=((10, 1000), (100, 2000), (500, 5000))),
    "rfad": Protocol(
        name="rfad", source="RFAD's finite-network evaluation (Loo et al., NeurIPS 2022, official "
        "code; its best MNIST hyperparameters by set size: ipc 1, 10, 50)",
        loss="mse", lr=1e-2, momentum=0.9, weight_decay=1e-3, batch_size=513, schedule="constant",
        width=1024, norm="none", steps=20_000, net="convnet3", center_output=True,
        decay_to_init=True, label_scale=8.0,
        hypers_by_size=((10, 1e-3, 1e-3), (100, 1e-2, 1e-3), (500, 1e-2, 0.0))),
    "krr_st_pretrain": Protocol(
        name="krr_st_pretrain", source="KRR-ST's pre-training on a distilled set (Lee et al., ICLR "
        "2024, official code: algorithms/pretrain_krr_st.py): MSE to the targets, no "
        "augmentation, 1000 epochs",
        loss="mse_mean", lr=0.1, momentum=0.9, weight_decay=1e-3, batch_size=256,
        schedule="constant", width=128, norm="batch", epochs=1000, net="krr_st_convnet",
        partial_batches=True),
    "krr_st_finetune": Protocol(
        name="krr_st_finetune", source="KRR-ST's fine-tuning on the target data (Lee et al., ICLR "
        "2024, official code: algorithms/finetune.py): a new head, every layer trained, random "
        "crop (and flip, not for digits)",
        loss="xent", lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=256, schedule="cosine",
        width=128, norm="batch", steps=10_000, augment="crop", augment_per_image=True,
        net="krr_st_convnet"),
}


class _Registry(Mapping):
  """Names -> protocols, in order; an unknown name is a KeyError naming the choices."""

  def __init__(self, *parts: Mapping[str, Protocol]):
    entries: dict[str, Protocol] = {}
    for part in parts:
      twice = sorted(set(entries) & set(part))
      if twice:
        raise ValueError(f"protocol {', '.join(twice)} defined twice")
      entries.update(part)
    self._entries = entries

  def __getitem__(self, name: str) -> Protocol:
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(f"unknown protocol {name!r}; choose one of "
                     f"{', '.join(self._entries)}") from None

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)


PROTOCOLS: Mapping[str, Protocol] = _Registry(COMMON_PROTOCOLS, METHOD_PROTOCOLS)


class CpuPreset(NamedTuple):
  """`experiments.transfer --preset cpu`: a protocol's network width and step count on a laptop
  CPU (None: as the paper)."""

  width: int | None = None
  steps: int | None = None


CPU_PRESETS: dict[str, CpuPreset] = {
    "kip": CpuPreset(width=64, steps=1000),
    "frepo": CpuPreset(width=32),
    "rfad": CpuPreset(width=128, steps=2000),
    "krr_st_pretrain": CpuPreset(width=32),
    "krr_st_finetune": CpuPreset(width=32, steps=500),
}


def cpu_preset(protocol: str) -> CpuPreset:
  """The `cpu` preset of `protocol` (a name of PROTOCOLS; as the paper when it has none)."""
  PROTOCOLS[protocol]  # noqa: B018  (an unknown name raises, naming the choices)
  return CPU_PRESETS.get(protocol, CpuPreset())
