"""The one-call GPU benchmark runs its whole code path at toy sizes on the CPU (what CI can do)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~170 s: T inference and its train step in three processes (docs/testing.md)
def test_gpu_benchmark_dry_run():
  res = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu.py"), "--dry-run"],
                       capture_output=True, text=True, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [l for l in res.stdout.splitlines() if l.startswith("| ") and "---" not in l][1:]
  kinds = [(r.split("|")[1].strip(), r.split("|")[4].strip()) for r in rows]
  assert kinds == [("inference", "fp32"), ("inference", "bf16"), ("train step", "fp32")], rows
  for r in rows[:2]:  # parity column: fp32 tight, bf16 within bf16's precision
    err = float(r.split("|")[8])
    assert err < (1e-4 if "fp32" in r else 0.5), r
