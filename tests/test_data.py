"""Data: the ADE20K folder reader on a generated tree, the train pipeline, the loader."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from segnext_jax.data.datasets import ADE20KFolder, Synthetic, make_dataset, read_image
from segnext_jax.data.loader import TrainLoader, batch_indices
from segnext_jax.data.transforms import (TrainPipeline, random_crop, reduce_zero_label,
                                         rescale_size)


def make_ade_tree(root, n: int = 3, split: str = "training", seed: int = 0):
  """A tiny ADEChallengeData2016 layout: images/{split}/*.jpg, annotations/{split}/*.png."""
  rng = np.random.default_rng(seed)
  (root / "images" / split).mkdir(parents=True, exist_ok=True)
  (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
  labels = []
  for i in range(n):
    h, w = 40 + 7 * i, 56 + 5 * i
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    lbl = rng.integers(0, 151, (h, w)).astype(np.uint8)
    cv2.imwrite(str(root / "images" / split / f"ADE_{split}_{i:08d}.jpg"), img)
    cv2.imwrite(str(root / "annotations" / split / f"ADE_{split}_{i:08d}.png"), lbl)
    labels.append(lbl)
  return labels


def test_ade_folder_reads_and_reduces_zero_label(tmp_path):
  labels = make_ade_tree(tmp_path)
  ds = make_dataset(f"ade20k:{tmp_path}", "train")
  assert isinstance(ds, ADE20KFolder) and len(ds) == 3 and ds.num_classes == 150
  img, lbl = ds[1]
  assert img.shape == (47, 61, 3) and img.dtype == np.uint8 and lbl.shape == (47, 61)
  raw = labels[1]
  assert np.all(lbl[raw == 0] == 255) and np.array_equal(lbl[raw > 0], raw[raw > 0] - 1)
  assert ds.class_names[0] == "wall"


def test_ade_folder_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="images/validation: missing"):
    make_dataset(f"ade20k:{tmp_path}", "val")
  make_ade_tree(tmp_path, n=1)
  next((tmp_path / "annotations" / "training").glob("*.png")).unlink()
  with pytest.raises(FileNotFoundError, match="1 annotations missing"):
    ADE20KFolder(tmp_path)
  with pytest.raises(ValueError, match="unknown dataset"):
    make_dataset("coco:/x", "train")


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match="scene_parse150 .* is not prepared"):
    make_dataset(f"tfds:scene_parse150:{tmp_path}", "val")


def test_read_image_converts_gray_and_rgba(tmp_path):
  cv2.imwrite(str(tmp_path / "g.png"), np.full((5, 6), 77, np.uint8))
  rgba = np.zeros((5, 6, 4), np.uint8)
  rgba[..., 2] = 200  # red in BGRA
  cv2.imwrite(str(tmp_path / "a.png"), rgba)
  assert read_image(tmp_path / "g.png").shape == (5, 6, 3)
  assert tuple(read_image(tmp_path / "a.png")[0, 0]) == (200, 0, 0)
  (tmp_path / "bad.jpg").write_text("not an image")
  with pytest.raises(ValueError, match="bad.jpg: not a readable image"):
    read_image(tmp_path / "bad.jpg")


def test_rescale_size_fits_scale():
  assert rescale_size((512, 683), (2048, 512)) == (512, 683)
  assert rescale_size((300, 400), (2048, 512)) == (512, 683)
  assert rescale_size((100, 1000), (2048, 512)) == (205, 2048)  # long side capped


def test_random_crop_respects_cat_max_ratio():
  label = np.zeros((100, 100), np.uint8)
  label[:, 80:] = 1  # a crop of 50x50 is all class 0 unless it reaches column 80
  rng = np.random.default_rng(0)
  _, lbl = random_crop(np.zeros((100, 100, 3)), label, rng, (50, 50), cat_max_ratio=0.75)
  counts = np.bincount(lbl.ravel())
  assert len(counts) == 2 and counts.max() / counts.sum() < 0.75


def test_train_pipeline_deterministic_and_padded():
  img, lbl = Synthetic(size=96)[0]
  pipe = TrainPipeline(crop=(128, 128), scale=(256, 64))  # resized image smaller than crop
  a = pipe(img, lbl, np.random.default_rng([1, 2]))
  b = pipe(img, lbl, np.random.default_rng([1, 2]))
  c = pipe(img, lbl, np.random.default_rng([1, 3]))
  assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  assert a[0].shape == (128, 128, 3) and a[0].dtype == np.float32
  assert a[1][-1, -1] == 255 and a[0][-1, -1].tolist() == [0, 0, 0]  # padded
  assert set(np.unique(a[1])) <= set(range(6)) | {255}


def test_loader_is_a_function_of_seed_and_step():
  ds = Synthetic(length=20, size=64)
  pipe = TrainPipeline(crop=(64, 64), scale=(128, 64))
  a = TrainLoader(ds, pipe, 4, seed=0, start_step=0, workers=2)
  first = [b for _, (_, b) in zip(range(4), a)]
  a.close()
  b = TrainLoader(ds, pipe, 4, seed=0, start_step=2, workers=2)
  step, batch = next(iter(b))
  b.close()
  assert step == 2 and np.array_equal(batch["image"], first[2]["image"])
  half = TrainLoader(ds, pipe, 4, seed=0, start_step=2, workers=1, process_index=1, process_count=2)
  _, shard = next(iter(half))
  half.close()
  assert np.array_equal(shard["label"], first[2]["label"][2:])
  epoch = np.concatenate([batch_indices(20, 4, s, 0) for s in range(5)])
  assert sorted(epoch) == list(range(20))
