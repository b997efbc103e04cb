"""Reading and checking one image/mask pair, as mmseg 1.x loads them, with one-line errors that
name the file (`DataError`).

Images: OpenCV `IMREAD_COLOR` (mmseg's LoadImageFromFile: EXIF orientation applied, grey and
alpha dropped to 3 channels). Masks: Pillow, unchanged (mmseg's LoadAnnotations: a palette PNG
gives its indices, not colours).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from segnext_jax.data import transforms
from segnext_jax.data import IGNORE_INDEX
from segnext_jax.errors import InputError

Source = str | Path | bytes
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap height and width
# What read_image decodes (OpenCV; .gif needs OpenCV 4.12 or later): what predict looks for.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class DataError(InputError):
  """A bad data file; the message is one line that starts with the file's path."""


class MissingDataError(DataError, FileNotFoundError):
  """A data file or folder that should exist does not."""


class DataWarning(UserWarning):
  """Data that loads but is probably not what the user meant."""


def _open(src: Source):
  return io.BytesIO(src) if isinstance(src, bytes) else src


def read_image(src: Source, name: str | None = None) -> np.ndarray:
  """An image file (path or encoded bytes) -> RGB uint8 (H, W, 3)."""
  name = name or str(src)
  buf = np.frombuffer(src, np.uint8) if isinstance(src, bytes) else _read_bytes(Path(src))
  img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
  if img is None:
    raise DataError(f"{name}: not a readable image")
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _read_bytes(path: Path) -> np.ndarray:
  try:
    return np.fromfile(path, np.uint8)
  except OSError as e:
    raise MissingDataError(f"{path}: cannot read ({e.strerror})") from None


def image_size(src: Source, name: str | None = None) -> tuple[int, int]:
  """(H, W) that `read_image` will return, from the header only (EXIF rotation included)."""
  name = name or str(src)
  try:
    with Image.open(_open(src)) as im:
      w, h = im.size
      rotated = im.format == "JPEG" and im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED
      return (w, h) if rotated else (h, w)
  except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
    return read_image(src, name).shape[:2]  # a format Pillow lacks; OpenCV decides


def read_mask(src: Source, name: str | None = None) -> np.ndarray:
  """A mask file -> (H, W) uint8 of stored values (palette PNGs give indices, as in mmseg)."""
  name = name or str(src)
  try:
    with Image.open(_open(src)) as im:
      arr = np.asarray(im)
  except FileNotFoundError:
    raise MissingDataError(f"{name}: mask file missing") from None
  except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
    raise DataError(f"{name}: not a readable mask ({type(e).__name__})") from None
  if arr.ndim == 3:
    if not (arr[..., :3] == arr[..., :1]).all():
      raise DataError(f"{name}: mask has {arr.shape[2]} different channels; expected one channel "
                      "of class indices (a grayscale or palette PNG)")
    arr = np.ascontiguousarray(arr[..., 0])
  if arr.dtype.kind not in "biu":
    raise DataError(f"{name}: mask of {arr.dtype} values; expected integer class indices")
  if arr.dtype != np.uint8:
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.uint8).max):
      raise DataError(f"{name}: label value {int(arr.max())} out of 0..255")
    arr = arr.astype(np.uint8)
  return arr


def label_lut(reduce_zero_label: bool = False, raw_ids: tuple[int, ...] = ()) -> np.ndarray:
  """Stored mask value -> class index as a (256,) uint8 table; 255 = ignore.

  raw_ids[c] is the stored value of class c (all others -> 255); then mmseg's reduce_zero_label.
  Values beyond the classes map through unchanged, so that `check_label` can name them."""
  lut = np.arange(256).astype(np.uint8)
  if raw_ids:
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[list(raw_ids)] = np.arange(len(raw_ids))
  return transforms.reduce_zero_label(lut) if reduce_zero_label else lut


def check_label(hist: np.ndarray, lut: np.ndarray, num_classes: int, name: str) -> None:
  """Raise DataError if a stored value (hist: (256,) counts) maps to no class and is not 255."""
  mapped = lut[np.nonzero(hist)[0]]
  bad = np.nonzero(hist)[0][(mapped >= num_classes) & (mapped != IGNORE_INDEX)]
  if bad.size:
    raw = int(bad[0])
    via = "" if lut[raw] == raw else f" (class {lut[raw]} after mapping)"
    raise DataError(f"{name}: label value {raw}{via} >= num_classes {num_classes} and not 255 "
                    "(ignore)")


def warn_if_binary_255(hist: np.ndarray, num_classes: int, name: str) -> bool:
  """Warn when 2-class masks store only 0 and 255 (hist: stored-value counts): 255 is ignore."""
  if num_classes != 2 or not hist[IGNORE_INDEX] or np.count_nonzero(hist) != 1 + bool(hist[0]):
    return False
  warnings.warn(f"{name}: 2-class masks with values 0 and 255 only: 255 is the ignore label, so "
                "the foreground is never learned; store class 1 as 1", DataWarning, stacklevel=3)
  return True


def load_pair(image: Source, mask: Source, lut: np.ndarray, num_classes: int,
              image_name: str, mask_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(RGB image, class-index label, stored-value histogram), checked; DataError names the file."""
  img, raw = read_image(image, image_name), read_mask(mask, mask_name)
  hist = _checked_hist(img.shape[:2], raw, lut, num_classes, image_name, mask_name)
  return img, lut[raw], hist


def scan_pair(image: Source, mask: Source, lut: np.ndarray, num_classes: int,
              image_name: str, mask_name: str) -> np.ndarray:
  """load_pair's checks with the image header only; returns the stored-value histogram."""
  return _checked_hist(image_size(image, image_name), read_mask(mask, mask_name), lut,
                       num_classes, image_name, mask_name)


def _checked_hist(image_hw: tuple[int, int], raw: np.ndarray, lut: np.ndarray, num_classes: int,
                  image_name: str, mask_name: str) -> np.ndarray:
  if tuple(image_hw) != raw.shape:
    raise DataError(f"{mask_name}: mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image is "
                    f"{image_hw[1]}x{image_hw[0]} ({image_name})")
  hist = cv2.calcHist([raw], [0], None, [256], [0, 256]).ravel().astype(np.int64)
  check_label(hist, lut, num_classes, mask_name)
  return hist
