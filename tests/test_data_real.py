"""The released-checkpoint datasets: ADE20K and Cityscapes on real files (tests/data), COCO-Stuff
on a generated tree in mmseg's layout; labels checked against the PNGs and the class tables."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segnext_jax.data.coco_stuff_classes import COCO_STUFF
from segnext_jax.data.datasets import DataError, MissingDataError, check, make_dataset

DATA = Path(__file__).parent / "data"
ADE, CITY = DATA / "ade20k_val3", DATA / "cityscapes_val1"
CITY_STEM = "frankfurt/frankfurt_000000_000294"


def png(path: Path) -> np.ndarray:
  return np.asarray(Image.open(path))


def test_ade20k_labels_are_reduce_zero_label_of_the_pngs():
  ds = make_dataset(f"ade20k:{ADE}", "val")
  assert len(ds) == 3 and ds.num_classes == 150 and ds.palette.shape == (150, 3)
  assert ds.class_names[:3] == ("wall", "building", "sky")
  sizes = []
  for i, name in enumerate(["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]):
    img, lbl = ds[i]
    raw = png(ADE / "annotations" / "validation" / f"{name}.png")
    jpg = cv2.imread(str(ADE / "images" / "validation" / f"{name}.jpg"), cv2.IMREAD_COLOR)
    assert ds.name(i) == name and np.array_equal(img, jpg[..., ::-1])
    assert lbl.dtype == np.uint8 and np.all(lbl[raw == 0] == 255)
    assert np.array_equal(lbl[raw > 0], raw[raw > 0] - 1)
    sizes.append(img.shape[:2])
  assert sizes == [(512, 683), (364, 500), (300, 400)]
  check(ds)
  with pytest.raises(MissingDataError, match="images/training: missing folder"):
    make_dataset(f"ade20k:{ADE}", "train")


def test_cityscapes_labels_are_train_ids():
  ds = make_dataset(f"cityscapes:{CITY}", "val")
  assert len(ds) == 1 and ds.num_classes == 19 and ds.name(0) == CITY_STEM
  assert ds.class_names[0] == "road" and tuple(ds.palette[0]) == (128, 64, 128)
  img, lbl = ds[0]
  assert img.shape == (128, 256, 3)
  want = png(CITY / "gtFine" / "val" / f"{CITY_STEM}_gtFine_labelTrainIds.png")
  assert np.array_equal(lbl, want)
  assert set(np.unique(lbl)) <= set(range(19)) | {255} and (lbl == 255).any()
  check(ds)


def test_cityscapes_label_ids_map_through_the_class_table(tmp_path):
  root = tmp_path / "city"
  shutil.copytree(CITY, root)
  train_ids = root / "gtFine" / "val" / f"{CITY_STEM}_gtFine_labelTrainIds.png"
  want = png(train_ids)
  train_ids.unlink()  # only *_gtFine_labelIds.png left: mapped by the table's labelId column
  ds = make_dataset(f"cityscapes:{root}", "val")
  assert ds.masks[0].name.endswith("_gtFine_labelIds.png")
  raw, got = png(ds.masks[0]), ds[0][1]
  # the sample's two PNGs were downsized separately, so object borders differ by a pixel: each
  # labelId's majority trainId must be the table's, and 99% of pixels agree
  for label_id in np.unique(raw):
    assert ds.lut[label_id] == np.bincount(want[raw == label_id], minlength=256).argmax()
  assert (got == want).mean() > 0.99 and np.array_equal(got, ds.lut[raw])


def make_coco_tree(root: Path, raw_maps: bool = True, train_ids: bool = True) -> list:
  """mmseg's COCO-Stuff 164k layout; raw stuffthingmaps (NAME.png) beside *_labelTrainIds.png."""
  rng = np.random.default_rng(0)
  raw_ids = np.array([r[2] for r in COCO_STUFF] + [255])
  labels = []
  for split in ("train2017", "val2017"):
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    for i in range(2):
      name = f"{i + 139 * (split == 'val2017'):012d}"
      train = rng.integers(0, 172, (24, 32)).astype(np.uint8)
      train[train == 171] = 255
      raw = np.where(train == 255, 255, raw_ids[np.minimum(train, 170)]).astype(np.uint8)
      img = rng.integers(0, 255, (24, 32, 3), np.uint8)
      cv2.imwrite(str(root / "images" / split / f"{name}.jpg"), img)
      if train_ids:
        Image.fromarray(train).save(root / "annotations" / split / f"{name}_labelTrainIds.png")
      if raw_maps:
        Image.fromarray(raw).save(root / "annotations" / split / f"{name}.png")
      labels.append(train)
  return labels


def test_coco_stuff_reads_train_ids(tmp_path):
  labels = make_coco_tree(tmp_path)
  ds = make_dataset(f"coco_stuff:{tmp_path}", "val")
  assert len(ds) == 2 and ds.num_classes == 171 and ds.palette.shape == (171, 3)
  assert ds.class_names[0] == "person" and ds.class_names[-1] == "wood"
  assert ds.name(0) == "000000000139" and np.array_equal(ds[0][1], labels[2])
  assert len(make_dataset(f"coco_stuff:{tmp_path}", "train")) == 2
  check(ds)


def test_coco_stuff_raw_maps_follow_mmsegs_converter(tmp_path):
  labels = make_coco_tree(tmp_path, train_ids=False)
  ds = make_dataset(f"coco_stuff:{tmp_path}", "train")
  for i in range(2):
    assert np.array_equal(ds[i][1], labels[i])
  # mmseg's coco_stuff164k.py: raw 0..10 -> 0..10, 12 -> 11, 181 -> 170; unused 11 -> ignore
  raw = np.array([[0, 10, 12, 26, 181, 255, 11, 91]], np.uint8)
  assert ds.lut[raw].tolist() == [[0, 10, 11, 24, 170, 255, 255, 80]]


def test_coco_stuff_bad_train_id_names_the_file(tmp_path):
  make_coco_tree(tmp_path)
  bad = tmp_path / "annotations" / "val2017" / "000000000140_labelTrainIds.png"
  Image.fromarray(np.full((24, 32), 171, np.uint8)).save(bad)
  ds = make_dataset(f"coco_stuff:{tmp_path}", "val")
  with pytest.raises(DataError, match=f"{bad}: label value 171 >= num_classes 171"):
    check(ds)
  with pytest.raises(DataError, match=str(bad)):
    ds[1]
