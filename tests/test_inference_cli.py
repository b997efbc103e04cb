"""eval.py and predict.py on a small checkpoint and real ADE20K files: fixed NMF bases make every
image's answer independent of order, batch size and run; the bases in use are reported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import numpy as np
import pytest

from mmseg_eval import ADE_VAL3
from conftest import TINY, command, host_devices_env
from segnext_jax import init_variables, segnext
from segnext_jax.checkpoint import save_converted

REPO = Path(__file__).resolve().parents[1]
SMALL = TINY
IMAGES = sorted((ADE_VAL3 / "images" / "validation").glob("*.jpg"))


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
  """A small random 150-class SegNeXt with a decisive classifier, as a converted checkpoint."""
  model = segnext("t", **SMALL)
  variables = jax.tree.map(np.asarray, dict(init_variables(model, jax.random.key(0))))
  head = variables["params"]["decode_head"]
  head["conv_seg"] = {**head["conv_seg"], "kernel": np.random.default_rng(0).normal(
      0, 1, head["conv_seg"]["kernel"].shape).astype(np.float32)}
  meta = dict(variant="t", model={k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()},
              nmf_bases="fixed, drawn at init from seed 0")
  return save_converted(tmp_path_factory.mktemp("ckpt") / "small", variables, meta)


def predict_maps(ckpt: Path, images: list[Path], out: Path, *flags: str) -> dict[str, np.ndarray]:
  code = command("predict").main([str(ckpt), *map(str, images), "-o", str(out),
                                      "--compile-cache=", *flags])
  assert code == 0
  return {p.stem: cv2.imread(str(out / f"{p.stem}_classes.png"), cv2.IMREAD_UNCHANGED)
          for p in images}


def test_predict_maps_do_not_depend_on_image_order(small_checkpoint, tmp_path, capsys):
  first = predict_maps(small_checkpoint, IMAGES, tmp_path / "a")
  assert "NMF bases: fixed, drawn at init from seed 0" in capsys.readouterr().out
  second = predict_maps(small_checkpoint, IMAGES[::-1][1:] + IMAGES[-1:], tmp_path / "b")
  for stem, m in first.items():
    assert m.shape == cv2.imread(str(ADE_VAL3 / "images/validation" / f"{stem}.jpg")).shape[:2]
    assert len(np.unique(m)) > 3, "a constant map would make this test vacuous"
    np.testing.assert_array_equal(m, second[stem])


def test_predict_decodes_each_image_and_reads_the_checkpoint_once(small_checkpoint, tmp_path,
                                                                   monkeypatch):
  from segnext_jax import checkpoint
  from segnext_jax.data import datasets
  decoded, resolved = [], []
  read_image, resolve = datasets.read_image, checkpoint.resolve
  monkeypatch.setattr(datasets, "read_image", lambda p, *a: decoded.append(p) or read_image(p, *a))
  monkeypatch.setattr(checkpoint, "resolve", lambda *a: resolved.append(a) or resolve(*a))
  predict_maps(small_checkpoint, IMAGES[:2], tmp_path / "a")
  assert decoded == IMAGES[:2] and len(resolved) == 1


def test_predict_nmf_seed_draws_other_bases(small_checkpoint, tmp_path, capsys):
  stored = predict_maps(small_checkpoint, IMAGES[2:], tmp_path / "a")
  other = predict_maps(small_checkpoint, IMAGES[2:], tmp_path / "b", "--nmf-seed=7")
  assert "NMF bases: fixed, drawn from seed 7 (--nmf-seed" in capsys.readouterr().out
  stem = IMAGES[2].stem
  assert (stored[stem] != other[stem]).any()


def test_eval_reports_bases_and_ignores_batch_size(small_checkpoint, tmp_path, capsys):
  ev = command("eval")
  results = []
  for i, batch in enumerate((1, 3)):
    out = tmp_path / f"r{i}.json"
    assert ev.main([str(small_checkpoint), f"--data=ade20k:{ADE_VAL3}", f"--batch-size={batch}",
                    "--compile-cache=", "--scale", "160", "96", f"--out={out}"]) == 0
    results.append(json.loads(out.read_text()))
  printed = capsys.readouterr().out
  assert "test pipeline: mmseg1 pipeline, single scale into 160x96, whole" in printed
  assert "NMF bases: fixed, drawn at init from seed 0" in printed and "| wall |" in printed
  assert results[0]["per_class"] == results[1]["per_class"] and results[0]["images"] == 3
  assert results[0]["settings"]["nmf_bases"] == "fixed, drawn at init from seed 0"
  assert ev.main([str(tmp_path / "nothing"), "--data=synthetic"]) == 2
  # the pinned scale-out check: eval.py on 2 forced host devices, the 1-device numbers exactly
  out = tmp_path / "two.json"
  res = subprocess.run([sys.executable, str(REPO / "eval.py"), str(small_checkpoint),
                        f"--data=ade20k:{ADE_VAL3}", "--batch-size=3", "--compile-cache=", "--scale",
                        "160", "96", f"--out={out}"], capture_output=True, text=True,
                       env=dict(os.environ, **host_devices_env(2)))
  assert res.returncode == 0, res.stderr[-3000:]
  two = json.loads(out.read_text())
  assert (results[1]["devices"], two["devices"], two["processes"]) == (1, 2, 1)
  for key in ("mIoU", "IoU", "confusion", "aAcc", "per_class"):
    assert two[key] == results[1][key], key
  assert np.asarray(two["confusion"]).sum() > 0 and "on 2 device(s)" in res.stdout


def test_inferencer_takes_paths_arrays_and_pil_images_at_their_own_size(small_checkpoint, tmp_path):
  """segnext_jax.Inferencer(CKPT)(images): predict.py's class maps, for mixed sizes and kinds of
  input in one call; .scores are probabilities whose argmax is the map."""
  from PIL import Image
  from segnext_jax import Inferencer
  from segnext_jax.data.files import read_image
  from segnext_jax.errors import InputError
  maps = predict_maps(small_checkpoint, IMAGES, tmp_path / "p")
  seg = Inferencer(small_checkpoint)
  arrays = [read_image(p) for p in IMAGES]
  got = seg([IMAGES[0], arrays[1], Image.fromarray(arrays[2])])
  assert isinstance(got, list) and len({m.shape for m in got}) == 3
  for path, m in zip(IMAGES, got):
    assert m.dtype == np.int32
    np.testing.assert_array_equal(m, maps[path.stem])
  np.testing.assert_array_equal(seg(arrays[1]), got[1])  # one image in, one map out
  probs = seg.scores(arrays[2])
  assert probs.shape == (*arrays[2].shape[:2], 150)
  np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
  np.testing.assert_array_equal(probs.argmax(-1), got[2])
  with pytest.raises(InputError, match="RGB uint8"):
    seg([arrays[0].astype(np.float32)])
  with pytest.raises(InputError, match="mode 'fast'"):
    Inferencer(small_checkpoint, "fast")


def test_save_scores_writes_float16_probabilities(small_checkpoint, tmp_path):
  """--save-scores: NAME_scores.npz beside the pictures, the Inferencer's probabilities in
  float16, with the class names; the class map unchanged."""
  from segnext_jax import Inferencer
  from segnext_jax.data.files import read_image
  maps = predict_maps(small_checkpoint, IMAGES[:1], tmp_path / "s", "--save-scores")
  saved = np.load(tmp_path / "s" / f"{IMAGES[0].stem}_scores.npz")
  scores, names = saved["scores"], saved["class_names"]
  assert scores.dtype == np.float16 and scores.shape == (*maps[IMAGES[0].stem].shape, 150)
  assert len(names) == 150 and names[0] == "wall"
  ref = Inferencer(small_checkpoint).scores(read_image(IMAGES[0]))
  assert np.abs(scores.astype(np.float32) - ref).max() < 1e-3
  assert (ref.argmax(-1) == maps[IMAGES[0].stem]).all()


def test_video_in_mask_and_overlay_videos_out(small_checkpoint, tmp_path, capsys):
  """predict.py clip.mp4: mask and overlay videos at the source's rate and size; every frame's
  map is the image prediction of that frame, from one compiled program for all frames."""
  from segnext_jax import load_checkpoint, video
  from segnext_jax.eval import InferenceConfig, Segmenter
  from segnext_jax.viz import colorize, palette
  clip_path = tmp_path / "clip.mp4"
  src = cv2.VideoWriter(str(clip_path), cv2.VideoWriter_fourcc(*"mp4v"), 12.0, (128, 96))
  g = np.random.default_rng(0)
  base = cv2.resize(g.integers(0, 256, (12, 16, 3), dtype=np.uint8), (128, 96))
  for i in range(5):
    src.write(np.roll(base, 6 * i, axis=1))
  src.release()
  assert command("predict").main([str(small_checkpoint), str(clip_path), "-o", str(tmp_path / "o"),
                                  "--compile-cache="]) == 0
  assert "clip.mp4: 5 frames 128x96 at 12 fps" in capsys.readouterr().out
  model, variables = load_checkpoint(small_checkpoint)
  seg = Segmenter.for_model(model, InferenceConfig())
  frames = list(video.frames(clip_path))
  preds = [seg.classes(variables, f) for f in frames]
  assert len(seg.forward.programs) == 1 and len(np.unique(preds[0])) > 3
  got = []
  (tmp_path / "lib").mkdir()
  video.segment(video.open_clip(clip_path), lambda f: seg.classes(variables, f), tmp_path / "lib",
                palette({}, 150), [str(i) for i in range(150)], on_frame=lambda i, p: got.append(p))
  assert all(np.array_equal(a, b) for a, b in zip(got, preds)) and len(got) == 5
  for kind in ("mask", "overlay"):
    out = tmp_path / "o" / f"clip_{kind}.mp4"
    clip = video.open_clip(out)
    assert (clip.fps, clip.size, clip.frames) == (12.0, (96, 128), 5), kind
  decoded = list(video.frames(tmp_path / "o" / "clip_mask.mp4"))
  colors = palette({}, 150)
  # a lossy codec: each decoded frame is nearer its own frame's colour mask than another frame's
  diff = lambda frame, pred: np.abs(frame.astype(int) - colorize(pred, colors)).mean()
  for j, frame in enumerate(decoded):
    own, other = diff(frame, preds[j]), diff(frame, preds[(j + 2) % 5])
    assert own < 0.8 * other, (j, own, other)
