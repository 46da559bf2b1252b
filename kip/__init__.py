"""kip: the core of a JAX toolkit for dataset distillation. It names no method: the distillers
(KIP, Label Solve, FRePo, RFAD, ...) live in `methods/`, one file each.

Modules (import what you need):
  data      tfds loading (offline from raw files), preprocessing (standardise, ZCA with or without
            KIP's layer norm), labels, seeded sampling
  method    the protocol every method follows, and the real data the loop fetches for it
  loop      the one loop (sampler, evaluators, metrics.jsonl, checkpoints, resume)
  kernels   kernels with parameters: neural-tangents NTK/NNGP, neural-feature, empirical NTK
  sharding  kernel blocks and feature maps across every device of every host
  krr       ridge solve, predict, evaluate
  nets      Flax networks (features and intermediates on request); augment: DSA in JAX
  train     finite-network protocols (kip, dc, frepo) on the one loop
  io        distilled-set files, ours and the released KIP/LS ones
  pipeline  data + support init + kernels + evaluator + writer, as the commands assemble them
  cli       config groups -> flags, workdirs, one-line errors

neural-tangents on current JAX: `from kip import nt, stax` (made to import by `kip._compat`).
"""

__all__ = ["augment", "cli", "data", "io", "kernels", "krr", "loop", "method", "nets", "nt",
           "pipeline", "sharding", "stax", "train"]


def __getattr__(name: str):
  # neural-tangents imports in seconds and patches JAX names first: only when asked for.
  if name in ("nt", "stax"):
    from kip import _compat  # noqa: PLC0415

    return getattr(_compat, name)
  raise AttributeError(f"module 'kip' has no attribute {name!r}")
