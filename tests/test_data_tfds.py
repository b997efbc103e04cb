"""The `ade20k_semantic` TFDS builder end to end: a small ADEChallengeData2016.zip in the real
layout (3 real validation pairs, 2 generated training pairs) -> array_record -> make_dataset."""
from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow_datasets")
from segnext_jax.data import tfds_ade20k  # noqa: E402
from segnext_jax.data.datasets import DataError, MissingDataError, make_dataset  # noqa: E402

ADE = Path(__file__).parent / "data" / "ade20k_val3"
TOP = "ADEChallengeData2016"


def encode(ext: str, arr: np.ndarray) -> bytes:
  return cv2.imencode(ext, arr)[1].tobytes()


def write_zip(manual: Path, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
  """ADEChallengeData2016.zip: images/{training,validation}/*.jpg, annotations/.../*.png."""
  members = {}
  for kind, suffix in (("images", ".jpg"), ("annotations", ".png")):
    for f in sorted((ADE / kind / "validation").glob(f"*{suffix}")):
      members[f"{TOP}/{kind}/validation/{f.name}"] = f.read_bytes()
  rng = np.random.default_rng(0)
  for i in (1, 2):
    img = rng.integers(0, 255, (24 + i, 32, 3), np.uint8)
    ann = rng.integers(0, 151, (24 + i, 32)).astype(np.uint8)
    members[f"{TOP}/images/training/ADE_train_{i:08d}.jpg"] = encode(".jpg", img)
    members[f"{TOP}/annotations/training/ADE_train_{i:08d}.png"] = encode(".png", ann)
  members.update(extra or {})
  manual.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(manual / tfds_ade20k.ZIP_NAME, "w") as zf:
    for name, data in members.items():
      zf.writestr(name, data)
  return members


def test_prepare_then_read_through_make_dataset(tmp_path):
  members = write_zip(tmp_path / "manual")
  out = tfds_ade20k.prepare(tmp_path / "manual", tmp_path / "tfds")
  shards = sorted(p.name.split("-")[1] for p in out.glob("*.array_record*"))
  assert shards == ["train.array_record", "validation.array_record"]
  val = make_dataset(f"tfds:ade20k_semantic:{tmp_path / 'tfds'}", "val")
  assert len(val) == 3 and val.num_classes == 150 and val.palette.shape == (150, 3)
  for i in range(len(val)):
    name = val.name(i)
    img, lbl = val[i]
    raw = np.asarray(Image.open(ADE / "annotations" / "validation" / f"{name}.png"))
    jpg = cv2.imread(str(ADE / "images" / "validation" / f"{name}.jpg"), cv2.IMREAD_COLOR)
    assert np.array_equal(img, jpg[..., ::-1])
    assert np.array_equal(lbl, np.where(raw == 0, 255, raw.astype(np.int16) - 1))
  train = make_dataset(f"tfds:ade20k_semantic:{tmp_path / 'tfds'}", "train")
  assert len(train) == 2
  img, lbl = train[0]
  stored = members[f"{TOP}/annotations/training/{train.name(0)}.png"]
  raw = cv2.imdecode(np.frombuffer(stored, np.uint8), cv2.IMREAD_UNCHANGED)
  assert img.shape[:2] == lbl.shape == raw.shape and np.all(lbl[raw == 0] == 255)


def test_not_prepared_says_how(tmp_path):
  how = "not prepared there.*python -m segnext_jax.data.tfds_ade20k"
  with pytest.raises(MissingDataError, match=how):
    make_dataset(f"tfds:ade20k_semantic:{tmp_path}", "val")


def test_prepare_refuses_bad_pairs(tmp_path):
  with pytest.raises(MissingDataError, match=f"{tfds_ade20k.ZIP_NAME}: missing"):
    (tmp_path / "m0").mkdir()
    tfds_ade20k.prepare(tmp_path / "m0", tmp_path / "d0")
  lone = f"{TOP}/annotations/validation/ADE_val_00000009.png"
  write_zip(tmp_path / "m1", {lone: b"x"})
  with pytest.raises(DataError, match=f"{lone}: has no matching image"):
    tfds_ade20k.prepare(tmp_path / "m1", tmp_path / "d1")
  ann = f"{TOP}/annotations/validation/ADE_val_00000002.png"
  write_zip(tmp_path / "m2", {ann: encode(".png", np.full((364, 500), 151, np.uint8))})
  with pytest.raises(DataError, match=f"{ann}: label value 151 >= num_classes 151"):
    tfds_ade20k.prepare(tmp_path / "m2", tmp_path / "d2")
