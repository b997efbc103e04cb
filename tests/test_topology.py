"""Checkpoints and training do not depend on the device topology: a run written on 1 device
resumes on 2 forced host devices; what the 2 devices wrote is loaded, evaluated, predicted with,
fine-tuned from and resumed on 1; and the steps trained on 2 devices (the global batch's BN) give
what 1 device gives. The 2-device run is one train.py process, shared by both tests; the 1-device
runs are in this (1-device) test process. The recipe and step budgets (3, then 4) are test_cli's:
the 1-device step programs are shared through the session's compile cache."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import TINY_RUN_FLAGS, cache_env, command, host_devices_env
from segnext_jax import checkpoint, metric_writer
from segnext_jax.trainer import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
TRAIN = TINY_RUN_FLAGS + ["--eval-every=1000", "--eval-images=2"]


def _run(cache: dict, script: str, devices: int, *args: str) -> subprocess.CompletedProcess:
  """One CLI run on `devices` host devices, with the compile cache `cache`."""
  env = dict(os.environ, **cache, **host_devices_env(devices))
  res = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True,
                       text=True, env=env, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  return res


def _main(script: str, *args) -> None:
  """One CLI run in this process (1 device, the session's compile cache)."""
  assert jax.device_count() == 1
  assert command(script).main([str(a) for a in args]) == 0


def _train_cfg(workdir: Path, steps: int):
  cfg, _, _ = command("train").resolve([*TRAIN, "--steps", str(steps), "--workdir", str(workdir)])
  return cfg


@pytest.fixture(scope="module")
def two_device_run(tmp_path_factory, compilation_cache) -> Path:
  """A 3-step run: step 1 on 1 device (this process), steps 2-3 resumed on 2 (train.py), each
  step saved."""
  root = tmp_path_factory.mktemp("topology")
  wd = root / "run"
  train_and_evaluate(_train_cfg(wd, 3), stop_after=1, progress=False)
  # the process gets a copy of the session's cache of its own (its 1-device programs load from
  # there; nobody else writes to it meanwhile)
  own = root / "jax_cache"
  shutil.copytree(compilation_cache["JAX_COMPILATION_CACHE_DIR"], own)
  steps_cached = lambda cache: {p.name for p in Path(cache).glob("*train_step*")}
  before = steps_cached(own)
  _run(cache_env(own), "train.py", 2, *TRAIN, "--steps", "3", "--ckpt-every", "1", "--workdir", wd)
  assert steps_cached(own) == before  # a step over several CPU devices is never cached (train.py)
  assert steps_cached(compilation_cache["JAX_COMPILATION_CACHE_DIR"])  # ... while a 1-device step is
  return wd


def test_two_devices_to_one_and_back(two_device_run, tmp_path, caplog):
  from segnext_jax import load_checkpoint
  wd = tmp_path / "run"
  shutil.copytree(two_device_run, wd)
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


def test_two_host_devices_match_one(two_device_run, tmp_path):
  """Step 2 (the first at the full lr) on 2 devices, one image each, against the same step on 1:
  the same loss, gradient norm, global-batch BN statistics and parameters."""
  one = train_and_evaluate(_train_cfg(tmp_path / "one", 3), stop_after=2, progress=False)["state"]
  assert checkpoint.complete_steps(two_device_run, checkpoint.ITEMS)[-2:] == [2, 3]
  _, two_vars, _ = checkpoint.load(two_device_run, step=2)
  train = lambda wd: [r for r in metric_writer.read(wd) if r["split"] == "train"][:2]
  a, b = train(tmp_path / "one"), train(two_device_run)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
  assert a[0]["loss"] == b[0]["loss"]  # step 1 ran on 1 device in both
  assert b[1]["loss"] == pytest.approx(a[1]["loss"], rel=1e-5)
  assert b[1]["grad_norm"] == pytest.approx(a[1]["grad_norm"], rel=1e-4)
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
  np.testing.assert_allclose(flat(two_vars["batch_stats"]), flat(one.batch_stats), rtol=1e-4,
                             atol=1e-6)  # global-batch BN
  # Adam's step moves every parameter by about lr * sign(g): parameters whose true gradient is 0
  # (conv biases before a train-mode BN) follow rounding noise, so allow 2 lr there.
  two, ref = flat(two_vars["params"]), flat(one.params)
  np.testing.assert_allclose(two, ref, rtol=0, atol=2 * a[1]["lr"])
  moved = np.abs(two - ref) > 1e-6
  assert moved.mean() < 0.01, moved.mean()
