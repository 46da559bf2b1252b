"""Freed memory kept for reuse: fresh pages for every large buffer cost more than the work on them.

glibc's malloc serves every allocation over 32 MB (its largest mmap threshold) with a fresh
`mmap` and returns it to the kernel on `free`. XLA:CPU allocates each jitted call's large
intermediates and outputs anew, so every call of a step whose activations exceed 32 MB faults in
every page of them again (4 KB at a time, zeroed by the kernel): one 3x3 convolution of 640 MNIST
images to 32 channels (a 64 MB output, the DM step's real batch) takes 38-40 CPU-ms, most of it in
15,681 page faults, and 7-8 ms with the memory kept; DM's step 1.6x, MTT's 1.8x with the other
fix of its row (`python -m bench.cpu_paths`). Below 32 MB the pages are reused and nothing
changes.

`keep_freed_memory` (called when `kip` is imported) tells glibc to serve large blocks from its
heap (`M_MMAP_MAX` 0), from one heap for every thread (`M_ARENA_MAX` 1: a thread's own heap is at
most 64 MB, and larger blocks would be mapped afresh anyway) and not to give freed memory back
(`M_TRIM_THRESHOLD` 2 GB). The same buffers are live at the peak, so the peak is about the same
(fragmentation of the one heap aside); resident memory no longer falls after the peak.
`KIP_MALLOC=system` leaves glibc's defaults; other C libraries (no `mallopt`) are left alone.
It must run before XLA's threads first allocate (an arena a thread already has stays its own):
import `kip` before the first JAX computation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory", "KEPT"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
KEPT = False  # whether keep_freed_memory changed glibc's settings in this process


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory (see the module docstring); True when it did."""
  global KEPT
  if KEPT:
    return True
  if not sys.platform.startswith("linux") or os.environ.get("KIP_MALLOC", "") == "system":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  KEPT = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) \
      and bool(mallopt(_M_ARENA_MAX, 1))
  return KEPT
