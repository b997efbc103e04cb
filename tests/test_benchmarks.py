"""The benchmarks run their code paths at toy sizes on the CPU (what CI can do), measure what the
product runs (the train step on TrainLoader's batch), and all.py records a run whole or not at all."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def benchmark(name: str):
  """benchmarks/<name>.py as a module (benchmarks/ is a folder of scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def rows_of(text: str, title: str) -> list[list[str]]:
  """The body rows of the table printed under the line starting with `title`."""
  block = text.split("\n" + title, 1)[1].split("\n\n", 1)[0]
  return [[c.strip() for c in l.strip("|").split("|")] for l in block.splitlines()[3:] if l.startswith("|")]


@pytest.mark.slow  # ~10 min on 2 busy cores: three T train steps compile (docs/testing.md)
def test_gpu_benchmark_dry_run():
  res = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu.py"), "--dry-run"],
                       capture_output=True, text=True, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  out = res.stdout
  assert [r[0] for r in rows_of(out, "depthwise")] == ["shift", "lax", "lax_autodiff", "torch"]
  train = rows_of(out, "train step")
  assert [(r[1], r[2], r[3]) for r in train] == [("JAX", "fp32", "plain"), ("JAX", "bf16", "plain"),
                                                 ("JAX", "fp32", "CPU measures"),
                                                 ("mmseg torch", "fp32", "eager")], train
  inference = rows_of(out, "inference")
  assert [r[2] for r in inference] == ["fp32", "bf16"]
  for r in inference:  # error against torch fp32: fp32 tight, bf16 within bf16's precision
    assert float(r[6]) < (1e-5 if r[2] == "fp32" else 5e-2), r
  assert re.search(r"^workers=2 images_per_s=[0-9.]+$", out, re.M)
  assert re.search(r"^implied policy for cpu: dw_impl=\w+, gradient_boundary=(True|False)", out, re.M)


def test_all_records_a_run_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
  """benchmarks/all.py writes the machine, each command and its tables to the record; a failing
  benchmark leaves the previous record as it was (exit 2, one error line)."""
  bench = benchmark("all")
  (tmp_path / "ok.py").write_text("print('| a | b |'); print('|---|---|'); print('| 1 | 2 |')\n")
  (tmp_path / "bad.py").write_text("import sys; print('half'); sys.exit('broken on purpose')\n")
  record = tmp_path / "benchmarks.md"
  monkeypatch.setattr(bench, "HERE", tmp_path)
  monkeypatch.setattr(bench, "jobs", lambda quick: [["ok.py", "--x", "1"]])
  monkeypatch.setattr(sys, "argv", ["all.py", "--out", str(record)])
  assert bench.main() == 0
  text = record.read_text()
  assert text.startswith(bench.PREAMBLE) and "### `python benchmarks/ok.py --x 1`" in text
  assert "| a | b |\n|---|---|\n| 1 | 2 |" in text and "- CPU: " in text and "- commit: " in text
  monkeypatch.setattr(bench, "jobs", lambda quick: [["ok.py"], ["bad.py"]])
  capsys.readouterr()
  assert bench.main() == 2
  assert record.read_text() == text and not list(tmp_path.glob("*.tmp"))
  err = capsys.readouterr().err.strip().splitlines()
  assert "broken on purpose" in err[0] and err[-1].startswith("error: benchmarks/bad.py failed")


def test_train_batch_is_the_loaders():
  """The benchmarks' train batch is the one TrainLoader yields for the same config: same keys,
  dtypes (uint8 image and label, int32 'hw': the step's device-normalised path) and values."""
  from segnext_jax.config import TrainConfig
  from segnext_jax.data.loader import TrainLoader
  from segnext_jax.data.transforms import TrainPipeline
  common = benchmark("common")
  cfg = TrainConfig(batch_size=2, crop_size=64)
  got = common.train_batch(cfg)
  pipeline = TrainPipeline(crop=(cfg.crop_size, cfg.crop_size), scale=tuple(cfg.resize_scale))
  loader = TrainLoader(common.NoiseScenes(seed=cfg.seed), pipeline, cfg.batch_size, cfg.seed, workers=0)
  try:
    step, want = next(iter(loader))
  finally:
    loader.close()
  assert step == 0 and sorted(got) == sorted(want) == ["hw", "image", "label"]
  assert {k: (v.dtype, v.shape) for k, v in got.items()} == {
      "image": (np.uint8, (2, 64, 64, 3)), "label": (np.uint8, (2, 64, 64)), "hw": (np.int32, (2, 2))}
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  del want


@pytest.mark.slow  # compiles a T train step (~1 min on 2 busy cores)
def test_train_step_benchmark_smoke():
  """train_step.py at a toy size: three rows, the malloc policy on for JAX and the third torch row
  only (benchmarks/train_step.py's design), times and peak memory filled in."""
  res = subprocess.run([sys.executable, str(REPO / "benchmarks/train_step.py"), "--size", "64",
                        "--runs", "1"], capture_output=True, text=True, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = rows_of(res.stdout, "machine limit")
  assert [(r[0], r[1]) for r in rows] == [("JAX (jit), train.py's step", "on"),
                                          ("mmseg torch", "off"), ("mmseg torch", "on")], rows
  assert all(float(r[2]) > 0 and float(r[6]) > 0 for r in rows), rows
