"""kip: the core of a JAX toolkit for dataset distillation. It names no method: the distillers
(KIP, Label Solve, FRePo, RFAD, ...) live in `methods/`, one file each, with their nets, evaluation
protocols and teachers (`methods.nets`, `methods.protocols`, `methods.barlow`); commands in
`experiments/`. Dependencies point one way (experiments -> methods -> kip) and the modules here
import each other in no circle (tests/test_layout.py checks both).

Modules (import what you need):
  datasets  what is known of each dataset without loading it (shape, classes), `DataError`
  files     atomic writes, JSON, inter-process file locks (imports nothing of kip)
  data      tfds loading (offline from raw files), preprocessing (standardise, ZCA with or without
            a per-image layer norm), labels, seeded sampling
  method    the interface every method follows, and the real data the loop fetches for it
  loop      the one loop (sampler, evaluators, metrics.jsonl, checkpoints, resume)
  checkpoint, store  checkpoints keyed by tree path; digest-named stores of entries
  kernels   kernels with parameters: neural-tangents NTK/NNGP, neural-feature, empirical NTK
  sharding  kernel blocks and feature maps across every device of every host
  krr       ridge solve, predict, evaluate
  nets      generic Flax networks (features and intermediates on request); augment: DSA in JAX
  pool      a pool of networks trained online, whose features a kernel method regresses on
  train     finite-network training and the common evaluation protocols (kip, dc, dsa) on the
            one loop; linear probes of frozen features
  io        distilled-set files, ours and the released KIP/LS ones; readers: other projects'
            formats, without PyTorch
  pipeline  data + support init + kernels + evaluator + writer, as the commands assemble them
  cli       config groups -> flags, workdirs, one-line errors
  plots     figures of sets, curves and projections

neural-tangents on current JAX: `from kip import nt, stax` (made to import by `kip._compat`).

Importing `kip` sets glibc's malloc to keep freed memory for reuse (`kip._malloc`: XLA:CPU's
large buffers otherwise cost a page fault per 4 KB on every call; `KIP_MALLOC=system` opts out).
"""

from kip import _malloc

_malloc.keep_freed_memory()

__all__ = ["augment", "cli", "data", "datasets", "files", "io", "kernels", "krr", "loop", "method",
           "nets", "nt", "pipeline", "pool", "readers", "sharding", "stax", "train"]


def __getattr__(name: str):
  # neural-tangents imports in seconds and patches JAX names first: only when asked for.
  if name in ("nt", "stax"):
    from kip import _compat  # noqa: PLC0415

    return getattr(_compat, name)
  raise AttributeError(f"module 'kip' has no attribute {name!r}")
