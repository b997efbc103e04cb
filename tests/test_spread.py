"""Evaluation and prediction spread over devices and processes (eval/spread.py) give a one-device
run's answers: the confusion matrix to the last pixel, every class map; and in a two-process run
each process takes its share and every process gets the whole set's metrics."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import TINY_RUN_FLAGS, host_devices_env

REPO = Path(__file__).resolve().parents[1]

# Mixed sizes (several canvases, a leftover per canvas), labels with ignored pixels; 7 images:
# uneven shares for 4 devices and for 2 processes.
COMMON = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from conftest import TINY
from segnext_jax import init_variables, segnext
from segnext_jax.eval import InferenceConfig, Segmenter, evaluate, spread
{setup}
SIZES = [(70, 90), (64, 64), (100, 60), (50, 130), (80, 80), (96, 72), (66, 99)]

class Data:
  num_classes = 5
  class_names = tuple("abcde")
  def __len__(self):
    return len(SIZES)
  def __getitem__(self, i):
    g = np.random.default_rng(i)
    h, w = SIZES[i]
    label = g.integers(0, 5, (h, w)).astype(np.uint8)
    label[g.random((h, w)) < 0.1] = 255
    return g.integers(0, 256, (h, w, 3), dtype=np.uint8), label

model = segnext("t", **TINY, num_classes=5)
variables = init_variables(model, jax.random.key(0))
MODES = dict(whole=InferenceConfig(scale=(128, 64), batch_size=2),
             slide=InferenceConfig(scale=(128, 64), mode="slide", crop=(64, 64), stride=(48, 48)),
             tta=InferenceConfig(scale=(128, 64), tta=True))
"""

DEVICES = COMMON + r"""
assert jax.local_device_count() == 4
out = {{}}
for name, cfg in MODES.items():
  seg = Segmenter.for_model(model, cfg)
  one = evaluate(seg, variables, Data(), progress=False, devices=jax.local_devices()[:1])
  four = evaluate(seg, variables, Data(), progress=False)
  assert (one["devices"], four["devices"]) == (1, 4), (one["devices"], four["devices"])
  out[name] = [one["confusion"].tolist(), four["confusion"].tolist(), one["mIoU"], four["mIoU"]]
images = [Data()[i][0] for i in range(len(SIZES))]
seg = Segmenter.for_model(model, MODES["tta"])
one = dict(spread.predict(seg, variables, images, devices=jax.local_devices()[:1]))
four = list(spread.predict(seg, variables, images))
out["predict_order"] = [i for i, _ in four]
out["predict_equal"] = all(np.array_equal(one[i], p) for i, p in four)
print(json.dumps(out))
"""


def test_four_devices_evaluate_and_predict_as_one():
  """whole (batched), slide and TTA over 4 host devices: the 1-device confusion matrix exactly;
  predict: the same class maps, in input order."""
  res = subprocess.run([sys.executable, "-c", DEVICES.format(tests=str(REPO / "tests"), setup="")],
                       capture_output=True, text=True, env=dict(os.environ, **host_devices_env(4)))
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  for mode in ("whole", "slide", "tta"):
    one, four, miou1, miou4 = out[mode]
    assert one == four and np.asarray(one).sum() > 0, mode
    assert miou1 == miou4, mode
  assert out["predict_order"] == list(range(7)) and out["predict_equal"]


PROCESS = COMMON + r"""
assert jax.process_count() == 2
res = evaluate(Segmenter.for_model(model, MODES["whole"]), variables, Data(), progress=False)
images = [Data()[i][0] for i in range(len(SIZES))]
mine = [i for i, _ in spread.predict(Segmenter.for_model(model, MODES["whole"]), variables, images)]
print(json.dumps(dict(confusion=res["confusion"].tolist(), here=res["images_here"],
                      processes=res["processes"], devices=res["devices"], mine=mine)))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_split_the_images_and_sum_the_counts():
  """Two real processes on localhost (jax.distributed, gloo): each evaluates its share (4 and 3
  of 7 images) and gets the whole set's confusion matrix, equal to one process's; predict gives
  each image to one process."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", PROCESS.format(tests=str(REPO / "tests"),
                                                          setup="from segnext_jax import cli; cli.init_distributed()")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(p)))
           for p in (0, 1)]
  outs = []
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  single = subprocess.run([sys.executable, "-c", (COMMON + r"""
print(json.dumps(evaluate(Segmenter.for_model(model, MODES["whole"]), variables, Data(),
                          progress=False)["confusion"].tolist()))
""").format(tests=str(REPO / "tests"), setup="")], capture_output=True, text=True)
  assert single.returncode == 0, single.stderr[-3000:]
  whole = json.loads(single.stdout.strip().splitlines()[-1])
  assert outs[0]["confusion"] == outs[1]["confusion"] == whole
  assert [o["here"] for o in outs] == [4, 3] and {o["processes"] for o in outs} == {2}
  assert outs[0]["mine"] == [0, 2, 4, 6] and outs[1]["mine"] == [1, 3, 5]


def test_two_processes_train_validate_and_evaluate_as_one(tmp_path):
  """train.py --distributed in two localhost processes (one device each) with in-run validation,
  then eval.py --distributed: the parameters of one 2-device process to the bit, the same
  validation metrics and confusion; each process validated its share of the images."""
  import jax
  from segnext_jax import checkpoint, metric_writer
  root = tmp_path
  flags = [*TINY_RUN_FLAGS, "--steps=2", "--eval-every=2", "--eval-images=5", "--ckpt-every=2",
           "--compile-cache="]

  def processes(script: str, *args: str) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(REPO / script), *args, "--distributed"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=dict(os.environ, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(p)))
             for p in (0, 1)]
    done = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=900)) for p in procs]
    for proc, res in zip(procs, done):
      assert proc.returncode == 0, res.stderr[-3000:]
    return done

  two = processes("train.py", *flags, f"--workdir={root / 'two'}")
  for p, res in enumerate(two):
    assert f"this process ({p} of 2) evaluated {3 - p} of 5 images" in res.stderr, res.stderr[-2000:]
  one = subprocess.run([sys.executable, str(REPO / "train.py"), *flags, f"--workdir={root / 'one'}"],
                       capture_output=True, text=True, cwd=REPO, env=dict(os.environ, **host_devices_env(2)))
  assert one.returncode == 0, one.stderr[-3000:]
  a = checkpoint.load(root / "two", step=2)[1]
  b = checkpoint.load(root / "one", step=2)[1]
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  val = lambda wd: [r for r in metric_writer.read(wd) if r["split"] == "val"]
  assert val(root / "two") == val(root / "one") and len(val(root / "one")) == 1
  ev = processes("eval.py", str(root / "two"), "--max-images=5", f"--out={root / 'e.json'}")
  doc = json.loads((root / "e.json").read_text())
  assert (doc["processes"], doc["devices"], doc["images"]) == (2, 2, 5)
  assert doc["mIoU"] == round(val(root / "one")[0]["mIoU"], 4)
  assert "process 1: 2 of 5 images" in ev[1].stderr + ev[1].stdout
