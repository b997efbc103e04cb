"""Segmentation scores of one image under a test pipeline, as a pure layer over a forward:
whole or slide logits of each view, taken back to the original size as mmseg's
EncoderDecoder.postprocess_result does, merged as SegTTAModel does (mean of softmax).

A `Forward` runs views of one program (`key`) together: stride-8 logits, exact inside each
view's valid region, of the views padded as the forward chooses.
`ExactForward(apply_fn)` is the plain one, jitted per input shape; eval/compiled.py's
`CompiledForward` pads to a fixed set of shapes and compiles them ahead. Nothing here holds
variables: every call takes them, so one Segmenter serves every evaluation of a training run.
"""
from __future__ import annotations

from typing import Callable, Hashable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from segnext_jax import backend
from segnext_jax.eval.config import InferenceConfig
from segnext_jax.eval.original import Merged, ViewMap
from segnext_jax.eval.views import Size, View, ceil_to, pad_to, prepare
from segnext_jax.resize import resize_bilinear

# (variables, NHWC images, valid (B, 2) int32 or None) -> stride-8 logits; see SegNeXt.__call__.
ApplyFn = Callable[[dict, jax.Array, jax.Array | None], jax.Array]


class Forward(Protocol):
  """(variables, views (each (h, w, 3), multiples of 32), valid (n, 2) int32, batch) -> stride-8
  logits (B, H/8, W/8, K) with B >= n and H, W >= every view's: item i exact inside valid[i]."""

  def __call__(self, variables: dict, views: list[np.ndarray], valid: np.ndarray,
               batch: int | None = None) -> jax.Array: ...

  def key(self, hw: Size, n: int = 1, batch: int | None = None) -> Hashable:
    """The program n views of shape hw run in: views of equal keys can share a call."""

  def warm(self, variables: dict, key: Hashable) -> None:
    """Prepare the program of `key` ahead (e.g. compile it in the background), or nothing."""


def model_apply(model) -> ApplyFn:
  """Inference apply of a SegNeXt: the fixed NMF bases stored in the variables."""
  def apply(variables: dict, images: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    return model.apply(variables, images, train=False, valid=valid)
  return apply


class ExactForward:
  """The apply function jitted as it is: views of one shape per call, one program per shape."""

  def __init__(self, apply_fn: ApplyFn):
    self.fn = jax.jit(apply_fn)

  def key(self, hw: Size, n: int = 1, batch: int | None = None) -> Hashable:
    return (n, *hw)

  def warm(self, variables: dict, key: Hashable) -> None:
    pass  # compiled on first use

  def __call__(self, variables: dict, views: list[np.ndarray], valid: np.ndarray,
               batch: int | None = None) -> jax.Array:
    return self.fn(variables, np.stack(views), valid)


def logits_at_input(apply_fn: ApplyFn) -> Callable[[dict, jax.Array], jax.Array]:
  """(variables, images) -> logits resized (torch bilinear) to the input size, as mmseg's head."""
  def fn(variables: dict, images: jax.Array) -> jax.Array:
    return resize_bilinear(apply_fn(variables, images, None), images.shape[1:3])
  return fn


def slide_logits(window_fn: Callable, variables: dict, x: np.ndarray, crop: Size,
                 stride: Size) -> np.ndarray:
  """mmseg slide_inference on one padded (H, W, 3) view: window logits (at the window size)
  averaged by overlap count."""
  h, w = x.shape[:2]
  total, count = None, np.zeros((h, w, 1), np.float32)
  for y1, y2, x1, x2 in windows(h, w, crop, stride):
    out = np.asarray(window_fn(variables, x[None, y1:y2, x1:x2])[0])
    total = np.zeros((h, w, out.shape[-1]), np.float32) if total is None else total
    total[y1:y2, x1:x2] += out
    count[y1:y2, x1:x2] += 1
  return total / count


def windows(h: int, w: int, crop: Size, stride: Size):
  """(y1, y2, x1, x2) of mmseg's sliding windows: a grid, the last row/column flush with the edge."""
  (ch, cw), (sh, sw) = crop, stride
  for gy in range(max(h - ch + sh - 1, 0) // sh + 1):
    for gx in range(max(w - cw + sw - 1, 0) // sw + 1):
      y2, x2 = min(gy * sh + ch, h), min(gx * sw + cw, w)
      yield max(y2 - ch, 0), y2, max(x2 - cw, 0), x2


def same_shape(views: list[View]) -> list[list[View]]:
  """Views grouped by the shape the model sees (a scale's unflipped and flipped views)."""
  groups: dict[Size, list[View]] = {}
  for v in views:
    groups.setdefault(v.shape, []).append(v)
  return list(groups.values())


class Segmenter:
  """An InferenceConfig over a forward: `scores` and `classes` of one image, at its original size."""

  def __init__(self, forward: Forward, cfg: InferenceConfig = InferenceConfig(),
               window_fn: Callable | None = None):
    """`window_fn`: slide mode's (variables, window) -> logits at the window size (default: the
    forward's apply, if it has one, resized as mmseg's head does)."""
    self.forward, self.cfg = forward, cfg
    self.window_fn = window_fn

  @classmethod
  def for_model(cls, model, cfg: InferenceConfig = InferenceConfig(), compiled: bool = True,
                **kwargs) -> "Segmenter":
    """The model's inference forward: with `compiled`, on the config's canvases, compiled ahead
    (eval/compiled.py; staged where the backend's policy says), else exact shapes."""
    apply = model_apply(model)
    window = jax.jit(logits_at_input(apply))
    if not compiled:
      return cls(ExactForward(apply), cfg, window)
    from segnext_jax.eval.compiled import CompiledForward
    from segnext_jax.staged import StagedForward
    fn = StagedForward(model) if backend.policy().staged_inference else jax.jit(apply)
    return cls(CompiledForward(fn, cfg, **kwargs), cfg, window)

  def scores(self, variables: dict, img: np.ndarray) -> np.ndarray:
    """(H, W, K) float32: logits (single view) or mean class probabilities (TTA)."""
    return self.merged(variables, img, classes=False).result(classes=False)

  def classes(self, variables: dict, img: np.ndarray) -> np.ndarray:
    """(H, W) int32 predicted classes."""
    return self.merged(variables, img, classes=True).result(classes=True)

  def merged(self, variables: dict, img: np.ndarray, classes: bool) -> Merged:
    """Every view of img run and merged at img's size (on the device, not yet fetched)."""
    ori = img.shape[:2]
    kind = "softmax" if self.cfg.tta else ("argmax" if classes else "logits")
    merged = Merged(ori)
    for group in same_shape(self.cfg.views(ori)):  # a scale's flips run as one batch
      prepared = [prepare(img, v, self.cfg.size_divisor) for v in group]
      if self.cfg.mode == "slide":
        logits, padded = self._slide(variables, [x for x, _ in prepared]), None
      else:
        logits, padded = self.run(variables, [x for x, _ in prepared]), True
      for i, ((x, valid), view) in enumerate(zip(prepared, group)):
        vmap = ViewMap(logits.shape[1:3], valid, ori, view.flip, padded and x.shape[:2], index=i)
        merged.add(logits, vmap, kind)
    return merged

  def run(self, variables: dict, views: list[np.ndarray], batch: int | None = None) -> jax.Array:
    """Prepared (/32) views of one program -> their stride-8 logits (see Forward)."""
    return self.forward(variables, views, np.array([x.shape[:2] for x in views], np.int32), batch)

  def key(self, hw: Size, n: int = 1, batch: int | None = None) -> Hashable:
    """The program n prepared views of shape hw run in."""
    return self.forward.key(hw, n, batch)

  def warm(self, variables: dict, hw: Size, batch: int | None = None) -> None:
    """Start preparing (compiling, for a CompiledForward) the programs an (h, w) image needs;
    `batch`: its single view runs with others, in batches of that size."""
    if self.cfg.mode != "whole":
      return
    for group in same_shape(self.cfg.views(hw)):
      shape = ceil_to(group[0].shape, self.cfg.size_divisor)
      self.forward.warm(variables, self.key(shape, len(group), batch))

  def _slide(self, variables: dict, views: list[np.ndarray]) -> jax.Array:
    """Input-size slide logits of each view, zero-padded to the view's canvas (a fixed set of
    shapes for the resize programs)."""
    if self.window_fn is None:
      raise ValueError("slide mode needs a window_fn (Segmenter.for_model makes one)")
    cfg = self.cfg
    out = [slide_logits(self.window_fn, variables, x, cfg.crop, cfg.stride) for x in views]
    canvas = cfg.canvas(views[0].shape[:2])
    return jnp.asarray(np.stack([pad_to(o, canvas) for o in out]))
