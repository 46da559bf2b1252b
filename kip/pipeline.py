"""The pieces every distillation job assembles: preprocessed data, the initial support set,
kernels across devices, the KRR evaluator on the full test split, the distilled-set writer, and
`distill`, which runs any method in the loop with all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from kip.data import (
  Preprocessor,
  centered_one_hot,
  class_balanced_indices,
  fit_preprocessor,
  load_dataset,
)
from kip.datasets import check_dataset
from kip.io import DistilledSet, save_distilled
from kip.kernels import Kernel, no_params
from kip.krr import evaluate
from kip.loop import Evaluator, LoopConfig, RunResult, run
from kip.method import Method, make_sampler
from kip.nets import default_depth, make_net
from kip.sharding import shard_feature_kernel, shard_kernel
from kip.train import COMMON_PROTOCOLS, Protocol, train_and_evaluate

__all__ = ["Data", "prepare_data", "data_for_set", "initial_support", "shard_kernels",
           "make_evaluator", "write_distilled", "krr_evaluator", "distill", "PREPROCESSING",
           "preprocessing_of", "held_out_split", "selecting_loop_config", "finite_evaluator"]


class Data(NamedTuple):
  """Preprocessed splits. x_*: (n, H, W, C) float32; y_train: (n, C) centred one-hot;
  labels_*: (n,) int32."""

  x_train: np.ndarray
  y_train: np.ndarray
  labels_train: np.ndarray
  x_test: np.ndarray
  labels_test: np.ndarray
  preprocessor: Preprocessor
  num_classes: int


# standard: per-channel standardisation with training statistics; layernorm_zca: then a per-image
# layer norm and ZCA (the KIP/LS releases); zca: ZCA without layer norm, reg 0.1 x the mean
# eigenvalue (FRePo/RFAD on colour data); kornia_zca: ZCA with absolute eps 0.1 and the unbiased
# covariance (MTT's sets).
PREPROCESSING = ("standard", "layernorm_zca", "zca", "kornia_zca")

def preprocessing_of(preprocessor: Preprocessor) -> str:
  """The PREPROCESSING name of a fitted preprocessor."""
  if preprocessor.zca is None:
    return "standard"
  if preprocessor.zca_layer_norm:
    return "layernorm_zca"
  return "kornia_zca" if preprocessor.zca_absolute else "zca"


def prepare_data(dataset: str, *, zca: bool = False, data_dir: str | None = None,
                 manual_dir: str | None = None, val_size: int = 0, seed: int = 0,
                 preprocessor: Preprocessor | None = None, preprocess: str | None = None,
                 stats: tuple | None = None) -> Data:
  """Loads `dataset`, fits the preprocessing on its training split (unless one is given) and
  applies it to train and test. With `val_size`, the held-out validation split is the test set.

  preprocess: one of PREPROCESSING: `standard` (per-channel standardisation), `layernorm_zca`
  (then KIP's per-image layer norm and ZCA, the KIP/LS releases; what `zca=True` means) or `zca`
  (standardisation then ZCA without layer norm, FRePo style), all with ZCA regulariser 0.1 x the
  mean eigenvalue, or `kornia_zca` (MTT's: absolute eps 0.1, unbiased covariance).
  stats: fixed per-channel (mean, std) instead of the training split's (imported sets).
  """
  if preprocess is None:
    preprocess = "layernorm_zca" if zca else "standard"
  if preprocess not in PREPROCESSING:
    raise ValueError(f"unknown preprocessing {preprocess!r}; choose one of "
                     f"{', '.join(PREPROCESSING)}")
  _, num_classes = check_dataset(dataset)
  splits = load_dataset(dataset, data_dir=data_dir or None, manual_dir=manual_dir or None,
                        val_size=val_size, seed=seed)
  train = splits["train"]
  test = splits["validation"] if val_size else splits["test"]
  preprocessor = preprocessor or fit_preprocessor(
      train.images, zca=preprocess != "standard", zca_layer_norm=preprocess == "layernorm_zca",
      stats=stats, zca_eps=0.1 if preprocess == "kornia_zca" else None)
  return Data(preprocessor.apply(train.images), centered_one_hot(train.labels, num_classes),
              train.labels, preprocessor.apply(test.images), test.labels, preprocessor,
              num_classes)


def data_for_set(distilled: DistilledSet, dataset: str, *, preprocess: str | None = None,
                 data_dir: str | None = None, manual_dir: str | None = None) -> Data:
  """The real splits in the distilled set's own preprocessed space.

  The set's stored preprocessing is used when it has one (ours); a released set's is refitted on
  the real training split as its name says (`zca`: layernorm_zca; `nozca`: standard; a file that
  says nothing is taken as standardised only); an imported set's as its family does it (its fixed
  statistics, and the ZCA its family fits, see `kip.readers`). `preprocess` (one of
  PREPROCESSING) forces another reading, refitted on the training split when it is not the stored
  one (an imported set keeps its family's statistics).
  """
  preprocessor = distilled.preprocessor
  source = distilled.source
  if preprocess is None:
    if preprocessor is not None:
      preprocess = preprocessing_of(preprocessor)
    elif source is not None:
      preprocess = source.zca or "standard"
    else:
      preprocess = "layernorm_zca" if distilled.zca else "standard"
  elif preprocessor is not None and preprocessing_of(preprocessor) != preprocess:
    preprocessor = None
  return prepare_data(dataset, preprocess=preprocess, data_dir=data_dir, manual_dir=manual_dir,
                      preprocessor=preprocessor, stats=source.stats if source else None)


def initial_support(data: Data, ipc: int, seed: int, init: str = "real"
                    ) -> tuple[np.ndarray, np.ndarray]:
  """`ipc` images per class: class-balanced real training images, or Gaussian noise with the
  training set's per-pixel scale; labels are centred one-hot. Returns (n_s, H, W, C), (n_s, C)."""
  rng = np.random.default_rng([seed, 0])
  idx = class_balanced_indices(data.labels_train, ipc, rng, data.num_classes)
  labels = data.labels_train[idx]
  if init == "real":
    x = data.x_train[idx]
  elif init == "noise":
    scale = data.x_train[:10000].std()
    x = (rng.standard_normal((len(idx),) + data.x_train.shape[1:]) * scale).astype(np.float32)
  else:
    raise ValueError(f"unknown init {init!r}; choose real or noise")
  return x, centered_one_hot(labels, data.num_classes)


def shard_kernels(kernel: Kernel, mesh=None, memory_bytes: float | None = None
                  ) -> tuple[Callable, Callable]:
  """`kernel.apply(params, x1, x2)` across `mesh` within `memory_bytes` per device, twice: for a
  differentiated loss (KIP's step) and for the forward pass only (evaluation, Label Solve).

  Analytic kernels are tiled by entries (`kip.sharding.shard_kernel`; the results carry its
  `layout`), feature kernels sharded by images (`kip.sharding.shard_feature_kernel`); an
  empirical NTK runs unsharded on one device.
  """
  if kernel.covariance == "features":
    fn = shard_feature_kernel(kernel.features, mesh)
    return fn, fn
  if kernel.kernel_fn is None:
    return kernel.apply, kernel.apply
  out = []
  for backward in (True, False):
    sharded = shard_kernel(kernel.kernel_fn, kernel.covariance, mesh, memory_bytes,
                           backward=backward)
    apply = no_params(sharded)
    apply.mesh, apply.layout = sharded.mesh, sharded.layout
    out.append(apply)
  return tuple(out)


def make_evaluator(kernel_fn: Callable, data: Data, *, reg: float, dtype=None,
                   progress: bool = False) -> Callable[..., dict[str, float]]:
  """(x_support, y_support, params) -> {"test_acc", "test_mse"} by KRR on the whole test split.

  kernel_fn: `kernel.apply(params, x1, x2)`, or one from `shard_kernels`.
  """

  def evaluator(x_support, y_support, params=()):
    with tqdm(total=len(data.x_test), unit="img", desc="KRR evaluation", leave=False,
              disable=not progress, dynamic_ncols=True) as bar:
      return evaluate(kernel_fn, x_support, y_support, data.x_test, data.labels_test, reg=reg,
                      dtype=dtype, progress=bar.update, params=params)

  return evaluator


def write_distilled(path: str, arrays: dict, data: Data, meta: dict) -> None:
  """Saves a method's exported arrays (`images`, `labels` or `targets`, extras) with the
  preprocessing and metadata (atomically)."""
  save_distilled(path, DistilledSet.from_export(
      {k: np.asarray(v) for k, v in arrays.items()}, meta, data.preprocessor))


def krr_evaluator(evaluate_support: Callable, method: Method, every: int | None = None,
                  params: Callable | None = None, *, name: str = "krr", prefix: str = "",
                  split: str = "test") -> Evaluator:
  """An evaluator: KRR on the held-out split of `make_evaluator` from the method's exported set
  (`evaluate_support` from `make_evaluator`; `params(state)` gives the kernel's parameters).

  Its metrics are `test_acc` / `test_mse`, or with `prefix` `<prefix>_<split>_acc` / `_mse` (e.g.
  `rf_validation_acc`), so a validation split is never reported as a test one."""

  def fn(state):
    arrays = method.export(state)
    result = evaluate_support(arrays["images"], arrays["labels"],
                              () if params is None else params(state))
    if not prefix:
      return result
    return {f"{prefix}_{split}_{k[len('test_'):]}": v for k, v in result.items()}

  return Evaluator(name, fn, every)


def finite_evaluator(method: Method, data: Data, *, protocol: str | Protocol = "dc",
                     steps: int = 300, seeds: tuple[int, ...] = (0,), net: str = "",
                     width: int = 0, depth: int = 0, dataset: str = "", split: str = "test",
                     every: int | None = None, name: str = "finite",
                     make_net: Callable[..., Any] = make_net) -> Evaluator:
  """An evaluator: fresh networks trained on the method's exported set under a named transfer
  protocol (a name of `kip.train.COMMON_PROTOCOLS`, or any `Protocol`, e.g. of
  `methods.protocols.PROTOCOLS`; shortened to `steps`), tested on the held-out split; reports
  `<name>_<split>_acc` (the mean over `seeds`). For methods with no kernel to evaluate with (DM,
  DataDAM, trajectory matching); a full evaluation is `experiments.transfer`'s job. `width`
  and `depth` 0: the protocol's width and `kip.nets.default_depth` of the images. A set that
  exports a learned learning rate `lr` (MTT's) trains at it, as `experiments.transfer` does.
  `make_net` builds the net by name (`methods.nets.make_net` knows the methods' nets too)."""
  chosen = COMMON_PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
  image_shape = data.x_train.shape[1:]
  model = make_net(net or chosen.net, data.num_classes, width=width or chosen.width,
                   norm=chosen.norm, image_shape=image_shape, dc_padding=chosen.dc_padding,
                   depth=depth or default_depth(image_shape))

  def fn(state):
    arrays = method.export(state)
    result = train_and_evaluate(model, chosen, np.asarray(arrays["images"]),
                                np.asarray(arrays["labels"]), data.x_test, data.labels_test,
                                seeds=seeds, steps=steps, dataset=dataset, progress=False,
                                log=lambda _: None,
                                lr=float(arrays["lr"]) if "lr" in arrays else 0.0)
    return {f"{name}_{split}_acc": float(np.mean(result.test_acc))}

  return Evaluator(name, fn, every)


def held_out_split(val_size: int) -> str:
  """The name of the split `prepare_data(val_size=...)` evaluates on."""
  return "validation" if val_size else "test"


def selecting_loop_config(config, select_metric: str) -> LoopConfig:
  """The LoopConfig of a command with `steps`, `eval_every`, `checkpoint_every`, `seed`,
  `val_size` and `patience` fields: with a validation split (`val_size`), the run keeps the best
  set by `select_metric` and stops after `patience` steps without improvement."""
  return LoopConfig(steps=config.steps, eval_every=config.eval_every,
                    checkpoint_every=config.checkpoint_every, seed=config.seed,
                    select_metric=select_metric if config.val_size else "",
                    patience=config.patience if config.val_size else 0)


def distill(method: Method, data: Data, *, workdir: str, loop_config: LoopConfig,
            x_init, y_init, evaluators=(), meta: dict, log: Callable[[str], None] = print,
            progress: bool = True) -> RunResult:
  """Runs `method` in the loop on `data`'s training split, with the sampler its `data` field
  asks for, and writes `distilled.npz` (export + preprocessing + `meta` + step) at every
  checkpoint, and `distilled_best.npz` whenever `loop_config.select_metric` improves."""
  sampler = make_sampler(method.data, data.x_train, data.labels_train, data.y_train,
                         seed=loop_config.seed, num_classes=data.num_classes)

  def save(state, step):
    write_distilled(os.path.join(workdir, "distilled.npz"), method.export(state), data,
                    meta | {"step": step})

  def save_best(state, step):
    write_distilled(os.path.join(workdir, "distilled_best.npz"), method.export(state), data,
                    meta | {"step": step, "selected_by": loop_config.select_metric})

  return run(method, workdir=workdir, config=loop_config, sampler=sampler, x_init=x_init,
             y_init=y_init, evaluators=evaluators, save=save,
             save_best=save_best if loop_config.select_metric else None, log=log,
             progress=progress)
