"""Where segnext-jax keeps what it makes once per machine: released checkpoints and their
conversions (`zoo/`, zoo.py) and XLA's compiled programs (`xla/`, the commands' compile cache)."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SEGNEXT_JAX_CACHE"


def root() -> Path:
  """$SEGNEXT_JAX_CACHE, else $XDG_CACHE_HOME/segnext-jax, else ~/.cache/segnext-jax."""
  path = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "segnext-jax"
  return Path(path).expanduser()
