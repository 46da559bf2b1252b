"""kip: dataset distillation with kernels (KIP, Label Solve) in JAX.

Modules (import what you need; `kip.kernels` and `kip.kip` pull in neural-tangents through
`kip._compat`):
  data      tfds loading, preprocessing (standardise / layer norm + ZCA), labels, sampling
  kernels   named architectures -> NTK/NNGP `Kernel`s, blocked kernel evaluation
  krr       ridge solve, predict, evaluate, Label Solve
  kip       the KIP method: make_kip(kernel_fn) -> Method(init, update, support)
  loop      the one distillation loop (metrics, checkpoints, resume)
  io        distilled-set files, ours and the released KIP/LS ones
  pipeline  data + support init + evaluator + writer, as the commands assemble them
  cli       flags from config dataclasses, workdirs, one-line errors
"""

__all__ = ["cli", "data", "io", "kernels", "kip", "krr", "loop", "pipeline"]
