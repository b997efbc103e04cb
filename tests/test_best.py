"""train.py --save-best: WORKDIR/best holds the validated step with the highest metric, across a
signal, a kill and a resume; eval.py reads it and gets that metric. In-process, TINY, on
test_faults' 20-step recipe (the same step program, from the session's compile cache)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from conftest import TINY_RUN, command
from segnext_jax import best_checkpoint, checkpoint, eval as eval_lib, faults, metric_writer, run_checkpoint, trainer
from segnext_jax.config import make_config
from segnext_jax.recipes import RECIPES

STEPS = 20


def cfg(workdir, **kw):
  return make_config(RECIPES["synthetic"], {**TINY_RUN, "steps": STEPS, "eval_images": 2,
                                            "eval_every": 2, "save_best": "mIoU",
                                            "workdir": str(workdir), **kw})


def val_records(workdir) -> list[dict]:
  return [r for r in metric_writer.read(workdir) if r["split"] == "val"]


def best_meta(workdir) -> dict:
  steps = checkpoint.complete_steps(workdir / "best")
  assert len(steps) == 1, steps
  return checkpoint.read_meta(workdir / "best", steps[0])


def assert_running_best(records: list[dict], metric: str = "mIoU") -> tuple[int, float]:
  """Each validation line records the best so far (the first highest value): never reset."""
  top = None
  for r in records:
    v = r[metric]
    if v is not None and (top is None or v > top[1]):
      top = (r["step"], v)
    assert (r["best_step"], r[f"best_{metric}"]) == top, (r["step"], top)
  return top


def assert_best_holds_step(workdir, step: int) -> None:
  """best/ holds that step's weights: equal to the run's own checkpoint of the step."""
  _, best, _ = checkpoint.load(workdir / "best")
  _, run, _ = checkpoint.load(workdir, step)
  for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(run)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_best_across_a_signal_and_resume_is_the_highest_and_evaluates_to_it(tmp_path, monkeypatch,
                                                                            capsys):
  """SIGTERM at step 7, then the same run resumed to step 20 (validation every 2 steps): best/
  holds the step with the highest val mIoU of metrics.jsonl, its metadata records it, and eval.py
  on best/ gives that mIoU."""
  wd = tmp_path / "run"

  class SignalAt7(metric_writer.MetricWriter):
    def write(self, step, scalars, **kw):
      super().write(step, scalars, **kw)
      if step == 7 and kw.get("prefix", "train") == "train":
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (main) thread: saves step 7

  monkeypatch.setattr(trainer, "MetricWriter", SignalAt7)
  with pytest.raises(faults.Stopped, match="SIGTERM after step 7"):
    trainer.train_and_evaluate(cfg(wd, ckpt_every=10), progress=False)
  before = assert_running_best(val_records(wd))
  assert best_meta(wd)["best_step"] == before[0] <= 6
  monkeypatch.undo()
  out = trainer.train_and_evaluate(cfg(wd, ckpt_every=10), progress=False)
  records = val_records(wd)
  assert [r["step"] for r in records] == list(range(2, STEPS + 1, 2))
  step, value = assert_running_best(records)
  assert value == max(r["mIoU"] for r in records)
  meta = best_meta(wd)
  assert (meta["best_step"], meta["best_mIoU"]) == (step, value)
  assert meta["best"] == {"metric": "mIoU", "value": value, "step": step}
  assert out["best"] == {"metric": "mIoU", "value": value, "step": step, "dir": str(wd / "best")}
  js = tmp_path / "best.json"
  assert command("eval").main([str(wd / "best"), "--max-images", "2", "--out", str(js)]) == 0
  assert json.loads(js.read_text())["mIoU"] == pytest.approx(value, abs=6e-4)  # 3 decimals there


# A validation history with a NaN, a tie and the best neither first nor last.
SCRIPT = {2: 30.0, 4: 50.0, 6: 60.0, 8: 40.0, 10: math.nan, 12: 60.0, 14: 55.0, 16: 70.0,
          18: 65.0, 20: 10.0}


def scripted_evaluate(monkeypatch):
  """evaluate() returning SCRIPT's mIoU for the step just trained (read from the train line)."""
  at = {}

  class Track(metric_writer.MetricWriter):
    def write(self, step, scalars, **kw):
      if kw.get("prefix", "train") == "train":
        at["step"] = step
      super().write(step, scalars, **kw)

  def evaluate(segmenter, variables, dataset, max_images=0, progress=True, workers=4):
    m = SCRIPT[at["step"]] / 100
    k = dataset.num_classes
    return {"aAcc": 0.5, "mIoU": m, "mAcc": 0.5, "IoU": np.full(k, m), "Acc": np.full(k, 0.5),
            "images": 2, "images_here": 2, "devices": 1, "processes": 1, "seconds": 0.0,
            "images_per_s": 0.0, "confusion": np.zeros((k, k))}

  monkeypatch.setattr(trainer, "MetricWriter", Track)
  monkeypatch.setattr(eval_lib, "evaluate", evaluate)


def test_best_survives_a_kill_and_only_a_higher_value_replaces_it(tmp_path, monkeypatch, capsys):
  """A run killed after step 7 with its last checkpoint at 4 (best/ at 6): the resumed run redoes
  5-7, keeps the recorded best (the redone step 6 ties it), passes over a NaN and a tie, and ends
  with step 16's weights as best/. Another metric on this workdir is refused in one line."""
  scripted_evaluate(monkeypatch)
  wd = tmp_path / "run"
  trainer.train_and_evaluate(cfg(wd, ckpt_every=4, keep_ckpts=20), stop_after=7, progress=False)
  assert best_meta(wd)["best"]["step"] == 6
  shutil.rmtree(wd / "checkpoints" / "7")  # the kill came before step 7's save
  best_files = {p: p.stat().st_mtime_ns for p in (wd / "best").rglob("*") if p.is_file()}
  trainer.train_and_evaluate(cfg(wd, ckpt_every=4, keep_ckpts=20), stop_after=12, progress=False)
  assert {p: p.stat().st_mtime_ns for p in (wd / "best").rglob("*") if p.is_file()} == best_files
  trainer.train_and_evaluate(cfg(wd, ckpt_every=4, keep_ckpts=20), progress=False)
  records = val_records(wd)
  assert [r["step"] for r in records] == list(range(2, STEPS + 1, 2))
  assert records[4]["mIoU"] is None and assert_running_best(records) == (16, 70.0)
  assert best_meta(wd)["best"] == {"metric": "mIoU", "value": 70.0, "step": 16}
  assert checkpoint.complete_steps(wd / "best") == [16]
  assert_best_holds_step(wd, 16)

  with pytest.raises(ValueError, match="keeps the best mIoU"):  # in every process, lead or not
    best_checkpoint.BestCheckpoint(wd, "aAcc", cfg(wd), resumed=True, lead=False)
  capsys.readouterr()
  argv = ["--config", str(wd / "config.json"), "--steps", "22", "--save-best", "aAcc"]
  assert command("train").main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: {wd / 'best'} keeps the best mIoU (step 16); --save-best aAcc would "
                 "replace it: move it aside or use --save-best mIoU"], err
  assert json.loads((wd / "config.json").read_text())["steps"] == STEPS  # nothing written


def test_recovery_keeps_one_complete_best_and_sets_aside_another_recipes(tmp_path, monkeypatch):
  """Two complete steps (a kill between a new best's save and the old one's removal) and an
  unfinished save: the higher value is kept, the rest removed. A fresh run of another recipe in
  the workdir keeps the old best aside as best.previous."""
  scripted_evaluate(monkeypatch)
  wd = tmp_path / "run"
  four = cfg(wd, ckpt_every=4, steps=4)  # TINY_RUN at 4 steps: test_cli's step program
  trainer.train_and_evaluate(four, stop_after=2, progress=False)
  best = wd / "best" / "checkpoints"
  shutil.copytree(best / "2", tmp_path / "old")
  trainer.train_and_evaluate(four, progress=False)
  assert checkpoint.complete_steps(wd / "best") == [4]
  shutil.copytree(tmp_path / "old", best / "2")  # left behind by a kill: recorded 30, not 50
  (best / "8.orbax-checkpoint-tmp-1").mkdir()
  keeper = best_checkpoint.BestCheckpoint(wd, "mIoU", four, resumed=True, lead=True)
  assert (keeper.step, keeper.value) == (4, 50.0) and sorted(p.name for p in best.iterdir()) == ["4"]
  again = best_checkpoint.BestCheckpoint(wd, "mIoU", four, resumed=False, lead=True)
  assert (again.step, again.value) == (4, 50.0)  # a fresh start of the same recipe keeps it

  shutil.rmtree(wd / "checkpoints")  # no run step: the next run starts afresh
  other = cfg(wd, ckpt_every=4, steps=4, lr=1e-4)
  fresh = best_checkpoint.BestCheckpoint(wd, "mIoU", other, resumed=False, lead=True)
  assert fresh.step is None and not (wd / "best").exists()
  assert checkpoint.complete_steps(wd / "best.previous") == [4]


def test_check_space_counts_the_best_checkpoint(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(faults, "free_bytes", lambda d: 25 << 20)
  run_checkpoint.check_space(tmp_path, 10 << 20, 2)
  assert not caplog.text
  run_checkpoint.check_space(tmp_path, 10 << 20, 2, best=8 << 20)
  assert "the 2 checkpoints this run keeps and its best need ~28.0 MB" in caplog.text


def test_a_best_that_does_not_fit_is_one_line_naming_what_is_intact(tmp_path, monkeypatch):
  """No room before the write, or ENOSPC during it: DiskFull naming the step and the best that is
  intact; an unfinished write is removed."""
  class State:
    def variables(self):
      return {"params": {"w": np.zeros((256, 1024), np.float32)}}  # 1 MB

  best = best_checkpoint.BestCheckpoint(tmp_path, "mIoU", cfg(tmp_path), resumed=False, lead=True)
  monkeypatch.setattr(faults, "free_bytes", lambda d: 1 << 20)
  with pytest.raises(faults.DiskFull, match=r"best/checkpoints: no space for the best checkpoint of step 6 "
                     r"\(needs ~2.0 MB, 1.0 MB free\); no best step saved yet; free space"):
    best.save(6, 50.0, State().variables(), {})
  monkeypatch.setattr(faults, "free_bytes", lambda d: 1 << 40)
  best.step, best.value = 4, 40.0

  def full(*a):
    (best.dir / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir(parents=True)
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(best, "_write", full)
  with pytest.raises(faults.DiskFull, match=r"step 6 .*the best so far \(step 4\) is intact"):
    best.save(6, 50.0, State().variables(), {})
  assert not list((best.dir / "checkpoints").iterdir())
