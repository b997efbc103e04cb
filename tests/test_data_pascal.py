"""`voc:`, `pascal_context:` (59), `pascal_context60:` and `isaid:` on small trees written as mmseg's
converters write them: every (image, label) pair, its order and the class names against mmseg 1.x's
own dataset classes built from its _base_ dataset configs (LoadImageFromFile + LoadAnnotations);
one-line errors naming the file; a short train.py + eval.py."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, command
from segnext_jax.mmseg_reference import stub_mmcv_ops
from segnext_jax.data.datasets import DataError, MissingDataError, check, make_dataset
from segnext_jax.recipes import RECIPES, kind_of

# per kind: mmseg 1.x's _base_/datasets config
KINDS = {"voc": "pascal_voc12_aug.py", "pascal_context": "pascal_context_59.py",
         "pascal_context60": "pascal_context.py", "isaid": "isaid.py"}
# names in split-list order (VOC's lists unsorted on purpose: items follow the list)
VOC_TRAIN, VOC_VAL = ["2007_000039", "2007_000032"], ["2007_000129", "2007_000033"]
VOC_AUG = ["2008_000010", "2007_000009"]
CONTEXT_TRAIN = ["2008_000002", "2008_000003", "2008_000007"]
CONTEXT_VAL = ["2008_000008", "2008_000009"]
ISAID_NAMES = {"train": ["P0002_0_896_0_896", "P0002_0_896_512_1408", "P0000_0_896_0_896"],
               "val": ["P0010_512_1408_0_896", "P0003_0_896_0_896"]}
SIZES = [(24, 32), (30, 22), (28, 36)]


def voc_colormap() -> list[int]:
  """The VOC devkit's 256-colour PNG palette (bit-interleaved class index), flat RGB."""
  cmap = []
  for i in range(256):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    cmap += [r, g, b]
  return cmap


def write_png(path: Path, label: np.ndarray, mode: str = "L", palette=None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  im = Image.frombytes(mode, label.shape[::-1], np.ascontiguousarray(label, np.uint8).tobytes())
  if palette is not None:
    im.putpalette(palette)
  im.save(path)


def write_image(path: Path, rng, hw, fmt: str = "JPEG") -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(rng.integers(0, 255, (*hw, 3), np.uint8)).save(path, format=fmt)


def random_label(rng, hw, values: int, border: bool = True) -> np.ndarray:
  label = rng.integers(0, values, hw).astype(np.uint8)
  if border:
    label[hw[0] // 2, :] = 255  # VOC's object borders / iSAID's padding
  return label


def write_split(path: Path, names) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(n + "\n" for n in names))


def make_voc(root: Path, aug: bool = True, sizes=SIZES) -> Path:
  """VOCdevkit/VOC2012: palette PNGs in SegmentationClass, grey SBD masks in SegmentationClassAug."""
  rng = np.random.default_rng(0)
  for i, name in enumerate(VOC_TRAIN + VOC_VAL + ["2007_000999"]):  # the last: in no list
    hw = sizes[i % len(sizes)]
    write_image(root / "JPEGImages" / f"{name}.jpg", rng, hw)
    write_png(root / "SegmentationClass" / f"{name}.png", random_label(rng, hw, 21), "P",
              voc_colormap())
  write_split(root / "ImageSets/Segmentation/train.txt", VOC_TRAIN)
  write_split(root / "ImageSets/Segmentation/val.txt", VOC_VAL)
  if aug:
    for i, name in enumerate(VOC_AUG):
      hw = sizes[(i + 1) % len(sizes)]
      write_image(root / "JPEGImages" / f"{name}.jpg", rng, hw)
      write_png(root / "SegmentationClassAug" / f"{name}.png", random_label(rng, hw, 21, False))
    write_split(root / "ImageSets/Segmentation/aug.txt", VOC_AUG)
  return root


def make_context(root: Path, sizes=SIZES) -> Path:
  """VOCdevkit/VOC2010 as mmseg's pascal_context converter leaves it: 0..59 grey PNGs."""
  rng = np.random.default_rng(1)
  for i, name in enumerate(CONTEXT_TRAIN + CONTEXT_VAL):
    hw = sizes[i % len(sizes)]
    write_image(root / "JPEGImages" / f"{name}.jpg", rng, hw)
    label = random_label(rng, hw, 60, border=False)
    label[0, :4] = 0  # background: ignored in the 59-class setting
    write_png(root / "SegmentationClassContext" / f"{name}.png", label)
  write_split(root / "ImageSets/SegmentationContext/train.txt", CONTEXT_TRAIN)
  write_split(root / "ImageSets/SegmentationContext/val.txt", CONTEXT_VAL)
  return root


def make_isaid(root: Path, sizes=SIZES) -> Path:
  """mmseg's isaid converter output: BMP data under .png names, 'P' class-id masks, 255 padding."""
  rng = np.random.default_rng(2)
  for split, names in ISAID_NAMES.items():
    for i, name in enumerate(names):
      hw = sizes[i % len(sizes)]
      write_image(root / "img_dir" / split / f"{name}.png", rng, hw, fmt="BMP")
      write_png(root / "ann_dir" / split / f"{name}_instance_color_RGB.png",
                random_label(rng, hw, 16), "P", GREY)
  write_image(root / "img_dir" / "test" / "P0001.png", rng, (20, 20), fmt="BMP")  # no masks
  return root


GREY = [v for i in range(256) for v in (i, i, i)]  # Pillow < 10's default palette: 8-bit PNGs
MAKERS = {"voc": make_voc, "pascal_context": make_context, "pascal_context60": make_context,
          "isaid": make_isaid}


def mmseg_config(kind: str):
  from mmengine.config import Config
  import mmseg
  return Config.fromfile(Path(mmseg.__file__).parent / ".mim/configs/_base_/datasets" / KINDS[kind])


def mmseg_dataset(kind: str, root: Path, split: str):
  """mmseg's own dataset for the split, from its config, with only the two loading transforms."""
  stub_mmcv_ops()
  from mmseg.registry import DATASETS
  from mmseg.utils import register_all_modules
  register_all_modules()
  cfg = mmseg_config(kind)
  ds_cfg = (cfg.train_dataloader if split == "train" else cfg.val_dataloader).dataset
  for sub in ds_cfg.get("datasets", [ds_cfg]):
    sub.data_root = str(root)
    sub.pipeline = [t for t in sub.pipeline if t.type in ("LoadImageFromFile", "LoadAnnotations")]
  return DATASETS.build(ds_cfg)


@pytest.mark.parametrize("kind", list(KINDS))
def test_pairs_order_and_classes_match_mmseg(tmp_path, kind):
  root = MAKERS[kind](tmp_path / kind)
  for split in ("train", "val"):
    ours, theirs = make_dataset(f"{kind}:{root}", split), mmseg_dataset(kind, root, split)
    assert len(ours) == len(theirs) > 0
    assert list(ours.class_names) == list(theirs.metainfo["classes"])
    assert ours.palette.tolist() == [list(c) for c in theirs.metainfo["palette"]]
    values = set()
    for i in range(len(ours)):
      img, label = ours[i]
      want = theirs[i]
      assert str(ours.images[i]) == want["img_path"] and str(ours.masks[i]) == want["seg_map_path"]
      assert img.dtype == label.dtype == np.uint8 and label.shape == img.shape[:2]
      np.testing.assert_array_equal(img, want["img"][..., ::-1])  # mmseg's is BGR
      np.testing.assert_array_equal(label, want["gt_seg_map"])
      values |= set(np.unique(label).tolist())
    # 255 (VOC borders, iSAID padding, Context-59 background) is in the labels, and nothing else
    # outside the classes; Context-60 masks have no ignore value
    assert values - set(range(ours.num_classes)) == ({255} if kind != "pascal_context60" else set())
    check(ours)
    check(ours, decode_images=True)


def test_split_file_order_and_voc_aug_concat(tmp_path):
  voc = make_voc(tmp_path / "voc")
  train = make_dataset(f"voc:{voc}", "train")
  assert [train.name(i) for i in range(len(train))] == VOC_TRAIN + VOC_AUG
  assert [p.parent.name for p in train.masks] == ["SegmentationClass"] * 2 + \
      ["SegmentationClassAug"] * 2
  assert train.num_classes == 21 and train.class_names[0] == "background"
  assert train[-1][1].shape == train[3][1].shape
  with pytest.raises(IndexError):
    train[len(train)]
  val = make_dataset(f"voc:{voc}", "val")
  assert [val.name(i) for i in range(len(val))] == VOC_VAL
  # the palette is the VOC PNGs' own colour map
  assert val.palette.ravel().tolist() == voc_colormap()[:63]
  # without the SBD set, train is train.txt alone
  plain = make_voc(tmp_path / "plain", aug=False)
  assert [p.name for p in make_dataset(f"voc:{plain}", "train").images] == \
      [n + ".jpg" for n in VOC_TRAIN]
  ctx = make_context(tmp_path / "ctx")
  assert [make_dataset(f"pascal_context:{ctx}", "val").name(i) for i in range(2)] == CONTEXT_VAL
  isaid = make_dataset(f"isaid:{make_isaid(tmp_path / 'isaid')}", "train")
  assert [isaid.name(i) for i in range(3)] == sorted(ISAID_NAMES["train"])


def test_pascal_context_59_and_60_label_rules(tmp_path):
  root = make_context(tmp_path)
  c59, c60 = (make_dataset(f"{k}:{root}", "val") for k in ("pascal_context", "pascal_context60"))
  assert (c59.num_classes, c60.num_classes) == (59, 60)
  assert c59.class_names == c60.class_names[1:] and c60.class_names[0] == "background"
  raw = np.asarray(Image.open(c60.masks[0]))
  np.testing.assert_array_equal(c60[0][1], raw)
  np.testing.assert_array_equal(c59[0][1], np.where(raw == 0, 255, raw - 1))
  assert kind_of(f"pascal_context60:{root}") == "pascal_context60"


def bad(spec: str, *, match: str, split: str = "val", on: str = "check", error=DataError):
  """The error (one line, naming the file) from make_dataset, check(ds) or reading every item."""
  with pytest.raises(error) as e:
    ds = make_dataset(spec, split)
    if on == "check":
      check(ds)
    elif on == "items":
      [ds[i] for i in range(len(ds))]
  assert "\n" not in str(e.value) and match in str(e.value), str(e.value)


def test_voc_bad_data_names_the_file(tmp_path):
  root = make_voc(tmp_path)
  spec = f"voc:{root}"
  listed = root / "ImageSets/Segmentation/val.txt"
  write_split(listed, VOC_VAL + ["2009_999999"])
  bad(spec, match=f"{root}/JPEGImages/2009_999999.jpg: listed in {listed} but missing",
      on="make", error=MissingDataError)
  write_split(listed, VOC_VAL)
  (root / "SegmentationClass/2007_000033.png").unlink()
  bad(spec, match=f"{root}/SegmentationClass/2007_000033.png: missing mask of "
      f"{root}/JPEGImages/2007_000033.jpg", on="make", error=MissingDataError)
  mask = root / "SegmentationClass/2007_000033.png"
  write_png(mask, np.full((24, 32), 21, np.uint8), "P", voc_colormap())
  bad(spec, match=f"{mask}: label value 21 >= num_classes 21 and not 255")
  bad(spec, match=f"{mask}: label value 21", on="items")
  write_png(mask, np.zeros((23, 32), np.uint8), "P", voc_colormap())
  bad(spec, match=f"{mask}: mask is 32x23 (WxH) but its image is 32x24")
  aug_mask = root / "SegmentationClassAug/2007_000009.png"
  write_png(aug_mask, np.full((28, 36), 30, np.uint8))
  bad(spec, split="train", match=f"{aug_mask}: label value 30 >= num_classes 21")
  (root / "ImageSets/Segmentation/aug.txt").unlink()
  bad(spec, split="train", match=f"{root}/ImageSets/Segmentation/aug.txt: missing, but "
      f"{root}/SegmentationClassAug exists", on="make", error=MissingDataError)
  listed.unlink()
  bad(spec, match=f"{listed}: cannot read split file", on="make", error=MissingDataError)


def test_context_and_isaid_bad_data_names_the_file(tmp_path):
  ctx = make_context(tmp_path / "ctx")
  mask = ctx / "SegmentationClassContext/2008_000009.png"
  write_png(mask, np.full((30, 22), 60, np.uint8))
  bad(f"pascal_context:{ctx}", match=f"{mask}: label value 60 (class 59 after mapping) >= "
      "num_classes 59 and not 255")
  bad(f"pascal_context60:{ctx}", match=f"{mask}: label value 60 >= num_classes 60")
  (ctx / "SegmentationClassContext").rename(ctx / "moved")
  bad(f"pascal_context:{ctx}", match=f"{ctx}/SegmentationClassContext: missing folder",
      on="make", error=MissingDataError)

  isaid = make_isaid(tmp_path / "isaid")
  ann = isaid / "ann_dir" / "val"
  write_png(ann / "P0003_0_896_0_896_instance_color_RGB.png", np.full((30, 22), 16, np.uint8), "P",
            GREY)
  bad(f"isaid:{isaid}", match=f"{ann}/P0003_0_896_0_896_instance_color_RGB.png: label value 16 >= "
      "num_classes 16")
  write_png(ann / "P0099_0_896_0_896_instance_color_RGB.png", np.zeros((4, 4), np.uint8), "P",
            GREY)
  bad(f"isaid:{isaid}", match=f"{ann}/P0099_0_896_0_896_instance_color_RGB.png: mask with no "
      f"image (expected {isaid}/img_dir/val/P0099_0_896_0_896.png", on="make")
  (ann / "P0099_0_896_0_896_instance_color_RGB.png").unlink()
  (ann / "P0010_512_1408_0_896_instance_color_RGB.png").unlink()
  bad(f"isaid:{isaid}", match=f"{ann}/P0010_512_1408_0_896_instance_color_RGB.png: missing mask",
      on="make", error=MissingDataError)
  with pytest.raises(MissingDataError, match="no such folder"):
    make_dataset(f"voc:{tmp_path / 'nowhere'}", "val")


@pytest.mark.parametrize("kind", list(KINDS))
def test_train_loader_batches_from_each_layout(tmp_path, kind):
  """What train.py does before its first step, per layout: the kind's preset, both splits checked,
  and the train split (VOC: with the aug set) through the train pipeline into a batch."""
  from segnext_jax.config import load_preset, make_config
  from segnext_jax.data.loader import TrainLoader
  from segnext_jax.data.transforms import TrainPipeline
  from segnext_jax.trainer import prepare_data
  spec = f"{kind}:{MAKERS[kind](tmp_path / kind)}"
  cfg = make_config(load_preset(kind_of(spec)), dict(data=spec, batch_size=4))
  assert (cfg.crop_size, cfg.steps) == (RECIPES[kind]["crop_size"],
                                        RECIPES[kind]["steps"])
  train_ds, val_ds = prepare_data(cfg)
  loader = TrainLoader(train_ds, TrainPipeline(crop=(32, 32), scale=(64, 32)), 4, seed=0,
                       workers=0)
  try:
    _, batch = next(iter(loader))
  finally:
    loader.close()
  assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4, 32, 32)
  assert set(np.unique(batch["label"]).tolist()) <= set(range(train_ds.num_classes)) | {255}
  assert val_ds.class_names == train_ds.class_names


# Each layout compiles its own init and step for its class count (~75 s on 2 cores), so these
# run with -m slow; test_train_loader_batches_from_each_layout covers each in the default suite.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["voc", "pascal_context", "isaid"])
def test_train_then_eval_per_class_iou_under_the_class_names(tmp_path, kind):
  """train.py --data KIND:PATH (its preset, tiny overrides) -> eval.py --data --out, in-process."""
  root = MAKERS[kind](tmp_path / kind, sizes=[(32, 32)])  # one eval shape: one compile
  spec, wd, out = f"{kind}:{root}", tmp_path / "run", tmp_path / "r.json"
  with contextlib.redirect_stdout(io.StringIO()) as log:
    assert command("train").main([
        f"--data={spec}", f"--model-overrides={json.dumps(TINY)}", "--steps=2", "--batch-size=2",
        "--crop-size=32", "--resize-scale", "64", "32", "--eval-every=2", "--warmup-steps=1",
        "--workers=0", "--log-every=1", f"--workdir={wd}"]) == 0
    assert command("eval").main([str(wd), "--data", spec, "--out", str(out)]) == 0
  assert "final (step 2): val mIoU" in log.getvalue()
  saved = json.loads((wd / "config.json").read_text())
  assert saved["data"] == spec  # the kind's preset (eval window), then the flags
  assert saved["eval_crop"] == list(RECIPES[kind]["eval_crop"])
  assert saved["steps"] == 2 and saved["crop_size"] == 32
  res = json.loads(out.read_text())
  names = make_dataset(spec, "val").class_names
  assert list(res["per_class"]) == list(names) and res["images"] == len(make_dataset(spec, "val"))
  assert res["settings"]["data"] == spec
