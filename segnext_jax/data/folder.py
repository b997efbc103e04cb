"""Datasets stored as image and mask folders, one LAYOUTS row each: mmseg's custom layout
(`folder:PATH`), ADE20K, Cityscapes, COCO-Stuff 164k and iSAID, with mmseg BaseSegDataset semantics.

`folder:PATH` expects
  PATH/img_dir/{train,val}/**/NAME{img_suffix}       images (searched recursively)
  PATH/ann_dir/{train,val}/**/NAME{seg_map_suffix}   masks: class index per pixel, 255 = ignore
  PATH/classes.json   {"classes": ["sky", ...],                   required; num_classes = len
                       "palette": [[r, g, b], ...],               optional, one colour per class
                       "img_suffix": ".jpg", "seg_map_suffix": ".png",        the defaults
                       "reduce_zero_label": false,                mmseg's: 0 -> 255, v -> v - 1
                       "split": {"train": "splits/train.txt"}}    optional, per split
A split file (path relative to PATH) lists one NAME per line, relative to img_dir/{split} and
without suffix (mmseg's `ann_file`): only those pairs are used, and other masks are allowed.
Without one, every image needs its mask and every mask its image.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from segnext_jax.data import files
from segnext_jax.data.ade20k_classes import ADE20K
from segnext_jax.data.cityscapes_classes import CITYSCAPES
from segnext_jax.data.coco_stuff_classes import COCO_STUFF
from segnext_jax.data.files import DataError, MissingDataError
from segnext_jax.data.isaid_classes import ISAID

SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a split's images and masks live under the root, and what the mask values mean."""
  img_dir: str                 # "{split}" is replaced by the split's folder name
  ann_dir: str
  folders: tuple[str, str]     # folder names of our splits "train" and "val"
  img_suffix: str
  seg_map_suffix: str
  classes: tuple = ()          # rows (name, RGB[, raw id]) of a *_classes table
  reduce_zero_label: bool = False
  raw_seg_map_suffix: str = ""  # used when no seg_map_suffix mask exists: raw ids (row[2])


LAYOUTS = {
  "ade20k": Layout("images/{split}", "annotations/{split}", ("training", "validation"),
                   ".jpg", ".png", ADE20K, reduce_zero_label=True),
  "cityscapes": Layout("leftImg8bit/{split}", "gtFine/{split}", ("train", "val"),
                       "_leftImg8bit.png", "_gtFine_labelTrainIds.png", CITYSCAPES,
                       raw_seg_map_suffix="_gtFine_labelIds.png"),
  "coco_stuff": Layout("images/{split}", "annotations/{split}", ("train2017", "val2017"),
                       ".jpg", "_labelTrainIds.png", COCO_STUFF, raw_seg_map_suffix=".png"),
  # mmseg's isaid converter: 896x896 patches (BMP data under .png names), class-id mask PNGs
  "isaid": Layout("img_dir/{split}", "ann_dir/{split}", ("train", "val"), ".png",
                  "_instance_color_RGB.png", ISAID),
  "folder": Layout("img_dir/{split}", "ann_dir/{split}", ("train", "val"), ".jpg", ".png"),
}
FOLDER_KEYS = ("classes", "palette", "img_suffix", "seg_map_suffix", "reduce_zero_label", "split")


def list_names(folder: Path, suffix: str) -> list[str]:
  """Sorted paths under `folder` (recursive, posix, relative) of files ending in suffix, cut."""
  names = []
  for dirpath, _, filenames in os.walk(folder, followlinks=True):
    rel = Path(dirpath).relative_to(folder)
    names += [(rel / f).as_posix()[:-len(suffix)] for f in filenames if f.endswith(suffix)]
  return sorted(names)


class FolderDataset:
  """One split of a LAYOUTS-style tree; `ds[i] -> (RGB uint8 (H,W,3), uint8 label (H,W))`."""

  def __init__(self, root: str | Path, split: str, layout: Layout, split_file: Path | None = None):
    self.root, self.layout = Path(root), layout
    folder = layout.folders[SPLITS.index(split)]
    self.img_dir = self.root / layout.img_dir.format(split=folder)
    self.ann_dir = self.root / layout.ann_dir.format(split=folder)
    for d in (self.img_dir, self.ann_dir):
      if not d.is_dir():
        raise MissingDataError(f"{d}: missing folder (expected {layout.img_dir} and "
                               f"{layout.ann_dir} under {self.root})")
    self.names = self._image_names(split_file)
    seg_suffix, raw_ids = self._pair_masks(split_file is None)
    self.images = [self.img_dir / (n + layout.img_suffix) for n in self.names]
    self.masks = [self.ann_dir / (n + seg_suffix) for n in self.names]
    self.class_names = tuple(row[0] for row in layout.classes)
    self.palette = np.array([row[1] for row in layout.classes], np.uint8).reshape(-1, 3)
    self.num_classes = len(self.class_names)
    self.lut = files.label_lut(layout.reduce_zero_label, raw_ids)
    self._warned = False

  def _image_names(self, split_file: Path | None) -> list[str]:
    suffix = self.layout.img_suffix
    found = list_names(self.img_dir, suffix)
    if split_file is None:
      if not found:
        raise MissingDataError(f"{self.img_dir}: no *{suffix} images")
      return found
    names = read_split_file(split_file)
    missing = sorted(set(names) - set(found))
    if missing:
      raise MissingDataError(f"{self.img_dir / (missing[0] + suffix)}: listed in {split_file} "
                             f"but missing ({len(missing)} missing)")
    return names

  def _pair_masks(self, exclusive: bool) -> tuple[str, tuple[int, ...]]:
    """The mask suffix and raw ids in use; every image has a mask (and, if exclusive, back)."""
    suffix, raw_ids = self.layout.seg_map_suffix, ()
    masks = set(list_names(self.ann_dir, suffix))
    raw_masks = set(list_names(self.ann_dir, self.layout.raw_seg_map_suffix)) if (
        not masks and self.layout.raw_seg_map_suffix) else set()
    if raw_masks:
      suffix, raw_ids, masks = (self.layout.raw_seg_map_suffix,
                                tuple(row[2] for row in self.layout.classes), raw_masks)
      logging.info("%s: no *%s masks; mapping the raw ids of *%s", self.ann_dir,
                   self.layout.seg_map_suffix, suffix)
    missing = [n for n in self.names if n not in masks]
    if missing:
      raise MissingDataError(f"{self.ann_dir / (missing[0] + suffix)}: missing mask of "
                             f"{self.img_dir / (missing[0] + self.layout.img_suffix)} "
                             f"({len(missing)} masks missing)")
    extra = sorted(masks - set(self.names)) if exclusive else []
    if extra:
      raise DataError(f"{self.ann_dir / (extra[0] + suffix)}: mask with no image (expected "
                      f"{self.img_dir / (extra[0] + self.layout.img_suffix)}; {len(extra)} such)")
    return suffix, raw_ids

  def __len__(self) -> int:
    return len(self.images)

  def name(self, i: int) -> str:
    return self.names[i]

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    img, label, hist = files.load_pair(self.images[i], self.masks[i], self.lut, self.num_classes,
                                       str(self.images[i]), str(self.masks[i]))
    if self.num_classes == 2 and not self._warned:
      self._warned = files.warn_if_binary_255(hist, 2, str(self.masks[i]))
    return img, label

  def validate(self, workers: int | None = None, decode_images: bool = False) -> None:
    """Check every pair (image header or full decode, mask values, sizes) with threads;
    raise DataError naming the first bad file in order."""
    check = files.load_pair if decode_images else files.scan_pair
    def one(i: int) -> np.ndarray:
      out = check(self.images[i], self.masks[i], self.lut, self.num_classes,
                  str(self.images[i]), str(self.masks[i]))
      return out[2] if decode_images else out
    total, start = np.zeros(256), time.perf_counter()
    pool = cf.ThreadPoolExecutor(workers or min(32, 2 * (os.cpu_count() or 1)))
    try:
      for hist in pool.map(one, range(len(self))):
        total += hist
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
    logging.info("%s: %d image/mask pairs checked in %.1fs", self.img_dir, len(self),
                 time.perf_counter() - start)
    files.warn_if_binary_255(total, self.num_classes, str(self.ann_dir))


def read_split_file(path: Path) -> list[str]:
  try:
    lines = Path(path).read_text().splitlines()
  except OSError as e:
    raise MissingDataError(f"{path}: cannot read split file ({e.strerror})") from None
  return [line.strip() for line in lines if line.strip()]


def default_palette(n: int) -> list[list[int]]:
  """Fixed pseudo-random colours for n classes without a palette (a classes.json without one, a
  checkpoint without one): none darker than 40, so each stays visible on an overlay."""
  return np.random.default_rng(0).integers(40, 256, (n, 3)).tolist()


def folder_layout(root: Path) -> tuple[Layout, dict[str, Path]]:
  """The `folder:` layout and split files from PATH/classes.json; DataError names the file."""
  path = root / "classes.json"
  try:
    cfg = json.loads(path.read_text())
  except FileNotFoundError:
    raise MissingDataError(f'{path}: missing; write {{"classes": [names], "palette": '
                           '[[r, g, b], ...]}') from None
  except (ValueError, OSError) as e:
    raise DataError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from None
  if not isinstance(cfg, dict):
    raise DataError(f"{path}: expected a JSON object with keys {FOLDER_KEYS}")
  unknown = sorted(set(cfg) - set(FOLDER_KEYS))
  if unknown:
    raise DataError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(FOLDER_KEYS)}")
  classes = _checked_classes(cfg.get("classes"), path)
  palette = cfg.get("palette") or default_palette(len(classes))
  palette = _checked_palette(palette, len(classes), path)
  splits = cfg.get("split", {})
  if not isinstance(splits, dict) or not set(splits) <= set(SPLITS):
    raise DataError(f'{path}: "split" must map train/val to split files, got {splits!r}')
  base = LAYOUTS["folder"]
  layout = dataclasses.replace(
      base, classes=tuple(zip(classes, palette)),
      img_suffix=_checked(cfg, "img_suffix", str, base.img_suffix, path),
      seg_map_suffix=_checked(cfg, "seg_map_suffix", str, base.seg_map_suffix, path),
      reduce_zero_label=_checked(cfg, "reduce_zero_label", bool, False, path))
  return layout, {k: root / v for k, v in splits.items()}


def _checked(cfg: dict, key: str, kind: type, default, path: Path):
  value = cfg.get(key, default)
  if not isinstance(value, kind) or (kind is str and not value):
    raise DataError(f"{path}: {key!r} must be a {'non-empty ' * (kind is str)}{kind.__name__}, "
                    f"got {value!r}")
  return value


def _checked_classes(classes, path: Path) -> list[str]:
  if (not isinstance(classes, list) or not classes or len(classes) > 255
      or not all(isinstance(c, str) for c in classes)):
    raise DataError(f'{path}: "classes" must be a list of 1 to 255 names (255 is the ignore label)')
  return classes


def _checked_palette(palette, n: int, path: Path) -> list[tuple[int, int, int]]:
  ok = isinstance(palette, list) and len(palette) == n and all(
      isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
      for c in palette)
  if not ok:
    raise DataError(f'{path}: "palette" must be {n} [r, g, b] lists of 0..255, one per class')
  return [tuple(c) for c in palette]


def folder_dataset(kind: str, root: str | Path, split: str) -> FolderDataset:
  """`kind:PATH` for a LAYOUTS kind; `folder` reads PATH/classes.json."""
  root = Path(root).expanduser()
  if not root.is_dir():
    raise MissingDataError(f"{root}: no such folder (--data {kind}:PATH)")
  if kind != "folder":
    return FolderDataset(root, split, LAYOUTS[kind])
  layout, split_files = folder_layout(root)
  return FolderDataset(root, split, layout, split_files.get(split))
