"""A view's logits back at the original image size, as mmseg's EncoderDecoder.postprocess_result
takes them there (crop the padding, undo the flip, torch bilinear), merged over views as
SegTTAModel merges them (mean of softmax).

The map from a view's logits to the original size is one banded matrix per axis (float64
weights, TAPS source rows per output row): for stride-8 logits it composes mmseg's two bilinear
resizes (logits -> the /32 input, crop, -> original), so no input-size logits are ever made.
It runs on the device in TILE x TILE output tiles (the last tile of a row or column flush with
the edge, overlapping its neighbour): the programs depend on the logits' shape only, not on the
original size, so images of any size share them.
"""
from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from segnext_jax.eval.views import Prepared, Size
from segnext_jax.model import LOGIT_STRIDE
from segnext_jax.resize import Band, bilinear_matrix

TAPS = 3  # source rows per output row of the composed resize (2 bilinear taps of 2 taps: <= 3)
TILE = 128  # output tiles are TILE x TILE: one program per logits shape, whatever the image size


@functools.lru_cache(maxsize=4096)
def axis_band(n_ori: int, n_valid: int, n_padded: int | None, n_src: int, flip: bool) -> Band:
  """One axis of view -> original as a Band over n_src source rows: torch bilinear (n_ori <-
  n_valid, flipped if `flip`) after, for stride-8 logits (`n_padded` given: the /32 input
  length), torch bilinear (stride-8 rows -> n_padded) and the crop to n_valid. At least TILE
  outputs (the rows past n_ori have weight 0)."""
  m = bilinear_matrix(n_ori, n_valid).astype(np.float64)
  if flip:  # column c of the flipped view is column n_valid - 1 - c of the unflipped one
    m = m[:, ::-1]
  if n_padded is not None:
    m = m @ bilinear_matrix(n_padded, -(-n_padded // LOGIT_STRIDE)).astype(np.float64)[:n_valid]
  if m.shape[1] > n_src:
    raise ValueError(f"{m.shape[1]} logit rows needed, the logits have {n_src}")
  full = np.zeros((max(n_ori, TILE), n_src))
  full[:n_ori, :m.shape[1]] = m
  return Band.from_matrix(full, width=min(TAPS, n_src))


def tile_starts(n: int) -> list[int]:
  """Where the TILE-long tiles covering n outputs start: every TILE, the last flush with n."""
  return [min(o, max(n - TILE, 0)) for o in range(0, n, TILE)]


class ViewMap:
  """One view's logits (item `index` of a (B, h, w, K) batch; the view's size before padding
  `size`) -> the original (H, W), tile by tile."""

  def __init__(self, src: Size, size: Size, ori: Size, flip: bool = False,
               padded: Size | None = None, index: int = 0):
    self.rows = axis_band(ori[0], size[0], padded and padded[0], src[0], False)
    self.cols = axis_band(ori[1], size[1], padded and padded[1], src[1], flip)
    self.ori, self.index = ori, np.int32(index)

  @classmethod
  def of(cls, view: Prepared, src: Size, index: int = 0, stride8: bool = True) -> ViewMap:
    """A prepared view's map from logits of shape `src`: the model's stride-8 logits of its
    padded input, or (stride8=False) logits at that input's size."""
    return cls(src, view.size, view.ori, view.flip, view.padded if stride8 else None, index)

  def tile_args(self, y: int, x: int) -> tuple:
    r, c = slice(y, y + TILE), slice(x, x + TILE)
    return (self.index, self.rows.start[r], self.rows.weights[r], self.cols.start[c],
            self.cols.weights[c])


Kind = Literal["logits", "softmax", "argmax"]


# Separate programs for the resize and what follows: fused with the band gathers, XLA:CPU
# recomputes the gathers for every reduction over the classes (docs/evaluation.md; the TTA runs
# of benchmarks/eval_throughput.py time the evaluation these run in).
@jax.jit
def _resize_tile(logits, index, rows_start, rows_w, cols_start, cols_w):
  """The (TILE, TILE, K) output tile of item `index`'s logits."""
  x = Band(rows_start, rows_w).apply(logits[index], axis=0)
  return Band(cols_start, cols_w).apply(x, axis=1)


@jax.jit
def _softmax_add(acc, x):
  return acc + jax.nn.softmax(x, axis=-1)


@jax.jit
def _argmax(x):
  """jnp.argmax over the last axis (the first maximum), as a max and a min: two plain
  reductions, where XLA:CPU runs jnp.argmax as a slower variadic (value, index) reduce."""
  top = x.max(axis=-1, keepdims=True)
  idx = jnp.arange(x.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(x == top, idx, x.shape[-1]), axis=-1)


@jax.jit
def _mean(acc, n):
  return acc / n


class Merged:
  """An image's scores at its original size, tile by tile on the device: one view's logits
  (`add(.., kind='logits')`), or the mean softmax of several (SegTTAModel's merge)."""

  def __init__(self, ori: Size):
    self.ori = ori
    self.tiles = [(y, x) for y in tile_starts(ori[0]) for x in tile_starts(ori[1])]
    self.acc: list | None = None
    self.views = 0
    self.kind: Kind | None = None

  def add(self, logits: jax.Array, view: ViewMap, kind: Kind) -> None:
    """Add one view: kind 'softmax' accumulates, 'logits'/'argmax' keep this view only."""
    if kind != "softmax" and self.views:
      raise ValueError("only softmax scores of several views are merged")
    if self.acc is None:
      k = logits.shape[-1]
      self.acc = [jnp.zeros((TILE, TILE, k), jnp.float32) if kind == "softmax" else None
                  for _ in self.tiles]
    tiles = [_resize_tile(logits, *view.tile_args(y, x)) for y, x in self.tiles]
    if kind == "softmax":
      self.acc = [_softmax_add(acc, t) for acc, t in zip(self.acc, tiles)]
    else:
      self.acc = [_argmax(t) for t in tiles] if kind == "argmax" else tiles
    self.views, self.kind = self.views + 1, kind

  def result(self, classes: bool) -> np.ndarray:
    """(H, W) int32 classes or (H, W, K) float32 scores (logits, or mean class probabilities)."""
    if self.kind == "softmax":
      n = np.float32(self.views)
      tiles = [_mean(acc, n) for acc in self.acc]
      tiles = [_argmax(t) for t in tiles] if classes else tiles
    elif classes and self.kind == "logits":
      raise ValueError("classes of a 'logits' merge: add the view with kind='argmax'")
    else:
      tiles = self.acc
    return self._assemble([np.asarray(t) for t in tiles])

  def _assemble(self, tiles: list[np.ndarray]) -> np.ndarray:
    h, w = self.ori
    out = np.empty((h, w, *tiles[0].shape[2:]), tiles[0].dtype)
    for (y, x), t in zip(self.tiles, tiles):
      out[y:y + TILE, x:x + TILE] = t[:h - y, :w - x]
    return out


def to_original(logits, size: Size, ori: Size, flip: bool = False,
                padded: Size | None = None) -> np.ndarray:
  """One view's (h, w, K) logits -> (H, W, K) at the original size, as mmseg's postprocess:
  logits at the input size by default; with `padded` (the /32 input size), the model's
  stride-8 logits of that input, resized to it first (as mmseg's head does), in one step."""
  logits = jnp.asarray(logits)[None]
  merged = Merged(ori)
  merged.add(logits, ViewMap(logits.shape[1:3], size, ori, flip, padded), "logits")
  return merged.result(classes=False)
