"""train.py -> eval.py -> predict.py on a tiny synthetic run (in-process, tiny variant)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import TINY
from segnext_jax.checkpoint import load_checkpoint
from segnext_jax.data.datasets import Synthetic

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
  spec = importlib.util.spec_from_file_location(f"segnext_cli_{name}", REPO / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture
def workdir(tmp_path):
  train = load_script("train")
  wd = tmp_path / "run"
  train.main([f"--model-overrides={json.dumps(TINY)}", "--steps=3", "--batch_size=2", "--crop_size=64",
              "--resize_scale", "128", "64", "--eval_every=3", "--eval_images=4", f"--workdir={wd}",
              "--warmup_steps=1", "--workers=1"])
  return wd


def test_train_eval_predict_roundtrip(capsys, workdir, tmp_path):
  out = capsys.readouterr().out
  assert "final (step 3): val mIoU" in out
  model, variables = load_checkpoint(workdir)
  assert model.num_classes == 6 and "conv_seg" in variables["params"]["decode_head"]

  ev = load_script("eval")
  results = []
  for i in range(2):
    js = tmp_path / f"r{i}.json"
    assert ev.main([str(workdir), "--max-images", "5", "--out", str(js)]) == 0
    results.append(json.loads(js.read_text()))
  table = capsys.readouterr().out
  assert "| disc |" in table and "mIoU" in table and "img/s" in table
  assert results[0]["mIoU"] == results[1]["mIoU"] and results[0]["per_class"] == results[1]["per_class"]
  assert results[0]["images"] == 5 and set(results[0]["per_class"]) == set(Synthetic.class_names)
  assert ev.main([str(tmp_path / "nothing")]) == 2

  pr = load_script("predict")
  imgs = tmp_path / "imgs"
  imgs.mkdir()
  cv2.imwrite(str(imgs / "scene.png"), Synthetic(size=96)[0][0][..., ::-1])
  cv2.imwrite(str(imgs / "gray.png"), np.full((40, 50), 128, np.uint8))
  cv2.imwrite(str(imgs / "rgba.png"), np.zeros((30, 20, 4), np.uint8))
  (imgs / "broken.jpg").write_bytes(b"\xff\xd8 not really")
  code = pr.main([str(workdir), str(imgs), "-o", str(tmp_path / "pred")])
  captured = capsys.readouterr()
  assert code == 1 and "broken.jpg: not a readable image" in captured.err
  for stem, hw in (("scene", (96, 96)), ("gray", (40, 50)), ("rgba", (30, 20))):
    classes = cv2.imread(str(tmp_path / "pred" / f"{stem}_classes.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(tmp_path / "pred" / f"{stem}_mask.png"))
    overlay = cv2.imread(str(tmp_path / "pred" / f"{stem}_overlay.png"))
    assert classes.shape == hw and classes.max() < 6 and mask.shape == (*hw, 3)
    assert overlay.shape[1] > hw[1]  # image + legend panel
