"""`--data` specs -> datasets, their recipe defaults, and the pre-training data check.

Specs: `synthetic`, `folder:PATH` (mmseg custom layout, see folder.py), `ade20k:PATH`,
`cityscapes:PATH`, `coco_stuff:PATH`, `isaid:PATH`, `voc:PATH`, `pascal_context:PATH` (59
classes), `pascal_context60:PATH` (see voc.py), `tfds:ade20k_semantic[:DATA_DIR]`. Each dataset has
`num_classes`, `class_names`, `palette` ((N, 3) uint8 RGB), `len(ds)` and
`ds[i] -> (RGB uint8 (H, W, 3), uint8 label (H, W))`, 255 = ignore.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from segnext_jax.data.files import DataError, DataWarning, MissingDataError, read_image
from segnext_jax.data.folder import LAYOUTS, SPLITS, FolderDataset, folder_dataset
from segnext_jax.data.synthetic import Synthetic
from segnext_jax.data.voc import DEVKIT_LAYOUTS, devkit_dataset

__all__ = ["DATASET_DEFAULTS", "DataError", "DataWarning", "FolderDataset", "MissingDataError",
           "SegDataset", "Synthetic", "check", "dataset_kind", "make_dataset", "read_image"]

TFDS_NAME = "ade20k_semantic"
SCENE_PARSE150_REFUSAL = (
    "tfds:scene_parse150 is refused: tensorflow-datasets 4.9.10's scene_parse150 builder downloads "
    "the 2017 Places Challenge annotations_instance.tar, whose R channel is the instance task's "
    "100-category id, not the 150-class semantic label, and whose splits are train/test (no "
    "validation); use ade20k:/path/ADEChallengeData2016, or prepare our builder once (python -m "
    "segnext_jax.data.tfds_ade20k --manual_dir DIR_WITH_ZIP) and use "
    "tfds:ade20k_semantic[:DATA_DIR]")

# Recipe defaults per dataset kind (keys: TrainConfig's crop_size/resize_scale/steps; the rest
# for the train pipeline and EvalConfig). Sizes: crop (square side), scales (long, short);
# eval_crop/eval_stride only matter for eval_mode 'slide' (stride = 2/3 crop, mmseg's habit).
_PIPELINE = dict(ratio_range=(0.5, 2.0), cat_max_ratio=0.75)  # every mmseg/SegNeXt config
DATASET_DEFAULTS = {
  # mmseg 1.x configs/_base_/datasets/ade20k.py and segnext_mscan-*_1xb16-adamw-160k_ade20k-512x512
  "ade20k": dict(crop_size=512, resize_scale=(2048, 512), eval_scale=(2048, 512),
                 eval_mode="whole", eval_crop=(512, 512), eval_stride=(341, 341),
                 steps=160_000, **_PIPELINE),
  # SegNeXt local_configs/segnext/*/segnext.*.1024x1024.city.160k.py (crop 1024, test_cfg slide
  # crop (1024, 1024) stride (768, 768)); scales as mmseg _base_/datasets/cityscapes_1024x1024.py
  "cityscapes": dict(crop_size=1024, resize_scale=(2048, 1024), eval_scale=(2048, 1024),
                     eval_mode="slide", eval_crop=(1024, 1024), eval_stride=(768, 768),
                     steps=160_000, **_PIPELINE),
  # SegNeXt segnext.*.512x512.coco_stuff164k.80k.py (test_cfg whole, 80k iters); crop and scales
  # as mmseg _base_/datasets/coco-stuff164k.py
  "coco_stuff": dict(crop_size=512, resize_scale=(2048, 512), eval_scale=(2048, 512),
                     eval_mode="whole", eval_crop=(512, 512), eval_stride=(341, 341),
                     steps=80_000, **_PIPELINE),
  # Pascal VOC 2012 + SBD aug: crop, scales as mmseg 1.x _base_/datasets/pascal_voc12_aug.py
  # (RandomResize/Resize scale (2048, 512), crop (512, 512)); 80k iters and batch 16: SegNeXt paper
  # Sec. 4 and appendix Tab. 1 (trainaug; its test-server runs fine-tune 80k more on trainval);
  # eval whole, as every SegNeXt config's test_cfg
  "voc": dict(crop_size=512, resize_scale=(2048, 512), eval_scale=(2048, 512),
              eval_mode="whole", eval_crop=(512, 512), eval_stride=(341, 341),
              steps=80_000, **_PIPELINE),
  # Pascal Context 59: crop 480, scales (520, 520) as mmseg 1.x _base_/datasets/pascal_context_59.py;
  # 80k iters, batch 16: SegNeXt paper Sec. 4 and appendix Tab. 1; eval whole (SegNeXt test_cfg)
  "pascal_context": dict(crop_size=480, resize_scale=(520, 520), eval_scale=(520, 520),
                         eval_mode="whole", eval_crop=(480, 480), eval_stride=(320, 320),
                         steps=80_000, **_PIPELINE),
  # Pascal Context 60: the same recipe, mmseg 1.x _base_/datasets/pascal_context.py
  "pascal_context60": dict(crop_size=480, resize_scale=(520, 520), eval_scale=(520, 520),
                           eval_mode="whole", eval_crop=(480, 480), eval_stride=(320, 320),
                           steps=80_000, **_PIPELINE),
  # iSAID: crop 896, scales (896, 896) as mmseg 1.x _base_/datasets/isaid.py; 160k iters, batch 16,
  # test_cfg whole: JSeg project/segnext/*/segnext_*_896x896_isaid_160k.py, paper appendix Tab. 1
  "isaid": dict(crop_size=896, resize_scale=(896, 896), eval_scale=(896, 896),
                eval_mode="whole", eval_crop=(896, 896), eval_stride=(597, 597),
                steps=160_000, **_PIPELINE),
  # custom data: the ADE20K recipe, which mmseg's custom-dataset tutorial starts from
  "folder": dict(crop_size=512, resize_scale=(2048, 512), eval_scale=(2048, 512),
                 eval_mode="whole", eval_crop=(512, 512), eval_stride=(341, 341),
                 steps=160_000, **_PIPELINE),
  # 128 px procedural scenes: a few-minute CPU run (TrainConfig.for_data("synthetic"))
  "synthetic": dict(crop_size=128, resize_scale=(512, 128), eval_scale=(512, 128),
                    eval_mode="whole", eval_crop=(128, 128), eval_stride=(85, 85),
                    steps=300, **_PIPELINE),
}


class SegDataset(Protocol):
  num_classes: int
  class_names: Sequence[str]
  palette: np.ndarray

  def __len__(self) -> int: ...

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...


def _parse(spec: str) -> tuple[str, str]:
  """(kind, argument) of a spec; ValueError (one line) for what no dataset reads."""
  kind, _, arg = spec.partition(":")
  if kind == "tfds":
    name = arg.partition(":")[0]
    if name == "scene_parse150":
      raise ValueError(SCENE_PARSE150_REFUSAL)
    if name != TFDS_NAME:
      raise ValueError(f"unsupported tfds dataset {name!r}; use tfds:{TFDS_NAME}[:DATA_DIR]")
    return kind, arg
  if kind == "synthetic" and not arg:
    return kind, arg
  if kind in LAYOUTS or kind in DEVKIT_LAYOUTS:
    if not arg:
      raise ValueError(f"{kind} needs a path: --data {kind}:PATH")
    return kind, arg
  raise ValueError(f"unknown dataset {spec!r}; use synthetic, folder:PATH, ade20k:PATH, "
                   "cityscapes:PATH, coco_stuff:PATH, isaid:PATH, voc:PATH, pascal_context:PATH, "
                   f"pascal_context60:PATH or tfds:{TFDS_NAME}[:DATA_DIR]")


def dataset_kind(spec: str) -> str:
  """The DATASET_DEFAULTS key of a spec: tfds:ade20k_semantic is 'ade20k'."""
  kind, _ = _parse(spec)
  return "ade20k" if kind == "tfds" else kind


def make_dataset(spec: str, split: str) -> SegDataset:
  """The `split` ('train' or 'val') of a --data spec."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  kind, arg = _parse(spec)
  if kind == "synthetic":
    return Synthetic(length=2000 if split == "train" else 64, split=split)
  if kind == "tfds":
    try:
      from segnext_jax.data.tfds_ade20k import TFDSADE20K
    except ModuleNotFoundError as e:
      raise ImportError(f"tfds:{TFDS_NAME} needs tensorflow-datasets ({e}): "
                        "pip install -e .[tfds]") from None
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
