"""Step buffers stay in the process: glibc's malloc set to reuse freed memory, not unmap it.

XLA:CPU mallocs each execution's temporaries (gigabytes for a train step at 512x512) and frees
them when it ends. glibc serves such sizes with a fresh mmap() and returns them with munmap(), so
every step page-faults its whole working set again (docs/performance.md has the counts). Here
glibc serves every size from one arena's heap and keeps what is freed, so from the second step
on, a step reuses the pages of the one before (0 faults). A process opts in with
keep_freed_memory() before JAX starts its threads (every command does, in cli.run; importing
segnext_jax does not); it applies where the JAX backend will be the CPU (backend.py's table: a
GPU/TPU host is left alone); `SEGNEXT_JAX_MALLOC=system` opts out.

What is kept also includes what XLA's compiler freed, which a step's single large temp buffer
cannot reuse; so after each XLA compilation the free pages go back to the system (malloc_trim,
after compilations of TRIM_MIN_COMPILE_S or more; benchmarks/train_step.py reports the peak RSS
this gives). Steps still reuse their own.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

ENV = "SEGNEXT_JAX_MALLOC"
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch
# Trim after compilations at least this long (a train step's), not after each of eval's
# many sub-second ones, where a trim would only make the next forward fault its pages again.
TRIM_MIN_COMPILE_S = 1.0
# glibc malloc.h parameter numbers
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
applied: bool = False  # whether this process runs with the policy


def keep_freed_memory() -> bool:
  """One heap (arena) for every thread, no mmap()ed chunks, no trimming: freed memory is reused.

  Returns whether it took effect (Linux with glibc, a CPU backend, not opted out). Arenas that
  threads already own keep serving them, so call it before the process first uses JAX."""
  global applied
  if applied or os.environ.get(ENV, "").lower() == "system" or not sys.platform.startswith("linux"):
    return applied
  from segnext_jax import backend
  try:
    if not backend.policy(backend.expected_platform()).keep_freed_memory:
      return False
  except ValueError:  # a bad SEGNEXT_JAX_POLICY: train.py says so before it writes anything
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # glibc only (musl has no mallopt parameters to set)
  except (OSError, AttributeError):
    return False
  if _jax_started():
    logging.getLogger("segnext_jax").warning(
        "JAX ran before keep_freed_memory() was called, so its threads keep glibc's default "
        "malloc and CPU steps page-fault their buffers anew each time; call "
        "segnext_jax.cpu_memory.keep_freed_memory() before using JAX")
    return False
  libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  # M_TRIM_THRESHOLD -1 is SIZE_MAX as glibc reads it: never give the heap's top back.
  applied = all(libc.mallopt(p, v) == 1 for p, v in
                ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
  if applied:
    _release_after_compiles(libc)
  return applied


def _release_after_compiles(libc) -> None:
  """After every long XLA compilation, hand the heap's free pages back (malloc_trim(0))."""
  import jax.monitoring  # registers a listener only: starts no backend

  def listener(event: str, duration_secs: float, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT and duration_secs >= TRIM_MIN_COMPILE_S:
      libc.malloc_trim(0)

  libc.malloc_trim.argtypes = [ctypes.c_size_t]
  jax.monitoring.register_event_duration_secs_listener(listener)


def _jax_started() -> bool:
  """Whether a JAX backend (and its thread pools) exists already in this process."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False
