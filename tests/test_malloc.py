"""Importing `kip` keeps freed memory for reuse (kip/_malloc.py): a large buffer allocated and
freed again and again is faulted in once, not on every allocation as under glibc's defaults."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 10 allocations of a 64 MB array (over glibc's 32 MB mmap threshold), each written then freed:
# the minor page faults of the last 9 (the first may grow the heap).
PROBE = """
import resource, sys
import numpy as np
import kip, kip._malloc
np.ones(16 << 20, np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
  np.ones(16 << 20, np.float32)
print(kip._malloc.KEPT, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(setting: str) -> tuple[bool, int]:
  env = dict(os.environ, KIP_MALLOC=setting)
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_importing_kip_keeps_large_freed_buffers_and_the_opt_out_does_not():
  kept, faults_kept = probe("")
  system, faults_system = probe("system")
  if not kept:
    pytest.skip("this C library has no mallopt (not glibc)")
  assert not system
  # Under glibc's defaults every allocation is a fresh mmap, faulted in again: at least one fault
  # per 2 MB (numpy asks for huge pages), 16,384 per allocation in 4 KB pages; kept, next to none.
  assert faults_system >= 9 * 32
  assert faults_kept * 20 < faults_system
