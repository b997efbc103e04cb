"""Checkpoints do not depend on the device topology that wrote them: a run written on 1 device
resumes on 2 forced host devices, and what the 2 devices wrote is loaded, evaluated, predicted
with, fine-tuned from and resumed on 1. The 2-device run is a train.py process of its own; the
1-device ones run in this (1-device) test process. The recipe and step budgets (3, then 4) are
test_cli's: the 1-device step programs are shared through the session's compile cache."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from conftest import TINY_RUN_FLAGS, cache_env, command, host_devices_env
from segnext_jax.train_lib import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
TRAIN = TINY_RUN_FLAGS + ["--eval-every=1000", "--eval-images=2"]


def _run(cache: dict, script: str, devices: int, *args: str) -> subprocess.CompletedProcess:
  """One CLI run on `devices` host devices, with the session's compile cache (`cache`)."""
  env = dict(os.environ, **cache, **host_devices_env(devices))
  res = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True,
                       text=True, env=env, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  return res


def _main(script: str, *args) -> None:
  """One CLI run in this process (1 device, the session's compile cache)."""
  assert jax.device_count() == 1
  assert command(script).main([str(a) for a in args]) == 0


def test_two_devices_to_one_and_back(tmp_path, compilation_cache, caplog):
  from segnext_jax import load_checkpoint, metric_writer
  wd = tmp_path / "run"
  # step 1 on 1 device (this process): the run that 2 devices resume
  cfg, _, _ = command("train").resolve([*TRAIN, "--steps", "3", "--workdir", str(wd)])
  train_and_evaluate(cfg, stop_after=1, progress=False)
  # steps 2-3 on 2 devices. The process gets a copy of the session's cache of its own (its
  # 1-device programs load from there; nobody else writes to it meanwhile)
  own = tmp_path / "jax_cache"
  shutil.copytree(compilation_cache["JAX_COMPILATION_CACHE_DIR"], own)
  steps_cached = lambda cache: {p.name for p in Path(cache).glob("*train_step*")}
  before = steps_cached(own)
  _run(cache_env(own), "train.py", 2, *TRAIN, "--steps", "3", "--workdir", wd)
  assert steps_cached(own) == before  # a step over several CPU devices is never cached (train.py)
  assert steps_cached(compilation_cache["JAX_COMPILATION_CACHE_DIR"])  # ... while a 1-device step is
  # what the 2 devices wrote, on 1 device (this process): load, evaluate, predict
  model, variables = load_checkpoint(wd)
  x = np.zeros((1, 64, 64, 3), np.float32)
  assert jax.jit(model.apply)(variables, x).shape == (1, 8, 8, 6)
  _main("eval", wd, "--max-images", "2")
  (tmp_path / "img.png").write_bytes((REPO / "tests/data/ade20k_val3/images/validation/ADE_val_00000003.jpg").read_bytes())
  _main("predict", wd, tmp_path / "img.png", "-o", tmp_path / "pred")
  assert (tmp_path / "pred" / "img_classes.png").is_file()
  # fine-tune from it on 1 device, and resume it on 1
  ft = tmp_path / "ft1"
  _main("train", *TRAIN, "--steps", "3", "--workdir", ft, "--pretrained", wd)
  n_vars = len(jax.tree.leaves(variables))
  assert f"loaded {n_vars} tensors; re-initialised 0" in caplog.text, caplog.text[-2000:]
  _main("train", *TRAIN, "--steps", "4", "--workdir", wd)
  steps = [r["step"] for r in metric_writer.read(wd) if r["split"] == "train"]
  assert steps == [1, 2, 3, 4]
  assert [r["step"] for r in metric_writer.read(ft) if r["split"] == "train"] == [1, 2, 3]
