"""`folder:PATH` (mmseg's custom layout) on generated trees, and one test per kind of bad data:
each raises a one-line DataError naming the file, from make_dataset, check() or ds[i]."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segnext_jax.data.datasets import (DataError, DataWarning, MissingDataError, check,
                                       make_dataset)

CLASSES = ["sky", "road", "car"]
PALETTE = [[70, 130, 180], [128, 64, 128], [0, 0, 142]]


def make_tree(root: Path, n: int = 3, classes=CLASSES, **cfg) -> dict[str, np.ndarray]:
  """img_dir/{train,val}/*.jpg + ann_dir/{train,val}/*.png + classes.json; returns the labels."""
  rng = np.random.default_rng(0)
  img_suffix, seg_suffix = cfg.get("img_suffix", ".jpg"), cfg.get("seg_map_suffix", ".png")
  labels = {}
  for split in ("train", "val"):
    for i in range(n):
      name = f"{split}/img{i}" if i else f"{split}/sub/img{i}"  # searched recursively
      h, w = 20 + i, 30 + 2 * i
      lbl = rng.integers(0, len(classes), (h, w)).astype(np.uint8)
      lbl[0, :5] = 255
      write(root / "img_dir" / f"{name}{img_suffix}", rng.integers(0, 255, (h, w, 3), np.uint8))
      write(root / "ann_dir" / f"{name}{seg_suffix}", lbl)
      labels[name] = lbl
  cfg = {"classes": list(classes), "palette": PALETTE[:len(classes)], **cfg}
  (root / "classes.json").write_text(json.dumps(cfg))
  return labels


def write(path: Path, arr: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  cv2.imwrite(str(path), arr)


def bad(root: Path, *, match: str, on: str = "check", error=DataError):
  """Assert the error (one line, naming the file) from make_dataset, check(ds) or ds[i]."""
  with pytest.raises(error) as e:
    ds = make_dataset(f"folder:{root}", "val")
    if on == "check":
      check(ds)
    else:
      [ds[i] for i in range(len(ds))]
  assert "\n" not in str(e.value), str(e.value)
  assert match in str(e.value), str(e.value)


def test_folder_reads_masks_as_class_indices(tmp_path):
  labels = make_tree(tmp_path)
  ds = make_dataset(f"folder:{tmp_path}", "val")
  assert ds.num_classes == 3 and ds.class_names == tuple(CLASSES)
  assert ds.palette.dtype == np.uint8 and ds.palette.tolist() == PALETTE
  assert [ds.name(i) for i in range(len(ds))] == ["img1", "img2", "sub/img0"]
  for i in range(len(ds)):
    img, lbl = ds[i]
    assert img.shape == (*lbl.shape, 3) and img.dtype == np.uint8
    assert np.array_equal(lbl, labels[f"val/{ds.name(i)}"])
  check(ds)
  assert len(make_dataset(f"folder:{tmp_path}", "train")) == 3


def test_folder_options_suffixes_reduce_zero_label_and_split_file(tmp_path):
  make_tree(tmp_path, classes=CLASSES[:2], img_suffix=".png", seg_map_suffix="_mask.png",
            reduce_zero_label=True, split={"val": "splits/val.txt"})
  (tmp_path / "splits").mkdir()
  (tmp_path / "splits" / "val.txt").write_text("img2\nsub/img0\n\n")
  ds = make_dataset(f"folder:{tmp_path}", "val")
  assert len(ds) == 2 and ds.images[0].name == "img2.png" and ds.masks[0].name == "img2_mask.png"
  raw = np.asarray(Image.open(ds.masks[0]))
  want = np.where((raw == 0) | (raw == 255), 255, raw - 1)  # mmseg's: 255 stays ignore
  assert (raw == 255).any() and np.array_equal(ds[0][1], want)
  assert len(make_dataset(f"folder:{tmp_path}", "train")) == 3  # no split file: scanned
  (tmp_path / "splits" / "val.txt").write_text("img2\nnope\n")
  bad(tmp_path, match="img_dir/val/nope.png: listed in", error=MissingDataError)


def test_palette_and_grey_rgb_masks_give_indices(tmp_path):
  make_tree(tmp_path, n=1)
  mask = tmp_path / "ann_dir" / "val" / "sub" / "img0.png"
  lbl = np.asarray(Image.open(mask))
  p = Image.fromarray(lbl, mode="P")
  p.putpalette(sum(PALETTE, []) + [255] * (768 - 9))
  p.save(mask)
  ds = make_dataset(f"folder:{tmp_path}", "val")
  assert np.array_equal(ds[0][1], lbl)
  Image.fromarray(np.stack([lbl] * 3, -1)).save(mask)  # grey stored as RGB: one channel used
  assert np.array_equal(ds[0][1], lbl)
  check(ds)


def test_unreadable_image(tmp_path):
  make_tree(tmp_path)
  img = tmp_path / "img_dir" / "val" / "img1.jpg"
  img.write_bytes(b"\xff\xd8 not really a jpeg")
  bad(tmp_path, match=f"{img}: not a readable image")
  bad(tmp_path, match=f"{img}: not a readable image", on="item")


def test_missing_mask(tmp_path):
  make_tree(tmp_path)
  (tmp_path / "ann_dir" / "val" / "img2.png").unlink()
  bad(tmp_path, match=f"{tmp_path}/ann_dir/val/img2.png: missing mask of "
      f"{tmp_path}/img_dir/val/img2.jpg", error=MissingDataError)


def test_extra_mask(tmp_path):
  make_tree(tmp_path)
  write(tmp_path / "ann_dir" / "val" / "stray.png", np.zeros((4, 4), np.uint8))
  bad(tmp_path, match=f"{tmp_path}/ann_dir/val/stray.png: mask with no image")


def test_size_mismatch(tmp_path):
  make_tree(tmp_path)
  mask = tmp_path / "ann_dir" / "val" / "img1.png"
  write(mask, np.zeros((21, 33), np.uint8))
  bad(tmp_path, match=f"{mask}: mask is 33x21 (WxH) but its image is 32x21")
  bad(tmp_path, match=f"{mask}: mask is 33x21", on="item")


def test_label_out_of_range_and_first_bad_file_named(tmp_path):
  make_tree(tmp_path)
  for name in ("img2", "img1"):
    lbl = np.asarray(Image.open(tmp_path / "ann_dir" / "val" / f"{name}.png")).copy()
    lbl[3, 3] = 3
    write(tmp_path / "ann_dir" / "val" / f"{name}.png", lbl)
  first = tmp_path / "ann_dir" / "val" / "img1.png"
  bad(tmp_path, match=f"{first}: label value 3 >= num_classes 3 and not 255")
  bad(tmp_path, match=f"{first}: label value 3", on="item")


def test_unreadable_or_colour_mask(tmp_path):
  make_tree(tmp_path)
  mask = tmp_path / "ann_dir" / "val" / "img1.png"
  mask.write_bytes(b"garbage")
  bad(tmp_path, match=f"{mask}: not a readable mask")
  write(mask, np.random.default_rng(0).integers(0, 3, (21, 32, 3), np.uint8))
  bad(tmp_path, match=f"{mask}: mask has 3 different channels")


def test_two_class_masks_stored_as_0_255_warn(tmp_path):
  make_tree(tmp_path, classes=CLASSES[:2])
  for mask in (tmp_path / "ann_dir" / "val").rglob("*.png"):
    lbl = np.asarray(Image.open(mask))
    write(mask, np.where(lbl == 1, 255, lbl).astype(np.uint8))
  ds = make_dataset(f"folder:{tmp_path}", "val")
  with pytest.warns(DataWarning, match="255 is the ignore label"):
    check(ds)
  with pytest.warns(DataWarning, match="255 is the ignore label"):
    ds[0]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ds[1]  # once per dataset
    make_tree(tmp_path / "ok", classes=CLASSES[:2])
    check(make_dataset(f"folder:{tmp_path / 'ok'}", "val"))


@pytest.mark.parametrize("cfg, match", [
    ({"classes": ["a"], "palette": [[1, 2, 3]], "reduce_zero_labels": True}, "unknown key"),
    ({"classes": ["a", "b"], "palette": [[1, 2, 3]]}, '"palette" must be 2'),
    ({"classes": "ab"}, '"classes" must be a list'),
    ({"classes": ["a"], "img_suffix": 3}, "'img_suffix' must be a non-empty str"),
    ({"classes": ["a"], "split": {"test": "t.txt"}}, '"split" must map train/val'),
])
def test_bad_classes_json(tmp_path, cfg, match):
  make_tree(tmp_path, n=1)
  (tmp_path / "classes.json").write_text(json.dumps(cfg))
  bad(tmp_path, match=f"{tmp_path}/classes.json: {match}", on="make")
  (tmp_path / "classes.json").write_text("{not json")
  bad(tmp_path, match=f"{tmp_path}/classes.json: not readable JSON", on="make")
  (tmp_path / "classes.json").unlink()
  bad(tmp_path, match=f"{tmp_path}/classes.json: missing", on="make", error=MissingDataError)


def test_palette_is_optional(tmp_path):
  make_tree(tmp_path, n=1)
  (tmp_path / "classes.json").write_text(json.dumps({"classes": CLASSES}))
  ds = make_dataset(f"folder:{tmp_path}", "val")
  assert ds.palette.shape == (3, 3) and ds.palette.dtype == np.uint8


def test_exif_rotated_image_checked_at_its_decoded_size(tmp_path):
  make_tree(tmp_path, n=1)
  img = Image.fromarray(np.zeros((30, 20, 3), np.uint8))  # stored 20x30 (WxH), shown 30x20
  exif = img.getexif()
  exif[0x0112] = 6
  img.save(tmp_path / "img_dir" / "val" / "sub" / "img0.jpg", exif=exif.tobytes())
  write(tmp_path / "ann_dir" / "val" / "sub" / "img0.png", np.zeros((20, 30), np.uint8))
  ds = make_dataset(f"folder:{tmp_path}", "val")
  check(ds)
  assert ds[0][0].shape == (20, 30, 3)
  check(ds, decode_images=True)
