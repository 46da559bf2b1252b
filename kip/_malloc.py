"""Freed memory kept for reuse: fresh pages for every large buffer cost more than the work on them.

glibc's malloc serves every allocation over 32 MB (its largest mmap threshold) with a fresh
`mmap` and returns it to the kernel on `free`. XLA:CPU allocates each jitted call's large
intermediates and outputs anew, so every call of a step whose activations exceed 32 MB faults in
every page of them again (a 4 KB page at a time, zeroed by the kernel): one 3x3 convolution of 640
MNIST images to 32 channels (a 64 MB output, the DM step's real batch) takes 39.8 CPU-ms, 38 of
them in 15,700 page faults, and 7.0 ms with the memory kept (`python -m bench.cpu_paths`). Below 32 MB
the pages are reused and nothing changes.

`keep_freed_memory` (called when `kip` is imported) tells glibc to serve large blocks from its heap
(`M_MMAP_MAX` 0) and not to give freed memory back (`M_TRIM_THRESHOLD` 2 GB). The process's
peak memory is unchanged (the same buffers are live at the peak); its resident memory no longer
falls after the peak. `KIP_MALLOC=system` leaves glibc's defaults; other C libraries (no
`mallopt`) are left alone.
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
