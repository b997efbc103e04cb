"""Per-backend choices in one table: which of the CPU-tuned measures apply on which JAX backend.

Every measure below was made for XLA:CPU on a 2-core machine; on GPU/TPU the default is plain
XLA until a measurement on that backend says otherwise (benchmarks/gpu.py prints the evidence).
Each choice gives the same numbers either way (tests/test_backend.py runs both on the CPU).

Overrides, in order: the table row of the backend <- `SEGNEXT_JAX_POLICY` (e.g.
`dw_impl=lax,gradient_boundary=0`) <- `with override(...)`. A policy is read when a function is
traced: build new jitted functions after changing it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
import sys
from typing import Iterator

from segnext_jax.errors import InputError

ENV = "SEGNEXT_JAX_POLICY"
DW_IMPLS = ("shift", "lax", "lax_autodiff")  # depthwise.py's implementations


@dataclasses.dataclass(frozen=True)
class Policy:
  dw_impl: str             # depthwise conv: 'shift' (slices, XLA:CPU) | 'lax' (grouped conv, our VJP)
  gradient_boundary: bool  # materialise the residual cotangent after each MSCA block (XLA:CPU fusion)
  chunked_loss: bool       # loss and its gradient in row chunks (cache-sized) | plain autodiff
  staged_inference: bool   # whole-mode inference as one program per kind of part (compile time)
  keep_freed_memory: bool  # glibc malloc keeps freed step buffers (cpu_memory.py)


_PLAIN = Policy(dw_impl="lax", gradient_boundary=False, chunked_loss=False, staged_inference=False,
                keep_freed_memory=False)
POLICIES: dict[str, Policy] = {
    "cpu": Policy(dw_impl="shift", gradient_boundary=True, chunked_loss=True, staged_inference=True,
                  keep_freed_memory=True),
    "gpu": _PLAIN,
    "tpu": _PLAIN,
}
_overrides: list[dict] = []


def _parse_env(text: str) -> dict:
  """'a=1,b=lax' -> {'a': True, 'b': 'lax'}; ValueError naming what is wrong."""
  fields = {f.name: f.type for f in dataclasses.fields(Policy)}
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name not in fields:
      raise InputError(f"{ENV}={text!r}: {item!r} is not NAME=VALUE with NAME in {sorted(fields)}")
    if fields[name] == "bool":
      if value.lower() not in ("1", "0", "true", "false"):
        raise InputError(f"{ENV}: {name}={value!r}, expected 1/0/true/false")
      out[name] = value.lower() in ("1", "true")
    elif value not in DW_IMPLS:
      raise InputError(f"{ENV}: dw_impl={value!r}, expected one of {DW_IMPLS}")
    else:
      out[name] = value
  return out


def policy(platform: str | None = None) -> Policy:
  """The policy for `platform` (default: JAX's default backend), with the overrides applied."""
  if platform is None:
    import jax
    platform = jax.default_backend()
  p = POLICIES.get(platform, _PLAIN)
  changes = _parse_env(os.environ.get(ENV, ""))
  for o in _overrides:
    changes.update(o)
  return dataclasses.replace(p, **changes) if changes else p


@contextlib.contextmanager
def override(**changes) -> Iterator[None]:
  """Within the block, `policy()` returns the table's row with `changes` (tests, benchmarks)."""
  bad = set(changes) - {f.name for f in dataclasses.fields(Policy)}
  if bad:
    raise ValueError(f"unknown policy fields {sorted(bad)}")
  _overrides.append(changes)
  try:
    yield
  finally:
    _overrides.remove(changes)


def expected_platform() -> str:
  """The platform JAX will choose, read without starting it: JAX_PLATFORMS' first entry, else
  'gpu'/'tpu' when such a PJRT plugin (or libtpu) is installed, else 'cpu'."""
  chosen = os.environ.get("JAX_PLATFORMS", "")
  if not chosen and "jax" in sys.modules:
    chosen = sys.modules["jax"].config.jax_platforms or ""
  if chosen:
    first = chosen.split(",")[0].strip().lower()
    return "gpu" if first in ("cuda", "rocm", "gpu") else first
  if importlib.util.find_spec("libtpu") is not None:
    return "tpu"
  plugins = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
  if importlib.util.find_spec("jax_plugins") is not None:
    import pkgutil
    import jax_plugins
    plugins |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
  if any("tpu" in p for p in plugins):
    return "tpu"
  return "gpu" if plugins else "cpu"
