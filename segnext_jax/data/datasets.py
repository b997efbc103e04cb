"""Segmentation datasets: ADE20K folders, tfds scene_parse150, and a learnable synthetic set.

Each dataset is indexable: `ds[i] -> (image RGB uint8 (H,W,3), label uint8 (H,W), 255 = ignore)`,
with `num_classes`, `class_names` and `len(ds)`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol, Sequence

import cv2
import numpy as np

from segnext_jax.data.transforms import reduce_zero_label


class SegDataset(Protocol):
  num_classes: int
  class_names: Sequence[str]

  def __len__(self) -> int: ...

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...


def read_image(path: Path) -> np.ndarray:
  """Any image file -> RGB uint8 (grayscale and alpha converted); a clear error if unreadable."""
  img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  if img is None:
    raise ValueError(f"{path}: not a readable image")
  if img.dtype != np.uint8:
    img = cv2.convertScaleAbs(img, alpha=255.0 / max(float(img.max()), 1.0))
  if img.ndim == 2:
    return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
  if img.shape[2] == 4:
    return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class ADE20KFolder:
  """ADEChallengeData2016: images/{split}/*.jpg + annotations/{split}/*.png (0 = ignore)."""
  num_classes = 150

  def __init__(self, root: str | Path, split: str = "training"):
    from segnext_jax.data.ade20k_classes import ADE20K_CLASSES
    self.class_names = ADE20K_CLASSES
    root = Path(root)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    for d in (img_dir, ann_dir):
      if not d.is_dir():
        raise FileNotFoundError(f"{d}: missing (expected the ADEChallengeData2016 layout)")
    self.images = sorted(img_dir.glob("*.jpg"))
    if not self.images:
      raise FileNotFoundError(f"{img_dir}: no .jpg images")
    self.labels = [ann_dir / (p.stem + ".png") for p in self.images]
    missing = [str(p) for p in self.labels if not p.is_file()]
    if missing:
      raise FileNotFoundError(f"{len(missing)} annotations missing, e.g. {missing[0]}")

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    label = cv2.imread(str(self.labels[i]), cv2.IMREAD_GRAYSCALE)
    if label is None:
      raise ValueError(f"{self.labels[i]}: not a readable annotation")
    return read_image(self.images[i]), reduce_zero_label(label)


class TFDSSceneParse:
  """tensorflow-datasets `scene_parse150` (ADE20K SceneParsing) read through tfds.data_source."""
  num_classes = 150

  def __init__(self, split: str = "train", data_dir: str | None = None):
    from segnext_jax.data.ade20k_classes import ADE20K_CLASSES
    self.class_names = ADE20K_CLASSES
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise ImportError("tfds:scene_parse150 needs tensorflow-datasets: pip install -e .[tfds]") from None
    try:
      self.source = tfds.data_source("scene_parse150", split=split, data_dir=data_dir)
    except Exception as e:  # not prepared / not found: tfds raises several types
      raise FileNotFoundError(
          f"tfds scene_parse150 ({split}) is not prepared in {data_dir or '~/tensorflow_datasets'}: "
          f"{str(e).splitlines()[0][:160]}") from None

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    ex = self.source[i]
    ann = np.asarray(ex["annotation"])
    label = ann[..., 0] if ann.ndim == 3 else ann  # class id replicated in the channels
    return np.asarray(ex["image"], np.uint8), reduce_zero_label(label.astype(np.uint8))


SYNTHETIC_CLASSES = ("background", "disc", "box", "triangle", "stripes", "checker")


@dataclasses.dataclass
class Synthetic:
  """Procedural scenes: a noisy gradient background with discs, boxes, triangles, striped and
  checkered blobs, each class with its own colour range and texture. Seeded per index; the
  validation split uses a disjoint seed range."""
  length: int = 2000
  size: int = 128
  seed: int = 0
  split: str = "train"
  num_classes: int = len(SYNTHETIC_CLASSES)
  class_names: Sequence[str] = SYNTHETIC_CLASSES

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 <= i < self.length:
      raise IndexError(i)
    rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, i])
    s = self.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    base = rng.uniform(60, 140, 3)
    tilt = rng.uniform(-0.3, 0.3, 2)
    img = base + (tilt[0] * yy + tilt[1] * xx)[..., None]
    label = np.zeros((s, s), np.uint8)
    for _ in range(rng.integers(2, 6)):
      cls = int(rng.integers(1, self.num_classes))
      mask = self._shape(cls, rng, yy, xx)
      img[mask] = self._texture(cls, rng, yy, xx)[mask]
      label[mask] = cls
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label

  def _shape(self, cls: int, rng, yy, xx) -> np.ndarray:
    s = self.size
    cy, cx = rng.uniform(0.1 * s, 0.9 * s, 2)
    r = rng.uniform(0.08 * s, 0.22 * s)
    if cls == 1:  # disc
      return (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    if cls == 3:  # triangle, apex up
      return (yy < cy + r) & (np.abs(xx - cx) < (yy - (cy - r)) * 0.6)
    if cls == 4:  # ellipse
      return ((yy - cy) / r) ** 2 + ((xx - cx) / (1.6 * r)) ** 2 < 1
    return (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r * rng.uniform(0.6, 1.4))  # box / checker

  def _texture(self, cls: int, rng, yy, xx) -> np.ndarray:
    hue = {1: (220, 40, 40), 2: (40, 200, 60), 3: (50, 80, 230), 4: (230, 210, 40), 5: (200, 200, 200)}[cls]
    color = np.clip(np.array(hue) + rng.normal(0, 20, 3), 0, 255)
    tex = np.ones_like(yy)
    if cls == 4:
      tex = 0.55 + 0.45 * (np.sin((yy + xx) * rng.uniform(0.5, 0.8)) > 0)
    elif cls == 5:
      period = int(rng.integers(4, 8))
      tex = 0.35 + 0.65 * (((yy // period) + (xx // period)) % 2)
    return color * tex[..., None]


def make_dataset(spec: str, split: str) -> SegDataset:
  """'synthetic' | 'ade20k:PATH' | 'tfds:scene_parse150[:DATA_DIR]'; split 'train' or 'val'."""
  kind, _, arg = spec.partition(":")
  if kind == "synthetic":
    return Synthetic(length=2000 if split == "train" else 64, split=split)
  if kind == "ade20k":
    if not arg:
      raise ValueError("ade20k needs a path: --data ade20k:/path/ADEChallengeData2016")
    return ADE20KFolder(arg, "training" if split == "train" else "validation")
  if kind == "tfds":
    name, _, data_dir = arg.partition(":")
    if name != "scene_parse150":
      raise ValueError(f"unsupported tfds dataset {name!r}; only scene_parse150")
    return TFDSSceneParse("train" if split == "train" else "validation", data_dir or None)
  raise ValueError(f"unknown dataset {spec!r}; use synthetic, ade20k:PATH or tfds:scene_parse150")
