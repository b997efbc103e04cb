"""The one-call GPU benchmark runs its whole code path at toy sizes on the CPU (what CI can do)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
  import importlib.util
  spec = importlib.util.spec_from_file_location("benchmarks_all", REPO / "benchmarks/all.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
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
