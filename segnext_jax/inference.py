"""Segmentation scores of one image under a test pipeline: whole or slide logits of each view,
taken back to the original size as mmseg's EncoderDecoder.postprocess_result does (crop the
padding, undo the flip, torch bilinear), and merged as SegTTAModel does (mean of softmax).

A `Predictor` binds a config to the model's apply function, jitted once: the variables are an
argument of every call, so one predictor serves every evaluation of a training run.

Whole-mode views run padded past their /32 size to a few bucket shapes (padding.py keeps the
logits inside the view exact), and their stride-8 logits go to the original size in one
resize: mmseg's two bilinear resizes (logits -> padded input, crop, -> original) composed into
one banded map per axis, so no input-size logits are ever made.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import os
import threading
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from segnext_jax import backend, padding
from segnext_jax import views as views_lib
from segnext_jax.resize import Band, bilinear_matrix, resize_bilinear
from segnext_jax.staged import StagedForward
from segnext_jax.views import Pipeline, Size, View

# (variables, NHWC images, valid (B, 2) int32 or None) -> stride-8 logits; see SegNeXt.__call__.
ApplyFn = Callable[[dict, jax.Array, jax.Array | None], jax.Array]
Output = Literal["logits", "softmax", "argmax"]
BUCKET = 128  # original sizes are padded to multiples of this on the device: few programs
TAPS = 3  # source rows per output row of the composed resize (2 bilinear taps of 2 taps: <= 3)


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
  """How an image becomes views and views become scores (see segnext_jax/views.py)."""
  pipeline: Pipeline = "mmseg1"
  tta: bool = False                    # multi-scale + flip, mean of softmax
  scale: Size = (2048, 512)            # (long, short) bound of the single-scale resize (and official TTA)
  mode: Literal["whole", "slide"] = "whole"
  crop: Size = (1024, 1024)            # slide window
  stride: Size = (768, 768)
  batch_size: int = 4                  # evaluate(): images of equal padded shape run together
  size_divisor: int = 32
  buckets_per_octave: int = 4          # whole mode: padded shapes per octave (0: each /32 shape)

  def views(self, hw: Size) -> list[View]:
    return views_lib.views(hw, self.pipeline, self.scale, self.tta, self.size_divisor)

  def __post_init__(self):
    if self.buckets_per_octave < 0:
      raise ValueError(f"buckets_per_octave must be >= 0 (0: no buckets), got {self.buckets_per_octave}")

  def padded_shape(self, hw: Size) -> Size:
    """The shape a whole-mode view of (h, w) runs at: /size_divisor, then bucketed."""
    h, w = views_lib.ceil_to(hw, self.size_divisor)
    return padding.bucket(h, self.buckets_per_octave), padding.bucket(w, self.buckets_per_octave)

  @property
  def batches_images(self) -> bool:
    """Single-view whole inference: several images can share one forward pass."""
    return self.mode == "whole" and not self.tta


def logits_at_input(apply_fn: ApplyFn) -> Callable[[dict, jax.Array], jax.Array]:
  """(variables, images) -> logits resized (torch bilinear) to the input size, as mmseg's head."""
  def fn(variables: dict, images: jax.Array) -> jax.Array:
    return resize_bilinear(apply_fn(variables, images, None), images.shape[1:3])
  return fn


def model_apply(model) -> ApplyFn:
  """Inference apply of a SegNeXt: the fixed NMF bases stored in the variables."""
  def apply(variables: dict, images: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    return model.apply(variables, images, train=False, valid=valid)
  return apply


def slide_logits(logits_fn: ApplyFn, variables: dict, x: np.ndarray, crop: Size,
                 stride: Size) -> np.ndarray:
  """mmseg slide_inference on one padded (H, W, 3) view: window logits averaged by overlap count."""
  h, w = x.shape[:2]
  total, count = None, np.zeros((h, w, 1), np.float32)
  for y1, y2, x1, x2 in _windows(h, w, crop, stride):
    out = np.asarray(logits_fn(variables, x[None, y1:y2, x1:x2])[0])
    total = np.zeros((h, w, out.shape[-1]), np.float32) if total is None else total
    total[y1:y2, x1:x2] += out
    count[y1:y2, x1:x2] += 1
  return total / count


def _windows(h: int, w: int, crop: Size, stride: Size):
  """(y1, y2, x1, x2) of mmseg's sliding windows: a grid, the last row/column flush with the edge."""
  (ch, cw), (sh, sw) = crop, stride
  for gy in range(max(h - ch + sh - 1, 0) // sh + 1):
    for gx in range(max(w - cw + sw - 1, 0) // sw + 1):
      y2, x2 = min(gy * sh + ch, h), min(gx * sw + cw, w)
      yield max(y2 - ch, 0), y2, max(x2 - cw, 0), x2


def to_original(logits: jax.Array, valid: Size, ori: Size, flip: bool = False,
                out: Output = "logits", index: int | None = None,
                padded: Size | None = None) -> jax.Array:
  """(H, W, K) view logits (or item `index` of a (B, H, W, K) batch) -> crop the padding to
  `valid`, undo a horizontal flip, resize (torch bilinear) to `ori`; then optionally softmax or
  argmax. Logits at the input size by default; with `padded` (the /32 input size), the model's
  stride-8 logits of that input, resized to it first (as mmseg's head does), all in one step.
  On the device, padded with junk to multiples of BUCKET: crop [:ori[0], :ori[1]] last."""
  batch = jnp.asarray(logits) if index is not None else jnp.asarray(logits)[None]
  n_h, n_w = batch.shape[1:3]
  rows = _axis_map(ori[0], valid[0], padded and padded[0], n_h, flip=False)
  cols = _axis_map(ori[1], valid[1], padded and padded[1], n_w, flip=flip)
  return _gather_resize(batch, np.int32(index or 0), rows.start, rows.weights, cols.start,
                        cols.weights, out=out)


@functools.lru_cache(maxsize=4096)
def _axis_map(n_ori: int, n_valid: int, n_padded: int | None, n_src: int, flip: bool) -> Band:
  """One axis of view -> original as a Band of TAPS source rows per output row, in float64:
  torch bilinear (n_ori <- n_valid) after the crop of (stride-8 rows -> n_padded) when given.
  Outputs are padded to a multiple of BUCKET (weight 0)."""
  m = bilinear_matrix(n_ori, n_valid).astype(np.float64)
  if flip:  # column c of the flipped view is column n_valid - 1 - c of the unflipped one
    m = m[:, ::-1]
  if n_padded is not None:
    n_logits = -(-n_padded // 8)
    m = m @ bilinear_matrix(n_padded, n_logits).astype(np.float64)[:n_valid]
  full = np.zeros((-(-n_ori // BUCKET) * BUCKET, n_src))
  full[:n_ori, :m.shape[1]] = m
  return Band.from_matrix(full, width=min(TAPS, n_src))


@functools.partial(jax.jit, static_argnames="out")
def _gather_resize(batch, index, start_h, w_h, start_w, w_w, *, out: Output):
  x = Band(start_h, w_h).apply(batch[index], axis=0)                               # (Ho, W, K)
  x = Band(start_w, w_w).apply(x, axis=1)                                          # (Ho, Wo, K)
  if out == "softmax":
    return jax.nn.softmax(x, axis=-1)
  return jnp.argmax(x, axis=-1).astype(jnp.int32) if out == "argmax" else x


class Predictor:
  """An InferenceConfig bound to a jitted forward (one program per input shape, reused across
  calls and evaluations). Holds no variables: every method takes them.

  Whole mode runs each group of views padded to its bucket shape (`cfg.padded_shape`), with
  their valid sizes as an argument: views of many sizes share one program. Slide mode runs its
  windows at their own shapes (one or a few per window size).

  `warm(variables, hw)` compiles the programs an image of that size will need in background
  threads (`compile_threads`), so that compiling overlaps running; evaluate() warms each image
  as it is loaded, ahead of the device."""

  def __init__(self, apply_fn: ApplyFn, cfg: InferenceConfig = InferenceConfig(),
               compile_threads: int | None = None, padded_fn: ApplyFn | None = None):
    """`padded_fn`: the whole-mode forward if not jax.jit(apply_fn), one with the same
    `.lower(...).compile()` (for_model: a StagedForward, several times faster to compile)."""
    self.cfg = cfg
    self.logits_fn = jax.jit(logits_at_input(apply_fn))  # exact shapes: slide windows, logits()
    self.padded_fn = padded_fn or jax.jit(apply_fn)      # (variables, bucketed views, valid)
    self._threads = compile_threads or max(1, (os.cpu_count() or 1) // 4)
    self._pending: dict[tuple, cf.Future] = {}
    self._lock = threading.Lock()
    self._pool: cf.ThreadPoolExecutor | None = None

  @classmethod
  def for_model(cls, model, cfg: InferenceConfig = InferenceConfig(),
                compile_threads: int | None = None) -> "Predictor":
    """The model's inference forward; whole mode staged where the backend's policy says."""
    staged = StagedForward(model) if backend.policy().staged_inference else None
    return cls(model_apply(model), cfg, compile_threads, staged)

  def logits(self, variables: dict, images: np.ndarray) -> jax.Array:
    """(B, H, W, 3) prepared views -> (B, H, W, K) logits at the input size (whole or slide),
    at the input's own shape."""
    if self.cfg.mode == "whole":
      return self._forward(variables, images)
    if self.cfg.mode == "slide":
      return jnp.asarray(np.stack([slide_logits(self._forward, variables, x, self.cfg.crop,
                                                self.cfg.stride) for x in images]))
    raise ValueError(f"unknown inference mode {self.cfg.mode!r}; expected 'whole' or 'slide'")

  def padded_logits(self, variables: dict, views: list[np.ndarray], batch: int = 0) -> jax.Array:
    """Prepared (h, w, 3) views of one bucket -> (max(B, batch), Hb/8, Wb/8, K) stride-8 logits
    of them zero-padded to the bucket (Hb, Wb); view i's are exact in [:h/8, :w/8]."""
    hb, wb = self.cfg.padded_shape(views[0].shape[:2])
    images = np.zeros((max(len(views), batch), hb, wb, 3), np.float32)
    valid = np.full((len(images), 2), padding.STRIDE, np.int32)  # filler images: any valid size
    for i, x in enumerate(views):
      if x.shape[0] % padding.STRIDE or x.shape[1] % padding.STRIDE:
        raise ValueError(f"view {i} has shape {x.shape[:2]}: padded inference needs multiples of "
                         f"{padding.STRIDE} (size_divisor {self.cfg.size_divisor})")
      if self.cfg.padded_shape(x.shape[:2]) != (hb, wb):
        raise ValueError(f"view {i} of shape {x.shape[:2]} is not in bucket {(hb, wb)}")
      images[i, :x.shape[0], :x.shape[1]] = x
      valid[i] = x.shape[:2]
    self._wait(images.shape)
    return self.padded_fn(variables, images, valid)

  def _forward(self, variables: dict, images: np.ndarray) -> jax.Array:
    self._wait(images.shape)
    return self.logits_fn(variables, np.asarray(images, np.float32))

  def _wait(self, shape: tuple[int, ...]) -> None:
    with self._lock:
      pending = self._pending.get(shape)
    if pending is not None:
      pending.result()  # compiled (or compiling) in the background: wait rather than compile twice

  def input_shapes(self, hw: Size) -> list[tuple[int, ...]]:
    """The (B, H, W, 3) inputs the forward sees for an (h, w) image (one per view group, padded
    to its bucket, in whole mode; the windows in slide mode)."""
    shapes = []
    for group in _same_shape(self.cfg.views(hw)):
      if self.cfg.mode == "whole":
        shapes.append((len(group), *self.cfg.padded_shape(group[0].shape), 3))
      else:
        h, w = views_lib.ceil_to(group[0].shape, self.cfg.size_divisor)
        shapes += [(1, y2 - y1, x2 - x1, 3) for y1, y2, x1, x2 in
                   _windows(h, w, self.cfg.crop, self.cfg.stride)]
    return list(dict.fromkeys(shapes))

  def warm(self, variables: dict, hw: Size) -> None:
    """Start compiling, in the background, the programs an (h, w) image needs (new shapes only)."""
    with self._lock:
      if self._pool is None:
        self._pool = cf.ThreadPoolExecutor(self._threads, thread_name_prefix="segnext-compile")
      for shape in self.input_shapes(hw):
        if shape not in self._pending:
          self._pending[shape] = self._pool.submit(self._compile, variables, shape)

  def _compile(self, variables: dict, shape: tuple[int, ...]) -> None:
    # jit(f).lower().compile() fills the caches that the later jit(f)(...) call reads.
    images = jax.ShapeDtypeStruct(shape, jnp.float32)
    if self.cfg.mode == "whole":
      valid = jax.ShapeDtypeStruct((shape[0], 2), jnp.int32)
      self.padded_fn.lower(variables, images, valid).compile()
    else:
      self.logits_fn.lower(variables, images).compile()

  def merged(self, variables: dict, img: np.ndarray) -> jax.Array:
    """Logits (single view) or mean softmax (TTA) at img's size, padded to BUCKET multiples."""
    ori, out = img.shape[:2], "softmax" if self.cfg.tta else "logits"
    views = self.cfg.views(ori)
    total = None
    for group in _same_shape(views):  # a scale's unflipped and flipped views run as one batch
      prepared = [views_lib.prepare(img, v, self.cfg.size_divisor) for v in group]
      if self.cfg.mode == "whole":
        logits, padded = self.padded_logits(variables, [p[0] for p in prepared]), True
      else:
        logits, padded = self.logits(variables, np.stack([p[0] for p in prepared])), False
      for i, ((x, valid), view) in enumerate(zip(prepared, group)):
        s = to_original(logits, valid, ori, view.flip, out, index=i,
                        padded=x.shape[:2] if padded else None)
        total = s if total is None else total + s
    return total / len(views)

  def scores(self, variables: dict, img: np.ndarray) -> np.ndarray:
    """(H, W, K) float32: logits (single view) or mean class probabilities (TTA)."""
    h, w = img.shape[:2]
    return np.asarray(self.merged(variables, img))[:h, :w]

  def classes(self, variables: dict, img: np.ndarray) -> np.ndarray:
    """(H, W) int32 predicted classes."""
    h, w = img.shape[:2]
    return np.asarray(jnp.argmax(self.merged(variables, img), axis=-1))[:h, :w]


def _same_shape(views: list[View]) -> list[list[View]]:
  groups: dict[Size, list[View]] = {}
  for v in views:
    groups.setdefault(v.shape, []).append(v)
  return list(groups.values())
