"""Data: specs, image reading, the train pipeline (also on real JPEGs), loader."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from segnext_jax.data.datasets import DataError, Synthetic, make_dataset, read_image
from segnext_jax.data.loader import TrainLoader, batch_indices
from segnext_jax.data.transforms import TrainPipeline, random_crop, reduce_zero_label, rescale_size

ADE = Path(__file__).parent / "data" / "ade20k_val3"


def test_scene_parse150_is_refused_with_the_reason():
  for spec in ("tfds:scene_parse150", "tfds:scene_parse150:/data"):
    with pytest.raises(ValueError) as e:
      make_dataset(spec, "val")
    msg = str(e.value)
    assert "\n" not in msg and "annotations_instance" in msg and "100-category" in msg
    assert "ade20k:" in msg and "tfds:ade20k_semantic" in msg


def test_bad_specs():
  for bad, msg in [("coco:/x", "unknown dataset"), ("ade20k", "needs a path"),
                   ("tfds:voc", "unsupported tfds"), ("synthetic:3", "unknown dataset")]:
    with pytest.raises(ValueError, match=msg):
      make_dataset(bad, "train")
  with pytest.raises(ValueError, match="split must be"):
    make_dataset("synthetic", "test")
  with pytest.raises(FileNotFoundError, match="no such folder"):
    make_dataset("cityscapes:/nonexistent/x", "val")


def test_synthetic_has_a_palette():
  ds = make_dataset("synthetic", "val")
  assert ds.palette.shape == (ds.num_classes, 3) and ds.palette.dtype == np.uint8
  assert len(ds.class_names) == ds.num_classes == 6


def test_read_image_converts_gray_alpha_and_exif(tmp_path):
  from PIL import Image
  cv2.imwrite(str(tmp_path / "g.png"), np.full((5, 6), 77, np.uint8))
  rgba = np.zeros((5, 6, 4), np.uint8)
  rgba[..., 2] = 200  # red in BGRA
  cv2.imwrite(str(tmp_path / "a.png"), rgba)
  assert read_image(tmp_path / "g.png").shape == (5, 6, 3)
  assert tuple(read_image(tmp_path / "a.png")[0, 0]) == (200, 0, 0)
  im = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
  exif = im.getexif()
  exif[0x0112] = 6  # rotated 90 degrees: mmseg (cv2 IMREAD_COLOR) applies it
  im.save(tmp_path / "r.jpg", exif=exif.tobytes())
  assert read_image(tmp_path / "r.jpg").shape == (40, 20, 3)
  (tmp_path / "bad.jpg").write_text("not an image")
  with pytest.raises(DataError, match="bad.jpg: not a readable image"):
    read_image(tmp_path / "bad.jpg")


def test_reduce_zero_label_is_mmsegs():
  raw = np.array([0, 1, 2, 150, 254, 255], np.uint8)
  assert reduce_zero_label(raw).tolist() == [255, 0, 1, 149, 253, 255]


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


def test_train_pipeline_on_real_ade20k_jpegs():
  ds = make_dataset(f"ade20k:{ADE}", "val")
  pipe = TrainPipeline(crop=(512, 512), scale=(2048, 512))
  for i in range(len(ds)):
    img, lbl = ds[i]
    for seed in range(3):
      out_img, out_lbl = pipe(img, lbl, np.random.default_rng([seed, i]))
      assert out_img.shape == (512, 512, 3) and out_lbl.shape == (512, 512)
      assert set(np.unique(out_lbl)) <= set(np.unique(lbl)) | {255}  # nearest: no new class
      assert np.isfinite(out_img).all() and np.abs(out_img).max() < 3


def test_loader_is_a_function_of_seed_and_step():
  ds = Synthetic(length=20, size=64)
  pipe = TrainPipeline(crop=(64, 64), scale=(128, 64))
  a = TrainLoader(ds, pipe, 4, seed=0, start_step=0, workers=0)
  first = [b for _, (_, b) in zip(range(4), a)]
  a.close()
  b = TrainLoader(ds, pipe, 4, seed=0, start_step=2, workers=0)
  step, batch = next(iter(b))
  b.close()
  assert step == 2 and np.array_equal(batch["image"], first[2]["image"])
  half = TrainLoader(ds, pipe, 4, seed=0, start_step=2, workers=0, process_index=1, process_count=2)
  _, shard = next(iter(half))
  half.close()
  assert np.array_equal(shard["label"], first[2]["label"][2:])
  epoch = np.concatenate([batch_indices(20, 4, s, 0) for s in range(5)])
  assert sorted(epoch) == list(range(20))


def test_hue_shift_range_is_mmsegs():
  """mmseg's PhotoMetricDistortion.hue draws np.random.randint(-18, 18): -18..17, never 18."""
  from segnext_jax.data.transforms import photometric_distortion

  class Spy:  # every draw is 1 (each step applied), the hue draw's bounds recorded
    def __init__(self):
      self.calls = []

    def integers(self, low, high=None):
      self.calls.append((low, high))
      return 1 if high is None or low >= 0 else high - 1

    def uniform(self, low, high):
      return (low + high) / 2

  img = np.full((2, 2, 3), 100, np.uint8)
  spy = Spy()
  photometric_distortion(img, spy)
  assert (-18, 18) in spy.calls and all(high != 19 for _, high in spy.calls), spy.calls
