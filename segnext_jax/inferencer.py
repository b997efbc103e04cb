"""Inference in three lines: a checkpoint (or a released model's name) and a test pipeline, then
class maps, probabilities or logits of images at their own size, as eval.py and predict.py
compute them.

  from segnext_jax import Inferencer
  seg = Inferencer("segnext_mscan-t_ade20k")          # or a converted dir, a train.py workdir
  maps = seg(["a.jpg", rgb_uint8_array, pil_image])   # [(H, W) int32 class ids], each its own size
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from segnext_jax.errors import InputError

MODES = ("whole", "slide", "tta")  # tta: mmseg's multi-scale + flip test pipeline, whole views


class Inferencer:
  """A checkpoint's model under a test pipeline. `mode`: whole, slide or tta (default: the mode its
  training run validated with, else whole); `scale`, `crop`, `stride`, `pipeline` as eval.py's
  flags (default: the run's, else the ADE20K recipe's). Every local device takes a share of a
  call's images."""

  def __init__(self, checkpoint: str | os.PathLike, mode: str | None = None, *,
               step: int | None = None, pipeline: str = "mmseg1", scale: Sequence[int] | None = None,
               crop: Sequence[int] | None = None, stride: Sequence[int] | None = None,
               devices: Sequence[Any] | None = None):
    from segnext_jax import checkpoint as ckpt
    from segnext_jax.eval import InferenceConfig, Segmenter, spread
    if mode is not None and mode not in MODES:
      raise InputError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    found = ckpt.locate(checkpoint, step)
    self.model, variables, self.meta = ckpt.load_located(found)
    given = {k: tuple(v) for k, v in dict(scale=scale, crop=crop, stride=stride).items()
             if v is not None}
    if mode is not None:
      given.update(mode="slide" if mode == "slide" else "whole", tta=mode == "tta")
    self.cfg = InferenceConfig.from_train(self.meta.get("config") or {}, pipeline=pipeline,
                                          batch_size=1, **given)
    self.num_classes = self.model.num_classes
    self.class_names = list(self.meta.get("class_names") or [])
    self._lanes = spread.lanes(Segmenter.for_model(self.model, self.cfg), variables, devices)

  def __call__(self, images):
    """Class ids ((H, W) int32) of each image: a path, an RGB uint8 (H, W, 3) array or a PIL
    image; a list gives a list (mixed sizes are fine), one image gives one map."""
    return self._map(images, lambda lane, img: lane.segmenter.classes(lane.variables, img))

  def scores(self, images):
    """Per-class probabilities ((H, W, K) float32, summing to 1 over K) of each image."""
    return self._map(images, lambda lane, img: lane.segmenter.probabilities(lane.variables, img))

  def logits(self, images):
    """mmseg's seg_logits of each image ((H, W, K) float32): the logits at the image's size, or
    with tta the mean of the views' softmax, as mmseg's SegTTAModel."""
    return self._map(images, lambda lane, img: lane.segmenter.scores(lane.variables, img))

  def _map(self, images, fn: Callable) -> Any:
    single = _is_one_image(images)
    from segnext_jax.eval import spread
    arrays = [read(x) for x in ([images] if single else list(images))]
    out = [np.asarray(r) for r in spread.on_lanes(self._lanes, arrays, fn)]
    return out[0] if single else out


def read(image) -> np.ndarray:
  """An RGB uint8 (H, W, 3) array from a path, an array or a PIL image (InputError otherwise)."""
  if isinstance(image, (str, os.PathLike)):
    from segnext_jax.data.files import read_image
    if not Path(image).is_file():
      raise InputError(f"{image}: no such image file")
    return read_image(Path(image))
  if type(image).__module__.startswith("PIL."):
    return np.asarray(image.convert("RGB"))
  arr = np.asarray(image)
  if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
    raise InputError(f"an image must be RGB uint8 (H, W, 3), a path or a PIL image; got "
                     f"{arr.dtype} {arr.shape}")
  return arr


def _is_one_image(x) -> bool:
  return (isinstance(x, (str, os.PathLike)) or type(x).__module__.startswith("PIL.")
          or (isinstance(x, np.ndarray) and x.ndim == 3))
