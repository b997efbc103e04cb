"""Segmentation scores of one image under a test pipeline: whole or slide logits of each view,
taken back to the original size as mmseg's EncoderDecoder.postprocess_result does, merged as
SegTTAModel does (mean of softmax).

Each view is prepared once (InferenceConfig.prepare: a `Prepared` record of its pixels, sizes
and canvas) and that record is what runs and what maps the logits back. Whole-mode views run
in a CompiledForward (eval/compiled.py: fixed canvases, compiled ahead). Nothing here holds
variables: every call takes them, so one Segmenter serves every evaluation of a training run.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from segnext_jax import backend
from segnext_jax.eval.compiled import CompiledForward
from segnext_jax.eval.config import InferenceConfig
from segnext_jax.eval.original import Merged, ViewMap
from segnext_jax.eval.views import Prepared, Size, View, pad_to
from segnext_jax.resize import resize_bilinear

# (variables, NHWC images, valid (B, 2) int32 or None) -> stride-8 logits; see SegNeXt.__call__.
ApplyFn = Callable[[dict, jax.Array, jax.Array | None], jax.Array]


def model_apply(model) -> ApplyFn:
  """Inference apply of a SegNeXt: the fixed NMF bases stored in the variables."""
  def apply(variables: dict, images: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    return model.apply(variables, images, train=False, valid=valid)
  return apply


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

  def __init__(self, forward: CompiledForward, cfg: InferenceConfig = InferenceConfig(),
               window_fn: Callable | None = None):
    """`window_fn`: slide mode's (variables, window) -> logits at the window size."""
    self.forward, self.cfg = forward, cfg
    self.window_fn = window_fn

  @classmethod
  def for_model(cls, model, cfg: InferenceConfig = InferenceConfig(), **kwargs) -> Segmenter:
    """The model's inference: whole-mode views on the config's canvases, compiled ahead (staged
    where the backend's policy says; kwargs go to CompiledForward), slide windows jitted."""
    from segnext_jax.staged import StagedForward
    apply = model_apply(model)
    fn = StagedForward(model) if backend.policy().staged_inference else jax.jit(apply)
    return cls(CompiledForward(fn, cfg, **kwargs), cfg, jax.jit(logits_at_input(apply)))

  def replica(self) -> Segmenter:
    """This inference with programs of its own, for variables on another device."""
    return Segmenter(self.forward.replica(), self.cfg, self.window_fn)

  def scores(self, variables: dict, img: np.ndarray) -> np.ndarray:
    """(H, W, K) float32: logits (single view) or mean class probabilities (TTA)."""
    return self.merged(variables, img, classes=False).result(classes=False)

  def probabilities(self, variables: dict, img: np.ndarray) -> np.ndarray:
    """(H, W, K) float32 per-class probabilities: the softmax of the logits (TTA: the mean of
    the views' softmax, as the scores are)."""
    out = np.asarray(self.scores(variables, img), np.float32)
    if self.cfg.tta:
      return out
    e = np.exp(out - out.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  def classes(self, variables: dict, img: np.ndarray) -> np.ndarray:
    """(H, W) int32 predicted classes."""
    return self.merged(variables, img, classes=True).result(classes=True)

  def merged(self, variables: dict, img: np.ndarray, classes: bool) -> Merged:
    """Every view of img run and merged at img's size (on the device, not yet fetched)."""
    kind = "softmax" if self.cfg.tta else ("argmax" if classes else "logits")
    merged = Merged(img.shape[:2])
    slide = self.cfg.mode == "slide"
    for group in same_shape(self.cfg.views(img.shape[:2])):  # a scale's flips run as one batch
      prepared = [self.cfg.prepare(img, v) for v in group]
      logits = self._slide(variables, prepared) if slide else self.run(variables, prepared)
      for i, view in enumerate(prepared):
        merged.add(logits, ViewMap.of(view, logits.shape[1:3], i, stride8=not slide), kind)
    return merged

  def run(self, variables: dict, prepared: list[Prepared], batch: int | None = None) -> jax.Array:
    """Prepared views of one canvas -> their stride-8 logits (item i exact inside its padded
    input), in a batch of at least `batch`."""
    padded = np.array([p.padded for p in prepared], np.int32)
    return self.forward(variables, [p.pixels for p in prepared], padded, batch,
                        canvas=prepared[0].canvas)

  def warm(self, variables: dict, hw: Size, batch: int | None = None) -> None:
    """Start compiling the programs an (h, w) image needs, in the background; `batch`: its
    single view runs with others, in batches of that size."""
    if self.cfg.mode != "whole":
      return
    for group in same_shape(self.cfg.views(hw)):
      key = self.forward.key(self.cfg.canvas(group[0].shape), len(group), batch)
      self.forward.warm(variables, key)

  def _slide(self, variables: dict, prepared: list[Prepared]) -> jax.Array:
    """Input-size slide logits of each view, zero-padded to the view's canvas (a fixed set of
    shapes for the resize programs)."""
    if self.window_fn is None:
      raise ValueError("slide mode needs a window_fn (Segmenter.for_model makes one)")
    cfg = self.cfg
    out = [pad_to(slide_logits(self.window_fn, variables, p.pixels, cfg.crop, cfg.stride), p.canvas)
           for p in prepared]
    return jnp.asarray(np.stack(out))
