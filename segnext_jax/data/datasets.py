"""`--data` specs -> datasets, and the pre-training data check.

The spec kinds and their recipes are recipes.DATA_SPECS; `folder:PATH` is mmseg's custom
layout (folder.py), `pascal_context:PATH` has 59 classes and `pascal_context60:PATH` 60 (voc.py).
Each dataset has `num_classes`, `class_names`, `palette` ((N, 3) uint8 RGB), `len(ds)` and
`ds[i] -> (RGB uint8 (H, W, 3), uint8 label (H, W))`, 255 = ignore.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from segnext_jax.data.files import DataError, DataWarning, MissingDataError, read_image
from segnext_jax.data.folder import SPLITS, FolderDataset, folder_dataset
from segnext_jax.data.synthetic import Synthetic
from segnext_jax.data.voc import DEVKIT_LAYOUTS, devkit_dataset
from segnext_jax.errors import InputError, optional
from segnext_jax.recipes import parse_spec

__all__ = ["DataError", "DataWarning", "FolderDataset", "MissingDataError", "SegDataset", "Synthetic",
           "check", "make_dataset", "read_image"]

TFDS_NAME = "ade20k_semantic"
SCENE_PARSE150_REFUSAL = (
    "tfds:scene_parse150 is refused: tensorflow-datasets 4.9.10's scene_parse150 builder downloads "
    "the 2017 Places Challenge annotations_instance.tar, whose R channel is the instance task's "
    "100-category id, not the 150-class semantic label, and whose splits are train/test (no "
    "validation); use ade20k:/path/ADEChallengeData2016, or prepare our builder once (python -m "
    "segnext_jax.data.tfds_ade20k --manual_dir DIR_WITH_ZIP) and use "
    "tfds:ade20k_semantic[:DATA_DIR]")

class SegDataset(Protocol):
  num_classes: int
  class_names: Sequence[str]
  palette: np.ndarray

  def __len__(self) -> int: ...

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...


def _parse(spec: str) -> tuple[str, str]:
  """(kind, argument) of a spec (recipes.parse_spec), with the tfds builders this reads."""
  kind, arg = parse_spec(spec)
  if kind == "tfds":
    name = arg.partition(":")[0]
    if name == "scene_parse150":
      raise InputError(SCENE_PARSE150_REFUSAL)
    if name != TFDS_NAME:
      raise InputError(f"unsupported tfds dataset {name!r}; use tfds:{TFDS_NAME}[:DATA_DIR]")
  return kind, arg


def make_dataset(spec: str, split: str) -> SegDataset:
  """The `split` ('train' or 'val') of a --data spec."""
  if split not in SPLITS:
    raise InputError(f"split must be one of {SPLITS}, got {split!r}")
  kind, arg = _parse(spec)
  if kind == "synthetic":
    return Synthetic(length=2000 if split == "train" else 64, split=split)
  if kind == "tfds":
    optional("tensorflow_datasets", "tfds", f"tfds:{TFDS_NAME}")
    from segnext_jax.data.tfds_ade20k import TFDSADE20K
    data_dir = arg.partition(":")[2] or None
    return TFDSADE20K("train" if split == "train" else "validation", data_dir)
  if kind in DEVKIT_LAYOUTS:
    return devkit_dataset(kind, arg, split)
  return folder_dataset(kind, arg, split)


def check(dataset: SegDataset, workers: int | None = None, decode_images: bool = False) -> None:
  """Scan a whole split before training/eval; raise DataError naming the first bad file.

  Checks each image header (or full decode), mask readability, sizes and label values;
  warns (DataWarning) on 2-class masks stored as 0/255. Datasets without files pass."""
  validate = getattr(dataset, "validate", None)
  if validate is not None:
    validate(workers=workers, decode_images=decode_images)
