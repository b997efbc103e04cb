"""A learnable synthetic segmentation set: procedural shapes, each class its colour and texture."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from segnext_jax.data import IGNORE_INDEX

SYNTHETIC = (  # (name, RGB palette colour); class 0 is the background
  ("background", (128, 128, 128)),
  ("disc",       (220,  40,  40)),
  ("box",        ( 40, 200,  60)),
  ("triangle",   ( 50,  80, 230)),
  ("stripes",    (230, 210,  40)),
  ("checker",    (200, 200, 200)),
)
SYNTHETIC_CLASSES = tuple(name for name, _ in SYNTHETIC)


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
  palette: np.ndarray = dataclasses.field(
      default_factory=lambda: np.array([rgb for _, rgb in SYNTHETIC], np.uint8))

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
    color = np.clip(np.array(SYNTHETIC[cls][1]) + rng.normal(0, 20, 3), 0, 255)
    tex = np.ones_like(yy)
    if cls == 4:
      tex = 0.55 + 0.45 * (np.sin((yy + xx) * rng.uniform(0.5, 0.8)) > 0)
    elif cls == 5:
      period = int(rng.integers(4, 8))
      tex = 0.35 + 0.65 * (((yy // period) + (xx // period)) % 2)
    return color * tex[..., None]


def write_folder(root: str | Path, train: int = 200, val: int = 40, size: int = 128,
                 classes: Sequence[int] = (0, 1, 2, 3), seed: int = 0) -> Path:
  """Write synthetic scenes as a `folder:` dataset (mmseg's custom layout + classes.json).

  `classes` picks which synthetic classes to keep (renumbered 0..N-1; the others become class 0),
  so the folder has its own class count, as a user's data would."""
  root = Path(root)
  lut = np.zeros(256, np.uint8)
  lut[IGNORE_INDEX] = IGNORE_INDEX
  for new, old in enumerate(classes):
    lut[old] = new
  for split, n in (("train", train), ("val", val)):
    (root / "img_dir" / split).mkdir(parents=True, exist_ok=True)
    (root / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
    ds = Synthetic(length=n, size=size, seed=seed, split=split)
    for i in range(n):
      img, label = ds[i]
      Image.fromarray(img).save(root / "img_dir" / split / f"scene_{i:05d}.jpg", quality=95)
      Image.fromarray(lut[label]).save(root / "ann_dir" / split / f"scene_{i:05d}.png")
  (root / "classes.json").write_text(json.dumps({
      "classes": [SYNTHETIC[c][0] for c in classes],
      "palette": [list(SYNTHETIC[c][1]) for c in classes]}, indent=1))
  return root


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description="Write synthetic scenes as a folder:PATH dataset.")
  p.add_argument("out", help="dataset root to create")
  p.add_argument("--train", type=int, default=200)
  p.add_argument("--val", type=int, default=40)
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3],
                 help="synthetic class ids to keep (0 background, 1 disc, 2 box, 3 triangle, "
                 "4 stripes, 5 checker)")
  args = p.parse_args(argv)
  root = write_folder(args.out, args.train, args.val, args.size, args.classes)
  print(f"wrote {root}: {args.train} train + {args.val} val images; use --data folder:{root}")


if __name__ == "__main__":
  main()
