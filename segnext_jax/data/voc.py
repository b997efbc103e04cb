"""VOCdevkit-style datasets (one image folder, one mask folder, splits as name lists), one
DEVKIT_LAYOUTS row each, read as mmseg 1.x's PascalVOCDataset / PascalContextDataset(59) read them.

`voc:PATH` (PATH = VOCdevkit/VOC2012; mmseg's _base_/datasets/pascal_voc12_aug.py):
  JPEGImages/NAME.jpg, SegmentationClass/NAME.png (palette PNGs: the index is the class,
  255 = object borders, ignored), ImageSets/Segmentation/{train,val}.txt
  + SegmentationClassAug/NAME.png and ImageSets/Segmentation/aug.txt (mmseg's voc_aug converter
  output from SBD): when both exist, train is train.txt over SegmentationClass followed by aug.txt
  over SegmentationClassAug, as the config's ConcatDataset; without them, train.txt alone.
`pascal_context:PATH` (PATH = VOCdevkit/VOC2010; mmseg's pascal_context converter output):
  SegmentationClassContext/NAME.png, ImageSets/SegmentationContext/{train,val}.txt; 59 classes
  (PascalContextDataset59: background 0 -> 255, ignored; v -> v - 1), as the paper reports.
`pascal_context60:PATH`: the same files, 60 classes with background (PascalContextDataset).
Items come in split-file order.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from segnext_jax.data.files import MissingDataError
from segnext_jax.data.folder import SPLITS, FolderDataset, Layout
from segnext_jax.data.pascal_context_classes import PASCAL_CONTEXT
from segnext_jax.data.voc_classes import VOC

IMG_DIR, IMG_SUFFIX, SEG_MAP_SUFFIX = "JPEGImages", ".jpg", ".png"


@dataclasses.dataclass(frozen=True)
class DevkitLayout:
  """Where a devkit dataset's masks and split lists live, and what the mask values mean."""
  ann_dir: str
  split_dir: str               # holds {train,val}.txt: one NAME per line
  classes: tuple               # rows (name, RGB) of a *_classes table
  reduce_zero_label: bool = False
  aug: tuple[str, str] = ()    # (ann_dir, list in split_dir) appended to train when both exist


DEVKIT_LAYOUTS = {
  "voc": DevkitLayout("SegmentationClass", "ImageSets/Segmentation", VOC,
                      aug=("SegmentationClassAug", "aug.txt")),
  "pascal_context": DevkitLayout("SegmentationClassContext", "ImageSets/SegmentationContext",
                                 PASCAL_CONTEXT[1:], reduce_zero_label=True),
  "pascal_context60": DevkitLayout("SegmentationClassContext", "ImageSets/SegmentationContext",
                                   PASCAL_CONTEXT),
}


class ConcatDataset:
  """Datasets one after another (mmengine's ConcatDataset): VOC's train, then its SBD aug set."""

  def __init__(self, parts: Sequence[FolderDataset]):
    self.parts = tuple(parts)
    first = self.parts[0]
    self.class_names, self.palette, self.num_classes = (first.class_names, first.palette,
                                                        first.num_classes)
    self.images = [p for d in self.parts for p in d.images]
    self.masks = [p for d in self.parts for p in d.masks]
    self._ends = np.cumsum([len(d) for d in self.parts]).tolist()

  def __len__(self) -> int:
    return self._ends[-1]

  def _locate(self, i: int) -> tuple[FolderDataset, int]:
    j = i + len(self) if i < 0 else i
    if not 0 <= j < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} items")
    k = bisect.bisect_right(self._ends, j)
    return self.parts[k], j - (self._ends[k - 1] if k else 0)

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    part, j = self._locate(i)
    return part[j]

  def name(self, i: int) -> str:
    part, j = self._locate(i)
    return part.name(j)

  def validate(self, workers: int | None = None, decode_images: bool = False) -> None:
    """Each part's check, in order: DataError names the first bad file."""
    for part in self.parts:
      part.validate(workers=workers, decode_images=decode_images)


def _part(root: Path, spec: DevkitLayout, ann_dir: str, split_file: Path) -> FolderDataset:
  layout = Layout(IMG_DIR, ann_dir, SPLITS, IMG_SUFFIX, SEG_MAP_SUFFIX, spec.classes,
                  reduce_zero_label=spec.reduce_zero_label)
  return FolderDataset(root, "train", layout, split_file)  # img/ann dirs take no split name


def _aug_part(root: Path, spec: DevkitLayout) -> FolderDataset | None:
  """The aug set when its masks and list both exist; None when neither; else the missing one."""
  ann_dir, split_file = root / spec.aug[0], root / spec.split_dir / spec.aug[1]
  have = ann_dir.is_dir(), split_file.is_file()
  if not any(have):
    logging.info("%s: no %s/ and %s; training on %s/train.txt only", root, spec.aug[0],
                 spec.aug[1], spec.split_dir)
    return None
  if not all(have):
    missing, present = (ann_dir, split_file) if not have[0] else (split_file, ann_dir)
    raise MissingDataError(f"{missing}: missing, but {present} exists (mmseg's voc_aug converter "
                           "writes both; remove the other to train on train.txt alone)")
  return _part(root, spec, spec.aug[0], split_file)


def devkit_dataset(kind: str, root: str | Path, split: str) -> FolderDataset | ConcatDataset:
  """`kind:PATH` for a DEVKIT_LAYOUTS kind; VOC's train gains the SBD aug set when present."""
  root = Path(root).expanduser()
  if not root.is_dir():
    raise MissingDataError(f"{root}: no such folder (--data {kind}:PATH)")
  spec = DEVKIT_LAYOUTS[kind]
  main = _part(root, spec, spec.ann_dir, root / spec.split_dir / f"{split}.txt")
  aug = _aug_part(root, spec) if split == "train" and spec.aug else None
  return ConcatDataset((main, aug)) if aug is not None else main
