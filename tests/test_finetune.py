"""The fine-tuning flow on a user's folder dataset: convert an ADE20K checkpoint -> train.py
--data folder:PATH --pretrained (new classifier, everything else loaded) -> eval.py -> predict.py
with the dataset's class names and palette; bad data stops train.py before anything is written.
The checkpoint is a TINY mmseg-layout one (a custom size, same layers and keys as T): the flow is
the same, its programs compile in a fraction of T's time."""
from __future__ import annotations

import json
import logging

import numpy as np
from PIL import Image

from conftest import TINY, TorchReference, command
from segnext_jax.data.synthetic import write_folder

TRAIN = ["--steps", "2", "--batch-size", "2", "--crop-size", "64", "--resize-scale", "128", "64",
         "--eval-every", "2", "--warmup-steps", "1", "--workers", "0", "--log-every", "1"]


def test_convert_finetune_eval_predict(tmp_path, caplog, capsys):
  ref = TorchReference("t", tmp_path, **TINY)  # an ADE20K-layout (150 classes) custom-size .pth
  conv = tmp_path / "converted"
  assert command("from_torch").main([str(ref.path), "-o", str(conv)]) == 0  # in-process
  assert "custom size" in capsys.readouterr().out
  data = write_folder(tmp_path / "fold", train=6, val=3, size=64, classes=(0, 1, 2))
  wd = tmp_path / "ft"
  with caplog.at_level(logging.WARNING):
    assert command("train").main(["--data", f"folder:{data}", "--pretrained", str(conv),
                                  "--model-overrides", json.dumps(TINY),
                                  "--workdir", str(wd), *TRAIN]) == 0
  report = next(r.getMessage() for r in caplog.records if "pretrained" in r.getMessage())
  assert "re-initialised 2 (params/decode_head/conv_seg" in report, report
  assert "not in the source 0" in report and "unused 0" in report, report
  assert "final (step 2): val mIoU" in capsys.readouterr().out
  from segnext_jax import checkpoint
  model, variables, meta = checkpoint.load(wd)
  assert model.num_classes == 3 and meta["class_names"] == ["background", "disc", "box"]
  assert tuple(model.embed_dims) == TINY["embed_dims"] and model.head_channels == TINY["head_channels"]
  assert meta["palette"][1] == [220, 40, 40]

  out_json = tmp_path / "r.json"
  assert command("eval").main([str(wd), "--out", str(out_json)]) == 0
  assert set(json.loads(out_json.read_text())["per_class"]) == {"background", "disc", "box"}
  img = data / "img_dir" / "val" / "scene_00000.jpg"
  assert command("predict").main([str(wd), str(img), "-o", str(tmp_path / "pred")]) == 0
  classes = np.asarray(Image.open(tmp_path / "pred" / "scene_00000_classes.png"))
  mask = np.asarray(Image.open(tmp_path / "pred" / "scene_00000_mask.png").convert("RGB"))
  assert classes.shape == (64, 64) and classes.max() < 3
  palette = np.array(meta["palette"], np.uint8)
  np.testing.assert_array_equal(mask, palette[classes])  # the dataset's colours


def test_bad_label_stops_training_before_anything_is_written(tmp_path, capsys):
  data = write_folder(tmp_path / "fold", train=3, val=2, size=32, classes=(0, 1, 2))
  bad = data / "ann_dir" / "train" / "scene_00001.png"
  label = np.array(Image.open(bad))
  label[0, 0] = 7  # >= num_classes (3) and not the ignore value
  Image.fromarray(label).save(bad)
  wd = tmp_path / "never"
  assert command("train").main(["--data", f"folder:{data}", "--workdir", str(wd), *TRAIN]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "scene_00001.png" in err[0] and "7" in err[0], err
  assert not wd.exists()
