"""Segmentation scores of one image under a test pipeline: whole or slide logits of each view,
taken back to the original size as mmseg's EncoderDecoder.postprocess_result does (crop the
padding, undo the flip, torch bilinear), and merged as SegTTAModel does (mean of softmax).

A `Predictor` binds a config to the model's apply function, jitted once: the variables are an
argument of every call, so one predictor serves every evaluation of a training run.
"""
from __future__ import annotations

import dataclasses
import functools
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
                out: Output = "logits") -> jax.Array:
  """(H, W, K) view logits -> crop the padding to `valid`, undo a horizontal flip, resize (torch
  bilinear) to `ori`; then optionally softmax or argmax. On the device, and padded with junk to
  multiples of BUCKET: crop [:ori[0], :ori[1]] after the last step."""
  rows = _taps(ori[0], valid[0], flip=False)
  cols = _taps(ori[1], valid[1], flip=flip)
  return _gather_resize(jnp.asarray(logits), *rows, *cols, out=out)


def _taps(n_out: int, n_in: int, flip: bool):
  """torch's source indices and weights along one axis, padded to a multiple of BUCKET."""
  i0, i1, lam = bilinear_taps(n_out, n_in)
  if flip:  # column c of the flipped view is column n_in - 1 - c of the unflipped one
    i0, i1 = n_in - 1 - i0, n_in - 1 - i1
  pad = lambda a: np.pad(a, (0, -(-n_out // BUCKET) * BUCKET - n_out))
  return pad(i0), pad(i1), pad(lam)


@functools.partial(jax.jit, static_argnames="out")
def _gather_resize(x, i0h, i1h, lh, i0w, i1w, lw, *, out: Output):
  x = x[i0h] * (1 - lh)[:, None, None] + x[i1h] * lh[:, None, None]                # (Ho, W, K)
  x = x[:, i0w] * (1 - lw)[None, :, None] + x[:, i1w] * lw[None, :, None]          # (Ho, Wo, K)
  if out == "softmax":
    return jax.nn.softmax(x, axis=-1)
  return jnp.argmax(x, axis=-1).astype(jnp.int32) if out == "argmax" else x


class Predictor:
  """An InferenceConfig bound to a jitted forward (one program per input shape, reused across
  calls and evaluations). Holds no variables: every method takes them."""

  def __init__(self, apply_fn: ApplyFn, cfg: InferenceConfig = InferenceConfig()):
    self.cfg = cfg
    self.logits_fn = jax.jit(logits_at_input(apply_fn))

  @classmethod
  def for_model(cls, model, cfg: InferenceConfig = InferenceConfig()) -> "Predictor":
    return cls(model_apply(model), cfg)

  def logits(self, variables: dict, images: np.ndarray) -> jax.Array:
    """(B, H, W, 3) prepared views -> (B, H, W, K) logits at the input size (whole or slide)."""
    if self.cfg.mode == "whole":
      return self.logits_fn(variables, jnp.asarray(images))
    if self.cfg.mode == "slide":
      return jnp.asarray(np.stack([slide_logits(self.logits_fn, variables, x, self.cfg.crop,
                                                self.cfg.stride) for x in images]))
    raise ValueError(f"unknown inference mode {self.cfg.mode!r}; expected 'whole' or 'slide'")

  def merged(self, variables: dict, img: np.ndarray) -> jax.Array:
    """Logits (single view) or mean softmax (TTA) at img's size, padded to BUCKET multiples."""
    ori, out = img.shape[:2], "softmax" if self.cfg.tta else "logits"
    views = self.cfg.views(ori)
    total = None
    for group in _same_shape(views):  # a scale's unflipped and flipped views run as one batch
      prepared = [views_lib.prepare(img, v, self.cfg.size_divisor) for v in group]
      logits = self.logits(variables, np.stack([p[0] for p in prepared]))
      for lg, (_, valid), view in zip(logits, prepared, group):
        s = to_original(lg, valid, ori, view.flip, out)
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
