"""mmseg 1.x ADE20K train/test transforms in numpy + OpenCV, deterministic given a np.random.Generator.

Images are RGB uint8 (H, W, 3); labels uint8 (H, W) with 255 = ignore.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

MEAN = np.array([123.675, 116.28, 103.53], np.float32)   # RGB
STD = np.array([58.395, 57.12, 57.375], np.float32)
IGNORE = 255


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """mmseg's: 0 (other) -> 255 (ignore), v -> v - 1, 255 stays 255 (ADE20K: 1..150 -> 0..149)."""
  out = label.astype(np.int16) - 1
  out[(out < 0) | (out == IGNORE - 1)] = IGNORE
  return out.astype(np.uint8)


def rescale_size(hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
  """mmcv keep-ratio rescale: fit the long side in max(scale), the short side in min(scale)."""
  h, w = hw
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """cv2 bilinear (INTER_LINEAR, half-pixel centres, no antialiasing), as mmcv.imresize."""
  return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  return cv2.resize(label, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


def normalize(img: np.ndarray) -> np.ndarray:
  return (img.astype(np.float32) - MEAN) / STD


def random_crop(img, label, rng: np.random.Generator, crop: tuple[int, int],
                cat_max_ratio: float = 0.75, tries: int = 10):
  """mmseg RandomCrop: re-draw up to 10 times until no class covers > cat_max_ratio of the crop."""
  def offsets():
    mh, mw = max(img.shape[0] - crop[0], 0), max(img.shape[1] - crop[1], 0)
    return int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))
  y, x = offsets()
  if cat_max_ratio < 1.0:
    for _ in range(tries):
      classes, counts = np.unique(label[y:y + crop[0], x:x + crop[1]], return_counts=True)
      counts = counts[classes != IGNORE]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      y, x = offsets()
  return img[y:y + crop[0], x:x + crop[1]], label[y:y + crop[0], x:x + crop[1]]


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """mmseg PhotoMetricDistortion: brightness, contrast (before or after), saturation, hue; p=0.5 each.
  The hue shift is drawn as mmseg draws it: randint(-18, 18), i.e. -18..17."""
  if rng.integers(2):
    img = _convert(img, beta=rng.uniform(-32, 32))
  contrast_first = rng.integers(2) == 1
  if contrast_first and rng.integers(2):
    img = _convert(img, alpha=rng.uniform(0.5, 1.5))
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(int) + rng.integers(-18, 18)) % 180).astype(np.uint8)
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if not contrast_first and rng.integers(2):
    img = _convert(img, alpha=rng.uniform(0.5, 1.5))
  return img


@dataclasses.dataclass(frozen=True)
class TrainPipeline:
  """RandomResize(scale, ratio 0.5-2) -> RandomCrop(cat_max 0.75) -> flip -> photometric ->
  normalize -> pad to crop (image 0, label 255). Output: float32 (ch, cw, 3), uint8 (ch, cw)."""
  crop: tuple[int, int] = (512, 512)
  scale: tuple[int, int] = (2048, 512)
  ratio_range: tuple[float, float] = (0.5, 2.0)
  cat_max_ratio: float = 0.75
  flip_prob: float = 0.5
  photometric: bool = True

  def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    ratio = rng.uniform(*self.ratio_range)
    hw = rescale_size(img.shape[:2], (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
    img, label = resize_image(img, hw), resize_label(label, hw)
    img, label = random_crop(img, label, rng, self.crop, self.cat_max_ratio)
    if rng.random() < self.flip_prob:
      img, label = img[:, ::-1], label[:, ::-1]
    if self.photometric:
      img = photometric_distortion(np.ascontiguousarray(img), rng)
    out_img = np.zeros((*self.crop, 3), np.float32)
    out_lbl = np.full(self.crop, IGNORE, np.uint8)
    out_img[:img.shape[0], :img.shape[1]] = normalize(img)
    out_lbl[:label.shape[0], :label.shape[1]] = label
    return out_img, out_lbl
