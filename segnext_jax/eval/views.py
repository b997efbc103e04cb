"""The views of an image that a test pipeline feeds the model: sizes, flips, and their host-side
preparation (cv2 bilinear resize, normalize, zero-pad to /32) into a `Prepared` record, for the
two pipelines we reproduce.

'mmseg1' (mmsegmentation 1.x, `configs/_base_/datasets/ade20k.py`):
  single scale  Resize(scale=(2048, 512), keep_ratio=True); SegDataPreProcessor pads to /32.
  TTA           `tta_pipeline`: Resize(scale_factor=r, keep_ratio=True) of the ORIGINAL image for
                r in 0.5..1.75 (the test scale plays no part), each flipped and not; padded to /32.
'official' (the SegNeXt repository on mmseg 0.24, `local_configs/_base_/datasets/ade20k_repeat.py`):
  single scale  MultiScaleFlipAug(img_scale=(2048, 512)): Resize(keep_ratio=True), then
                ResizeToMultiple(32), a second bilinear resize up to the next multiples of 32.
  TTA           the same with img_ratios 0.5..1.75 (bound (int(2048 r), int(512 r))) and flip.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from segnext_jax.data.transforms import normalize, rescale_size, resize_image
from segnext_jax.errors import InputError
from segnext_jax.model import TOTAL_STRIDE

Size = tuple[int, int]  # (height, width)
Pipeline = Literal["mmseg1", "official"]
PIPELINES = ("mmseg1", "official")
TTA_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclasses.dataclass(frozen=True)
class View:
  """Resize bilinearly to `size`, then (official) to `resize_to`, then flip horizontally if `flip`."""
  size: Size
  flip: bool = False
  resize_to: Size | None = None

  @property
  def shape(self) -> Size:
    """The size the model sees, before padding."""
    return self.resize_to or self.size


def ceil_to(hw: Size, divisor: int) -> Size:
  return -(-hw[0] // divisor) * divisor, -(-hw[1] // divisor) * divisor


def scale_factor_size(hw: Size, ratio: float) -> Size:
  """mmcv Resize(scale_factor=ratio, keep_ratio=True): the rounded scaled size (w, h) becomes a
  (long, short) bound, and mmcv.imrescale fits the image inside it (rounding twice)."""
  h, w = hw
  return rescale_size(hw, (int(w * ratio + 0.5), int(h * ratio + 0.5)))


def views(hw: Size, pipeline: Pipeline, scale: Size, tta: bool, divisor: int = TOTAL_STRIDE,
          ratios: tuple[float, ...] = TTA_RATIOS) -> list[View]:
  """The views of an (h, w) image, in mmseg's order (each scale unflipped, then flipped)."""
  if pipeline not in PIPELINES:
    raise InputError(f"unknown test pipeline {pipeline!r}; expected one of {PIPELINES}")
  if not tta:
    sizes = [rescale_size(hw, scale)]
  elif pipeline == "mmseg1":
    sizes = [scale_factor_size(hw, r) for r in ratios]
  else:  # MultiScaleFlipAug mode 2: the bound itself scaled, then truncated
    sizes = [rescale_size(hw, (int(scale[0] * r), int(scale[1] * r))) for r in ratios]
  aligned = [ceil_to(s, divisor) if pipeline == "official" else None for s in sizes]
  flips = (False, True) if tta else (False,)
  return [View(s, f, a) for s, a in zip(sizes, aligned) for f in flips]


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
  """One view of an image as the model takes it, made once (InferenceConfig.prepare) and carried
  through inference: its pixels, and the sizes that take its logits back to the image."""
  pixels: np.ndarray  # (Hp, Wp, 3) float32 normalized, zero-padded bottom/right to /size_divisor
  size: Size          # the view before that padding: the region postprocessing keeps (img_shape)
  ori: Size           # the original image's size, where the scores go back to
  canvas: Size        # the shape whole-mode forwards run it at, zero-padded past `padded`
  flip: bool = False

  @property
  def padded(self) -> Size:
    """The /size_divisor input the model sees as image (mmseg's batch input); the canvas past it
    is masked."""
    return self.pixels.shape[:2]


def view_pixels(img: np.ndarray, view: View) -> np.ndarray:
  """uint8 RGB -> the view's normalized float32 pixels (resized, flipped), not yet padded."""
  x = resize_image(img, view.size)
  if view.resize_to is not None:
    x = resize_image(x, view.resize_to)
  if view.flip:
    x = x[:, ::-1]
  return normalize(x)


def pad_to(x: np.ndarray, hw: Size) -> np.ndarray:
  """Zero-pad an (H, W, C) array at the bottom/right (mmseg's stack_batch, pad_val 0)."""
  if x.shape[:2] == tuple(hw):
    return np.ascontiguousarray(x)
  out = np.zeros((*hw, x.shape[2]), x.dtype)
  out[:x.shape[0], :x.shape[1]] = x
  return out
