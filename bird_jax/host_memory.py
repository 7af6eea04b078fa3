"""Keep freed host memory for reuse (glibc malloc), so a CPU train step stops paying page faults every step.

XLA:CPU allocates each execution's temporaries afresh (2.4 GB per step at issue 17's shapes, most of it the
LM head's float32 gradient and one loss chunk's logits) and frees them at the end. glibc serves blocks that
large with a fresh `mmap` and returns them with `munmap`, so every step touches ~600k new 4 KiB pages and the
kernel faults and zeroes each one: on a 2-core VM that was ~1.7 s of system time in a 3.7 s step, and the
source of the bimodal step times (faults get slower when the machine is busy). With mmap off, trimming off
and one arena, the blocks come from the heap and a freed block is reused by the next step: no faults after
the first steps, 3.7 s -> 2.75 s (docs/performance.md). The price is a higher resident high-water mark (the
heap keeps what it once held; ~2x the step's temporaries at those shapes), which a CPU run can afford and a
TPU/GPU host never needs: accelerators have their own allocators, so `train` applies this on the CPU backend
only. `BIRD_JAX_HEAP_REUSE=0` turns it off.

It must run before the XLA backend starts: a thread keeps the malloc arena it first allocated from, so XLA's
worker threads, once started, would still get their big blocks from fresh mmaps. Hence `cpu_backend_expected`
decides from the environment (JAX_PLATFORMS, accelerator device files) without starting a backend.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import platform

# glibc <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied: bool | None = None


def keep_freed_memory() -> tuple[bool, str]:
  """Configures glibc malloc for reuse (idempotent). Returns (applied, why not / what was set)."""
  global _applied
  if os.environ.get("BIRD_JAX_HEAP_REUSE", "1") == "0":
    return False, "BIRD_JAX_HEAP_REUSE=0"
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False, f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
  if _applied is None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt takes an int: -1 becomes SIZE_MAX for the trim threshold, i.e. never give the heap top back.
    _applied = all(libc.mallopt(p, v) == 1 for p, v in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
                                                          (_M_ARENA_MAX, 1)))
  return _applied, "malloc: no mmap, no trim, one arena" if _applied else "mallopt refused"


def current_setting() -> str:
  """What the process runs with, for logs: the reuse setting once `keep_freed_memory` applied it."""
  return "malloc: no mmap, no trim, one arena" if _applied else "stock malloc"


def cpu_backend_expected() -> bool:
  """Whether JAX will run on the CPU, judged without starting a backend: JAX_PLATFORMS when set, else the
  absence of TPU (/dev/accel*, /dev/vfio/N), NVIDIA (/dev/nvidiaN) and ROCm (/dev/kfd) device files."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd"))


def reuse_if_cpu() -> str:
  """`keep_freed_memory()` when the run is expected on the CPU; call before anything starts the backend."""
  if not cpu_backend_expected():
    return "stock malloc (an accelerator is expected)"
  applied, why = keep_freed_memory()
  return why if applied else f"stock malloc ({why})"


def proc_status_kib(field: str) -> int | None:
  """A `/proc/self/status` figure in KiB (VmRSS, VmHWM, ...); None where there is no such file or field."""
  try:
    with open("/proc/self/status") as fh:
      for line in fh:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None
