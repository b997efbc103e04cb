"""The whole-mode forward that a Segmenter (eval/scores.py) runs views with: a fixed set of
shapes, compiled ahead.

Each call's views are zero-padded to their canvas (`InferenceConfig.canvas`: a few sizes per
octave per axis; padding.py keeps the logits inside each view exact) and its batch to a fixed
size, so the programs are one per (batch, canvas): a set bounded by the config and the range of
image sizes, not by how many images come. `warm` compiles a shape's programs in background
threads while earlier images run; with JAX's persistent compilation cache
(cli.enable_compile_cache) later processes load them instead.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from typing import Callable

import jax
import numpy as np

from segnext_jax.eval.config import InferenceConfig
from segnext_jax.eval.views import Size
from segnext_jax.model import TOTAL_STRIDE

Key = tuple[int, int, int]  # (batch, canvas height, canvas width)


class CompiledForward:
  """(variables, views (each (h, w, 3), multiples of 32), valid (n, 2)) -> (B, Hc/8, Wc/8, K)
  stride-8 logits of the views padded to their canvas (Hc, Wc) and to batch B = max(n, batch)."""

  def __init__(self, fn, cfg: InferenceConfig, threads: int | None = None,
               notify: Callable[[str], None] | None = None):
    """`fn`: (variables, images, valid) -> logits with `.lower(...).compile()` (jax.jit of an
    apply, or StagedForward); `notify(line)` is told when a shape starts compiling."""
    self.fn, self.cfg, self.notify = fn, cfg, notify
    self._threads = threads or max(1, (os.cpu_count() or 1) // 2)
    self._pending: dict[Key, cf.Future] = {}
    self._lock = threading.Lock()
    self._pool: cf.ThreadPoolExecutor | None = None

  def replica(self) -> CompiledForward:
    """The same forward with programs of its own (another device's: its variables live there)."""
    return CompiledForward(self.fn, self.cfg, self._threads, self.notify)

  def key(self, canvas: Size, n: int = 1, batch: int | None = None) -> Key:
    """The program that n views of one canvas run in (batch: at least that many)."""
    return (max(n, batch or n), *canvas)

  @property
  def programs(self) -> list[Key]:
    """The shapes compiled or compiling, in order."""
    with self._lock:
      return list(self._pending)

  def compiling(self) -> int:
    """How many shapes are compiling or queued now."""
    with self._lock:
      return sum(not f.done() for f in self._pending.values())

  def __call__(self, variables: dict, views, valid: np.ndarray, batch: int | None = None,
               canvas: Size | None = None) -> jax.Array:
    """`canvas`: the views' (Prepared.canvas); None: the config's canvas of the first view."""
    b, hc, wc = self.key(canvas or self.cfg.canvas(views[0].shape[:2]), len(views), batch)
    images = np.zeros((b, hc, wc, 3), np.float32)
    full = np.full((b, 2), TOTAL_STRIDE, np.int32)  # filler images: any valid size
    for i, x in enumerate(views):
      if x.shape[0] % TOTAL_STRIDE or x.shape[1] % TOTAL_STRIDE:
        raise ValueError(f"view {i} has shape {x.shape[:2]}: padded inference needs multiples of "
                         f"{TOTAL_STRIDE} (size_divisor {self.cfg.size_divisor})")
      if x.shape[0] > hc or x.shape[1] > wc:
        raise ValueError(f"view {i} of shape {x.shape[:2]} does not fit canvas {(hc, wc)}")
      images[i, :x.shape[0], :x.shape[1]] = x
      full[i] = valid[i]
    self.warm(variables, (b, hc, wc)).result()  # compiled (or compiling) ahead: wait, never twice
    return self.fn(variables, images, full)

  def warm(self, variables: dict, key: Key) -> cf.Future:
    """Start compiling the program of `key` in the background (if not compiled or compiling)."""
    with self._lock:
      if key not in self._pending:
        if self._pool is None:
          self._pool = cf.ThreadPoolExecutor(self._threads, thread_name_prefix="segnext-compile")
        self._pending[key] = self._pool.submit(self._compile, variables, key)
      return self._pending[key]

  def _compile(self, variables: dict, key: Key) -> None:
    b, h, w = key
    if self.notify is not None:
      self.notify(f"compiling the forward for {h}x{w} views, batch {b}")
    # Lowered for abstract inputs and compiled, nothing run: later calls with these variables
    # find the programs (StagedForward lowers its parts where committed variables put them).
    images = jax.ShapeDtypeStruct((b, h, w, 3), np.float32)
    self.fn.lower(variables, images, jax.ShapeDtypeStruct((b, 2), np.int32)).compile()
