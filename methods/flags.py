"""The flag groups shared by the commands whose values name methods' variants, and the data entry
points that take those values.

- `--preprocess`: the commands spell KIP's layer norm + ZCA (the KIP/LS releases' preprocessing)
  `kip_zca`, as they always have; the core calls it by what it does, `layernorm_zca`
  (`kip.pipeline.PREPROCESSING`). `prepare_data` and `data_for_set` here take the commands'
  spelling (what `PreprocessConfig.preprocessing()` returns, and what expert stores record) and
  hand the core its own name.
- `--kernel`: the analytic kernels and the neural-feature / empirical-NTK kernels of every net of
  `methods.nets`, the methods' own nets included (`nfk-frepo_convnet`).
"""

from __future__ import annotations

import dataclasses

from kip import cli, kernels, pipeline
from kip.io import DistilledSet
from kip.kernels import KERNEL_TYPES, Kernel
from kip.krr import DEFAULT_REG
from methods import nets

__all__ = ["PREPROCESS_FLAGS", "PreprocessConfig", "SetPreprocessConfig", "KERNELS",
           "make_kernel", "KernelConfig", "core_preprocessing", "prepare_data", "data_for_set"]

# --preprocess as the commands spell it -> the core's name for it (kip.pipeline.PREPROCESSING).
PREPROCESS_FLAGS = {"standard": "standard", "kip_zca": "layernorm_zca", "zca": "zca",
                    "kornia_zca": "kornia_zca"}
PREPROCESS_HELP = ("standard (per-channel standardisation with training statistics), kip_zca "
                   "(then KIP's per-image layer norm and ZCA, reg 0.1: the KIP/LS releases), zca "
                   "(then ZCA without layer norm, reg 0.1 x mean eigenvalue: FRePo/RFAD on colour "
                   "data) or kornia_zca (ZCA with absolute eps 0.1 and the unbiased covariance: "
                   "MTT/DATM/PAD's sets)")


def core_preprocessing(preprocess: str | None) -> str | None:
  """The core's name (kip.pipeline.PREPROCESSING) of a `--preprocess` value; None stays None
  (the set's own), and a name the core already uses passes through."""
  return PREPROCESS_FLAGS.get(preprocess, preprocess) if preprocess is not None else None


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """`--preprocess` of every job that makes a set (kip, label_solve, frepo, rfad, ...)."""

  preprocess: str = cli.field("standard", PREPROCESS_HELP, choices=tuple(PREPROCESS_FLAGS))

  def preprocessing(self) -> str:
    """The `--preprocess` value in force (the commands' spelling; `prepare_data` here takes it)."""
    return self.preprocess


@dataclasses.dataclass(frozen=True)
class SetPreprocessConfig(cli.SetReadConfig):
  """`--preprocess` of the jobs that read a set (evaluate, transfer): the real splits get the
  set's own preprocessing unless told otherwise."""

  preprocess: str = cli.field("auto", "the set's preprocessing, applied to the real splits: "
                                      "auto (as stored in the file; for a released set, as its "
                                      "name says: zca = kip_zca, nozca = standard) or "
                                      + PREPROCESS_HELP,
                              choices=("auto", *PREPROCESS_FLAGS))

  def preprocessing(self) -> str | None:
    """The forced `--preprocess` value (the commands' spelling), or None for the set's own."""
    return None if self.preprocess == "auto" else self.preprocess


def prepare_data(dataset: str, *, preprocess: str | None = None, **kwargs) -> pipeline.Data:
  """`kip.pipeline.prepare_data` with `preprocess` in the commands' spelling (`kip_zca`...)."""
  return pipeline.prepare_data(dataset, preprocess=core_preprocessing(preprocess), **kwargs)


def data_for_set(distilled: DistilledSet, dataset: str, *, preprocess: str | None = None,
                 **kwargs) -> pipeline.Data:
  """`kip.pipeline.data_for_set` with `preprocess` in the commands' spelling (`kip_zca`...)."""
  return pipeline.data_for_set(distilled, dataset, preprocess=core_preprocessing(preprocess),
                               **kwargs)


# `--kernel`: the analytic kernels and those of the core's nets and FRePo's (KRR-ST's net never
# had a kernel flag: KRR-ST regresses on its pool's features, built by its own command).
KERNELS = kernels.kernel_names(sorted((*kernels.KERNEL_NETS, "frepo_convnet")))


def make_kernel(arch: str, **kwargs) -> Kernel:
  """`kip.kernels.make_kernel` with the `nfk-`/`entk-` kernels of every net of `methods.nets`."""
  return kernels.make_kernel(arch, make_net=nets.make_net, nets=nets.NETS, **kwargs)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """The kernel flags of every kernel job (kip, label_solve, evaluate)."""

  kernel: str = cli.field("fc", "kernel: analytic infinite-width (fc, conv, convnet, convnet3), "
                                "neural-feature (nfk-<net>) or empirical NTK (entk-<net>) of a "
                                "finite net at a random initialisation", choices=KERNELS)
  depth: int = cli.field(1, "hidden layers of fc / conv kernels", minimum=1)
  kernel_type: str = cli.field("ntk", "analytic kernels: neural tangent or NNGP kernel",
                               choices=KERNEL_TYPES)
  kernel_width: int = cli.field(0, "nfk-/entk- kernels: the finite net's width (0: 128; "
                                   "resnet18 64)", minimum=0)
  reg: float = cli.field(DEFAULT_REG, "KRR ridge, relative to tr(K_ss)/n_s", minimum=0)

  def make_kernel(self, data: pipeline.Data) -> Kernel:
    return make_kernel(self.kernel, depth=self.depth, kernel_type=self.kernel_type,
                       width=self.kernel_width, image_shape=data.x_train.shape[1:],
                       num_classes=data.num_classes)
