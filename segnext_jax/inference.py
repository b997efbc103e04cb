"""Segmentation scores of one image under a test pipeline: whole or slide logits of each view,
taken back to the original size as mmseg's EncoderDecoder.postprocess_result does (crop the
padding, undo the flip, torch bilinear), and merged as SegTTAModel does (mean of softmax).

A `Predictor` binds a config to the model's apply function, jitted once: the variables are an
argument of every call, so one predictor serves every evaluation of a training run.
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

from segnext_jax import views as views_lib
from segnext_jax.resize import bilinear_taps, resize_bilinear
from segnext_jax.views import Pipeline, Size, View

ApplyFn = Callable[[dict, jax.Array], jax.Array]  # (variables, NHWC images) -> stride-8 logits
Output = Literal["logits", "softmax", "argmax"]
BUCKET = 128  # original sizes are padded to multiples of this on the device: few programs


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

  def views(self, hw: Size) -> list[View]:
    return views_lib.views(hw, self.pipeline, self.scale, self.tta, self.size_divisor)

  @property
  def batches_images(self) -> bool:
    """Single-view whole inference: several images can share one forward pass."""
    return self.mode == "whole" and not self.tta


def logits_at_input(apply_fn: ApplyFn) -> ApplyFn:
  """(variables, images) -> logits resized (torch bilinear) to the input size, as mmseg's head."""
  def fn(variables: dict, images: jax.Array) -> jax.Array:
    return resize_bilinear(apply_fn(variables, images), images.shape[1:3])
  return fn


def model_apply(model) -> ApplyFn:
  """Inference apply of a SegNeXt: the fixed NMF bases stored in the variables."""
  return functools.partial(model.apply, train=False)


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
                out: Output = "logits", index: int | None = None) -> jax.Array:
  """(H, W, K) view logits (or item `index` of a (B, H, W, K) batch) -> crop the padding to
  `valid`, undo a horizontal flip, resize (torch bilinear) to `ori`; then optionally softmax or
  argmax. On the device, padded with junk to multiples of BUCKET: crop [:ori[0], :ori[1]] last."""
  rows = _taps(ori[0], valid[0], flip=False)
  cols = _taps(ori[1], valid[1], flip=flip)
  batch = jnp.asarray(logits) if index is not None else jnp.asarray(logits)[None]
  return _gather_resize(batch, np.int32(index or 0), *rows, *cols, out=out)


def _taps(n_out: int, n_in: int, flip: bool):
  """torch's source indices and weights along one axis, padded to a multiple of BUCKET."""
  i0, i1, lam = bilinear_taps(n_out, n_in)
  if flip:  # column c of the flipped view is column n_in - 1 - c of the unflipped one
    i0, i1 = n_in - 1 - i0, n_in - 1 - i1
  pad = lambda a: np.pad(a, (0, -(-n_out // BUCKET) * BUCKET - n_out))
  return pad(i0), pad(i1), pad(lam)


@functools.partial(jax.jit, static_argnames="out")
def _gather_resize(batch, index, i0h, i1h, lh, i0w, i1w, lw, *, out: Output):
  x = batch[index]                                                                 # (H, W, K)
  x = x[i0h] * (1 - lh)[:, None, None] + x[i1h] * lh[:, None, None]                # (Ho, W, K)
  x = x[:, i0w] * (1 - lw)[None, :, None] + x[:, i1w] * lw[None, :, None]          # (Ho, Wo, K)
  if out == "softmax":
    return jax.nn.softmax(x, axis=-1)
  return jnp.argmax(x, axis=-1).astype(jnp.int32) if out == "argmax" else x


class Predictor:
  """An InferenceConfig bound to a jitted forward (one program per input shape, reused across
  calls and evaluations). Holds no variables: every method takes them.

  `warm(variables, hw)` compiles the programs an image of that size will need in background
  threads (`compile_threads`), so that compiling overlaps running; evaluate() warms each image
  as it is loaded, ahead of the device."""

  def __init__(self, apply_fn: ApplyFn, cfg: InferenceConfig = InferenceConfig(),
               compile_threads: int | None = None):
    self.cfg = cfg
    self.logits_fn = jax.jit(logits_at_input(apply_fn))
    self._threads = compile_threads or max(1, (os.cpu_count() or 1) // 4)
    self._pending: dict[tuple, cf.Future] = {}
    self._lock = threading.Lock()
    self._pool: cf.ThreadPoolExecutor | None = None

  @classmethod
  def for_model(cls, model, cfg: InferenceConfig = InferenceConfig(),
                compile_threads: int | None = None) -> "Predictor":
    return cls(model_apply(model), cfg, compile_threads)

  def logits(self, variables: dict, images: np.ndarray) -> jax.Array:
    """(B, H, W, 3) prepared views -> (B, H, W, K) logits at the input size (whole or slide)."""
    if self.cfg.mode == "whole":
      return self._forward(variables, images)
    if self.cfg.mode == "slide":
      return jnp.asarray(np.stack([slide_logits(self._forward, variables, x, self.cfg.crop,
                                                self.cfg.stride) for x in images]))
    raise ValueError(f"unknown inference mode {self.cfg.mode!r}; expected 'whole' or 'slide'")

  def _forward(self, variables: dict, images: np.ndarray) -> jax.Array:
    with self._lock:
      pending = self._pending.get(images.shape)
    if pending is not None:
      pending.result()  # compiled (or compiling) in the background: wait rather than compile twice
    return self.logits_fn(variables, np.asarray(images, np.float32))

  def input_shapes(self, hw: Size) -> list[tuple[int, ...]]:
    """The (B, H, W, 3) inputs the forward sees for an (h, w) image (one per view group in
    whole mode, the windows in slide mode)."""
    shapes = []
    for group in _same_shape(self.cfg.views(hw)):
      h, w = views_lib.ceil_to(group[0].shape, self.cfg.size_divisor)
      if self.cfg.mode == "whole":
        shapes.append((len(group), h, w, 3))
      else:
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
    self.logits_fn.lower(variables, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()

  def merged(self, variables: dict, img: np.ndarray) -> jax.Array:
    """Logits (single view) or mean softmax (TTA) at img's size, padded to BUCKET multiples."""
    ori, out = img.shape[:2], "softmax" if self.cfg.tta else "logits"
    views = self.cfg.views(ori)
    total = None
    for group in _same_shape(views):  # a scale's unflipped and flipped views run as one batch
      prepared = [views_lib.prepare(img, v, self.cfg.size_divisor) for v in group]
      logits = self.logits(variables, np.stack([p[0] for p in prepared]))
      for i, ((_, valid), view) in enumerate(zip(prepared, group)):
        s = to_original(logits, valid, ori, view.flip, out, index=i)
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
