"""The malloc policy of segnext_jax.cpu_memory: a process that opts in (every command does)
reuses freed step-sized buffers instead of page-faulting fresh ones; importing segnext_jax alone,
opting out or opting in after JAX started does not."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Allocate, touch and free a 256 MB buffer twice; report the page faults of the second round.
PROBE = r"""
import ctypes, json, resource, sys
{before}
import segnext_jax
from segnext_jax import cpu_memory
{opt_in}
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 256 << 20
def round_trip():
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  libc.free(p)
round_trip()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(json.dumps({{"applied": cpu_memory.applied, "faults": faults}}))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy")


def probe(before: str = "", opt_in: str = "cpu_memory.keep_freed_memory()", **env) -> dict:
  out = subprocess.run([sys.executable, "-c", PROBE.format(before=before, opt_in=opt_in)],
                       capture_output=True, text=True, env={**os.environ, **env}, check=True)
  return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


def test_opting_in_keeps_freed_memory():
  got = probe()
  assert got["applied"]
  assert got["faults"] < 1000, got  # 256 MB of 4 KiB pages would be 65536 faults


def test_importing_segnext_jax_leaves_malloc_alone():
  got = probe(opt_in="")
  assert not got["applied"]
  assert got["faults"] > 30000, got


def test_a_command_opts_in_before_its_main_runs():
  got = probe(opt_in="from segnext_jax import cli; cli.run(lambda argv: 0, [])")
  assert got["applied"] and got["faults"] < 1000, got


def test_opt_out_and_glibc_default_fault_every_round():
  got = probe(SEGNEXT_JAX_MALLOC="system")
  assert not got["applied"]
  assert got["faults"] > 30000, got


def test_an_accelerator_host_is_left_alone():
  """backend.py's table: the malloc policy is the CPU's; a GPU/TPU process keeps glibc's own."""
  for platforms in ("cuda", "tpu"):
    got = probe(JAX_PLATFORMS=platforms)
    assert not got["applied"] and got["faults"] > 30000, (platforms, got)


def test_jax_used_first_warns_and_leaves_malloc_alone():
  got = probe(before="import jax.numpy as jnp; jnp.ones(2).block_until_ready()")
  assert not got["applied"]
  assert "keep_freed_memory() before using JAX" in got["stderr"]


# Free 512 MB (kept by the policy), then compile something: RSS before and after the compile.
TRIM_PROBE = r"""
import ctypes, json
from segnext_jax import cpu_memory
cpu_memory.keep_freed_memory()
import jax, jax.numpy as jnp
cpu_memory.TRIM_MIN_COMPILE_S = 0.0  # the probe's compile is short; the train step's is 40 s
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) >> 10
keep = libc.malloc(1 << 20)  # something live above the freed block: not at the heap's top
p = libc.malloc(512 << 20)
ctypes.memset(p, 1, 512 << 20)
guard = libc.malloc(1 << 20)
ctypes.memset(guard, 1, 1 << 20)
libc.free(p)
before = rss()
jax.jit(lambda x: jnp.sin(x) * 3).lower(jnp.ones(3)).compile()
print(json.dumps({"before_mb": before, "after_mb": rss()}))
"""


def test_compiling_hands_kept_memory_back():
  out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True,
                       check=True)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["before_mb"] - got["after_mb"] > 400, got  # the freed 512 MB left the process
