"""mmseg 1.x ADE20K train/test transforms in numpy + OpenCV, deterministic given a np.random.Generator.

Images are RGB uint8 (H, W, 3); labels uint8 (H, W) with 255 = ignore.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from segnext_jax.data import IGNORE_INDEX

MEAN = np.array([123.675, 116.28, 103.53], np.float32)   # RGB
STD = np.array([58.395, 57.12, 57.375], np.float32)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """mmseg's: 0 (other) -> 255 (ignore), v -> v - 1, 255 stays 255 (ADE20K: 1..150 -> 0..149)."""
  out = label.astype(np.int16) - 1
  out[(out < 0) | (out == IGNORE_INDEX - 1)] = IGNORE_INDEX
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
      counts = class_counts(label[y:y + crop[0], x:x + crop[1]])
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      y, x = offsets()
  return img[y:y + crop[0], x:x + crop[1]], label[y:y + crop[0], x:x + crop[1]]


def class_counts(label: np.ndarray) -> np.ndarray:
  """Pixel counts of the classes present (ascending class, ignore left out): mmseg's
  np.unique(..., return_counts=True) without the ignore entry, by a histogram instead of a sort."""
  hist = cv2.calcHist([np.ascontiguousarray(label)], [0], None, [256], [0, 256]).ravel()
  hist[IGNORE_INDEX] = 0
  return hist[hist > 0].astype(np.int64)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """mmseg's PhotoMetricDistortion.convert: clip(x * alpha + beta) to uint8, in float32."""
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


_VALUES = np.arange(256, dtype=np.uint8)


def _apply(img: np.ndarray, table: np.ndarray, channel: int | None = None) -> np.ndarray:
  """img with `table` (256 uint8: a per-value function) applied to every value (channel=None)
  or to one channel only: the same values as computing the function pixel by pixel."""
  if channel is not None:
    full = np.repeat(_VALUES[:, None], img.shape[-1], axis=1)
    full[:, channel] = table
    table = full
  return cv2.LUT(img, table.reshape(256, 1, -1))


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """mmseg PhotoMetricDistortion: brightness, contrast (before or after), saturation, hue; p=0.5 each.
  The hue shift is drawn as mmseg draws it: randint(-18, 18), i.e. -18..17. Each step is a
  function of the uint8 value, so it is applied as a 256-entry table (cv2.LUT): the same values
  as mmseg's float32 per-pixel arithmetic, without the float copies."""
  if rng.integers(2):
    img = _apply(img, _convert(_VALUES, beta=rng.uniform(-32, 32)))
  contrast_first = rng.integers(2) == 1
  if contrast_first and rng.integers(2):
    img = _apply(img, _convert(_VALUES, alpha=rng.uniform(0.5, 1.5)))
  if rng.integers(2):
    hsv = _apply(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), _convert(_VALUES, alpha=rng.uniform(0.5, 1.5)), 1)
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.integers(2):
    hue = ((_VALUES.astype(int) + rng.integers(-18, 18)) % 180).astype(np.uint8)
    img = cv2.cvtColor(_apply(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), hue, 0), cv2.COLOR_HSV2RGB)
  if not contrast_first and rng.integers(2):
    img = _apply(img, _convert(_VALUES, alpha=rng.uniform(0.5, 1.5)))
  return img


@dataclasses.dataclass(frozen=True)
class TrainPipeline:
  """RandomResize(scale, ratio 0.5-2) -> RandomCrop(cat_max 0.75) -> flip -> photometric, then
  mmseg's SegDataPreProcessor: normalize, pad to crop (image 0, label 255).

  `record` stops before the normalisation: uint8 image padded to the crop, its valid size `hw`
  and the padded label, a quarter of the float32 bytes; `device_normalize` finishes it in the train
  step. `__call__` is the whole thing on the host: float32 (ch, cw, 3), uint8 (ch, cw)."""
  crop: tuple[int, int] = (512, 512)
  scale: tuple[int, int] = (2048, 512)
  ratio_range: tuple[float, float] = (0.5, 2.0)
  cat_max_ratio: float = 0.75
  flip_prob: float = 0.5
  photometric: bool = True

  def augment(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """The random part: uint8 image (h, w, 3) and label (h, w), h, w <= crop (not padded)."""
    ratio = rng.uniform(*self.ratio_range)
    hw = rescale_size(img.shape[:2], (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
    img, label = resize_image(img, hw), resize_label(label, hw)
    img, label = random_crop(img, label, rng, self.crop, self.cat_max_ratio)
    if rng.random() < self.flip_prob:
      img, label = cv2.flip(img, 1), label[:, ::-1]
    if self.photometric:
      img = photometric_distortion(np.ascontiguousarray(img), rng)
    return img, label

  def record(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> dict:
    """{'image': uint8 (ch, cw, 3) padded with 0, 'label': uint8 (ch, cw) padded with 255,
    'hw': int32 (2,) the valid rows and columns}: what crosses to the device."""
    img, label = self.augment(img, label, rng)
    out_img = np.zeros((*self.crop, 3), np.uint8)
    out_lbl = np.full(self.crop, IGNORE_INDEX, np.uint8)
    out_img[:img.shape[0], :img.shape[1]] = img
    out_lbl[:label.shape[0], :label.shape[1]] = label
    return {"image": out_img, "label": out_lbl, "hw": np.array(img.shape[:2], np.int32)}

  def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    rec = self.record(img, label, rng)
    h, w = rec["hw"]
    out_img = np.zeros((*self.crop, 3), np.float32)
    out_img[:h, :w] = normalize(rec["image"][:h, :w])
    return out_img, rec["label"]


# normalize() of every uint8 value per channel: (256, 3) float32. The device looks values up in
# it, so its result is the host's to the bit on any backend (no division there).
NORM_TABLE = normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1))


def device_normalize(image, hw):
  """uint8 (b, H, W, 3) padded images and their valid sizes (b, 2) -> the float32 batch
  TrainPipeline.__call__ gives: normalized inside, 0 in the padding. Traced (jax.numpy)."""
  import jax.numpy as jnp
  table = jnp.asarray(NORM_TABLE)
  values = table[image.astype(jnp.int32), jnp.arange(3)]
  rows = jnp.arange(image.shape[1])[None, :, None] < hw[:, 0, None, None]
  cols = jnp.arange(image.shape[2])[None, None, :] < hw[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], values, jnp.float32(0))
