"""Faults and bad input lose nothing and say one line (docs/faults.md): signals, interrupted saves,
damaged steps, NaN, a second run, bad settings, a full disk, bad paths and images."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, command, shm_left
from segnext_jax import checkpoint, cli, config, faults, metric_writer, train_lib, trainer
from segnext_jax.config import make_config
from segnext_jax.recipes import RECIPES
from segnext_jax.data.datasets import Synthetic

REPO = Path(__file__).resolve().parents[1]
# One recipe for every run here (steps and lr are constants of the step program): one compile.
TRAIN_FLAGS = ["--model-overrides", json.dumps(TINY), "--batch-size=2", "--crop-size=64",
               "--resize-scale", "128", "64", "--warmup-steps=1", "--workers=1",
               "--eval-images=2", "--log-every=1", "--steps=20", "--eval-every=1000"]


def tiny_cfg(workdir: Path, **kw):
  base = dict(model_overrides=TINY, steps=20, batch_size=2, crop_size=64, resize_scale=(128, 64),
              warmup_steps=1, eval_every=1000, eval_images=2, ckpt_every=10, log_every=1, workers=1,
              workdir=str(workdir))
  return make_config(RECIPES["synthetic"], {**base, **kw})


def params(state) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def assert_same_params(a, b) -> None:
  for x, y in zip(params(a), params(b)):
    np.testing.assert_array_equal(x, y)


def one_error_line(err: str, *needles: str) -> str:
  """The output ends with one line naming the cause, and holds no traceback."""
  assert "Traceback" not in err, err[-3000:]
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert lines, "nothing said"
  for n in needles:
    assert n in lines[-1], (n, lines[-1])
  return lines[-1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted 20-step run (checkpoints 10 and 20): the reference for every resume."""
  wd = tmp_path_factory.mktemp("straight") / "run"
  return wd, trainer.train_and_evaluate(tiny_cfg(wd), progress=False)


def copy_run(src: Path, dst: Path, keep: tuple[int, ...]) -> Path:
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns(faults.LOCK_FILE))
  for p in (dst / "checkpoints").iterdir():
    if p.name.isdigit() and int(p.name) not in keep:
      shutil.rmtree(p)
  return dst


# ---------------------------------------------------------------------------------------------
# (1) signals

def test_signal_saves_the_step_it_was_at_and_resume_is_bit_identical(straight, tmp_path, monkeypatch,
                                                                     slow_shm_frees):
  """SIGINT at step 4 (checkpoints every 10): step 4 is saved, exit 130, and no worker batch's
  shared memory is left to the exit (even with slow unlinks); the resumed run ends bit-identical
  to the uninterrupted one."""
  wd = tmp_path / "run"

  class SignalAt4(metric_writer.MetricWriter):
    def write(self, step, scalars, **kw):
      super().write(step, scalars, **kw)
      if step == 4:
        os.kill(os.getpid(), signal.SIGINT)  # a real signal, handled in this (main) thread

  monkeypatch.setattr(trainer, "MetricWriter", SignalAt4)
  with pytest.raises(faults.Stopped, match=r"SIGINT after step 4: saved .*checkpoints/4") as e:
    trainer.train_and_evaluate(tiny_cfg(wd), progress=False)
  assert e.value.exit_code == 130
  assert slow_shm_frees and not shm_left(slow_shm_frees)
  assert checkpoint.complete_steps(wd, checkpoint.ITEMS) == [4]
  monkeypatch.undo()
  resumed = trainer.train_and_evaluate(tiny_cfg(wd), progress=False)
  assert_same_params(resumed["state"], straight[1]["state"])
  assert [l for _, l in resumed["history"]["loss"]] == [l for _, l in straight[1]["history"]["loss"]][4:]
  assert [r["step"] for r in metric_writer.read(wd) if r["split"] == "train"] == list(range(1, 21))


def test_second_signal_exits_at_once(monkeypatch, capsys):
  exits = []
  monkeypatch.setattr(faults.os, "_exit", lambda code: exits.append(code))
  with faults.GracefulStop() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.name == "SIGTERM" and not exits
    os.kill(os.getpid(), signal.SIGTERM)
  assert exits == [143]
  assert "second SIGTERM, exiting at once without saving" in capsys.readouterr().err
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed after the run


def test_sigterm_to_train_py_saves_and_the_same_command_resumes(tmp_path, compilation_cache, caplog):
  """Pinned: SIGTERM leaves WORKDIR/checkpoints/<step> for the step it was at; the same command
  resumes (here in this process: train.py's main with the same arguments); metrics.jsonl has one
  line with "loss" per step."""
  wd = tmp_path / "run"
  argv = [*TRAIN_FLAGS, "--ckpt-every=1000", f"--workdir={wd}"]
  cmd = [sys.executable, str(REPO / "train.py"), *argv]
  env = dict(os.environ, **compilation_cache)
  log = tmp_path / "stderr.txt"
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=f)
    deadline = time.time() + 240
    while len(metric_writer.read(wd)) < 2 and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
  err = log.read_text()
  assert proc.returncode == 143, err[-3000:]
  at = max(r["step"] for r in metric_writer.read(wd))
  assert 2 <= at < 20
  one_error_line(err, f"stopped: SIGTERM after step {at}: saved", f"checkpoints/{at}")
  assert checkpoint.complete_steps(wd, checkpoint.ITEMS) == [at]
  assert command("train").main(argv) == 0
  assert f"resumed from {wd}/checkpoints at step {at}" in caplog.text
  train = [r for r in metric_writer.read(wd) if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 21)) and all("loss" in r for r in train)


# ---------------------------------------------------------------------------------------------
# (2) is this a resume? unfinished saves, damaged steps

def test_unfinished_first_save_is_removed_and_pretrained_loads(tmp_path, caplog, monkeypatch):
  """A kill during the first save leaves only checkpoints/N.orbax-checkpoint-tmp*: that is no
  resume, so --pretrained is loaded (its weights are where training starts)."""
  from segnext_jax.model import init_variables
  cfg = tiny_cfg(tmp_path / "run")
  model = train_lib.build_model(cfg, 6)
  source = jax.tree.map(np.asarray, dict(init_variables(model, jax.random.key(7))))
  pre = checkpoint.save_converted(tmp_path / "pre", source, dict(
      variant="t", model=train_lib.model_kwargs(cfg, 6)))
  leftover = tmp_path / "run" / "checkpoints" / "6.orbax-checkpoint-tmp-1733000000"
  (leftover / "model").mkdir(parents=True)
  (leftover / "model" / "half").write_bytes(b"x" * 100)
  seen = {}
  real = train_lib.create_train_state
  def spy(cfg, model, variables):
    seen["variables"] = jax.tree.map(np.asarray, variables)  # before the step donates them
    return real(cfg, model, variables)
  monkeypatch.setattr(trainer, "create_train_state", spy)
  trainer.train_and_evaluate(dataclasses.replace(cfg, pretrained=str(pre)), progress=False)
  assert "an unfinished checkpoint (an interrupted save); ignored and removed" in caplog.text
  assert f"pretrained {pre}" in caplog.text and "resumed" not in caplog.text
  assert not leftover.exists()
  np.testing.assert_array_equal(
      np.asarray(seen["variables"]["params"]["backbone"]["patch_embed1"]["proj_0"]["kernel"]),
      source["params"]["backbone"]["patch_embed1"]["proj_0"]["kernel"])


def test_unreadable_latest_step_falls_back_naming_it(straight, tmp_path, caplog):
  wd = copy_run(straight[0], tmp_path / "run", keep=(10, 20))
  for d in (wd / "checkpoints" / "20" / "opt").rglob("d"):
    shutil.rmtree(d)  # the optimizer state's data files are gone
  resumed = trainer.train_and_evaluate(tiny_cfg(wd), progress=False)
  assert re.search(r"checkpoints/20 cannot be read \(.*\); resuming from step 10 instead; the "
                   r"damaged step is kept as 20\.unreadable", caplog.text), caplog.text
  assert_same_params(resumed["state"], straight[1]["state"])
  assert checkpoint.complete_steps(wd, checkpoint.ITEMS) == [10, 20]  # 20 written again
  assert (wd / "checkpoints" / "20.unreadable").is_dir()


def test_no_readable_step_stops_naming_the_newest(straight, tmp_path, capsys):
  wd = copy_run(straight[0], tmp_path / "run", keep=(10, 20))
  for d in (wd / "checkpoints").rglob("d"):
    shutil.rmtree(d)
  code = command("train").main([*TRAIN_FLAGS, "--ckpt-every=10", f"--workdir={wd}"])
  assert code == 2
  one_error_line(capsys.readouterr().err, "checkpoints/20: cannot be read",
                 "no older step could be read either")
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["10", "20"]  # nothing renamed


# ---------------------------------------------------------------------------------------------
# (3) non-finite loss

@pytest.mark.parametrize("log_every, ckpt_every", [(5, 7), (1000, 1000)])
def test_non_finite_loss_stops_with_the_step_and_never_saves_it(tmp_path, capsys, monkeypatch,
                                                                log_every, ckpt_every):
  """Parameters gone to inf before step 7 (as a diverging lr leaves them; the same compiled step
  program as every other run here): caught at step 7 whether or not it is a logging step (the
  flag is read a step late, no sync), before the save of step 7, one line with the step and a
  hint, exit 2, nothing non-finite on disk."""
  wd = tmp_path / "run"
  real = train_lib.jit_train_step
  def poisoned(cfg, mesh):
    step, calls = real(cfg, mesh), iter(range(10**6))
    def run(state, batch, key):
      if next(calls) == 6:
        state = state.replace(params=jax.tree.map(lambda p: p * jnp.inf, state.params))
      return step(state, batch, key)
    return run
  monkeypatch.setattr(trainer, "jit_train_step", poisoned)
  code = command("train").main([*TRAIN_FLAGS, f"--log-every={log_every}",
                                    f"--ckpt-every={ckpt_every}", f"--workdir={wd}"])
  assert code == 2
  one_error_line(capsys.readouterr().err, "at step 7: training diverged; lower --lr (now 0.001)",
                 "no checkpoint was saved")
  assert checkpoint.complete_steps(wd, checkpoint.ITEMS) == []
  assert [r["step"] for r in metric_writer.read(wd)] == ([5] if log_every == 5 else [])


# ---------------------------------------------------------------------------------------------
# (4) the workdir lock

HOLD = "import sys, time; sys.path.insert(0, {repo!r}); from segnext_jax import faults; " \
       "faults.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)"


def test_second_run_on_a_locked_workdir_stops_naming_the_holder(tmp_path, capsys):
  wd = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO)), str(wd)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    t = time.perf_counter()
    code = command("train").main([*TRAIN_FLAGS, "--steps=2", f"--workdir={wd}"])
    assert code == 2 and time.perf_counter() - t < 10
    one_error_line(capsys.readouterr().err, f"{wd} is in use by PID {holder.pid} on host",
                   "train.lock")
  finally:
    holder.kill()
    holder.wait()
  # the holder died: its lock file stays, naming it, but blocks nobody
  assert f"PID {holder.pid}" in (wd / faults.LOCK_FILE).read_text()
  with faults.WorkdirLock(wd) as lock:
    assert f"PID {os.getpid()}" in lock.path.read_text()
    with pytest.raises(faults.WorkdirLocked, match=f"PID {os.getpid()}"):
      faults.WorkdirLock(wd).acquire()  # another open of the file: refused, even in-process


# ---------------------------------------------------------------------------------------------
# (5) settings

@pytest.mark.parametrize("flags, needle", [
    (["--batch-size=0"], "--batch-size 0: must be at least 1"),
    (["--batch-size=-1"], "--batch-size -1: must be at least 1"),
    (["--steps=0"], "--steps 0: must be at least 1"),
    (["--crop-size=16"], "--crop-size 16: must be at least 32"),
    (["--resize-scale", "0", "64"], "--resize-scale 0 64: must be positive"),
    (["--ckpt-every=0"], "--ckpt-every 0: must be at least 1"),
    (["--save-best=bogus"], "--save-best 'bogus': expected one of mIoU, mAcc, aAcc or IoU.<class"),
    (["--save-best=IoU.nope"], "--save-best IoU.nope: the data has no class 'nope' (classes: "),
    (["--class-weight=1,2"], "--class-weight has 2 weights, but synthetic has 6 classes"),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, capsys, flags, needle):
  wd = tmp_path / "run"
  assert command("train").main([*TRAIN_FLAGS, f"--workdir={wd}", *flags]) == 2
  one_error_line(capsys.readouterr().err, needle)
  assert not wd.exists()


def test_class_weights_from_a_file_are_recorded_and_part_of_the_recipe(tmp_path, capsys):
  """One weight per line (or commas/spaces) in a file; config.json records the numbers, so a
  resume with other weights is refused; a config.json that predates the loss options resumes.
  A value that is not a list of weights is one line naming the flag and the value, status 2, as
  any command line the parser cannot take."""
  from segnext_jax.cli.train import resolve
  for value, needle in [("1,-2,1,1,1,1", "1,-2,1,1,1,1: -2.0 is not a weight (finite, 0 or more)"),
                        ("0,0,0,0,0,0", "0,0,0,0,0,0: no positive weight"),
                        ("1,x", "1,x: could not convert string to float: 'x'"),
                        ("w.txt", "'w.txt': neither a file nor comma-separated weights")]:
    assert command("train").main([*TRAIN_FLAGS, "--class-weight", value]) == 2
    line = one_error_line(capsys.readouterr().err, "error: argument --class-weight/--class_weight: ")
    assert line.endswith(f"{needle} (see {Path(sys.argv[0]).name} --help)"), line
  assert command("eval").main(["ckpt", "--no-such-flag"]) == 2
  one_error_line(capsys.readouterr().err, "error: unrecognized arguments: --no-such-flag (see ")
  from segnext_jax.config import recipe_diff, to_json
  (tmp_path / "w.txt").write_text("1\n2.5\n1, 1\n0.5 3\n")
  cfg = resolve([*TRAIN_FLAGS, "--class-weight", str(tmp_path / "w.txt")])[0]
  assert cfg.class_weight == (1.0, 2.5, 1.0, 1.0, 0.5, 3.0) and not cfg.avg_non_ignore
  saved = json.loads(to_json(cfg))
  assert saved["class_weight"] == [1.0, 2.5, 1.0, 1.0, 0.5, 3.0] and recipe_diff(saved, cfg) == []
  plain = resolve(TRAIN_FLAGS)[0]
  assert recipe_diff(saved, plain) == ["class_weight: [1.0, 2.5, 1.0, 1.0, 0.5, 3.0] -> []"]
  older = {k: v for k, v in json.loads(to_json(plain)).items()
           if k not in ("class_weight", "avg_non_ignore", "save_best")}
  assert recipe_diff(older, plain) == []
  assert recipe_diff(older, resolve([*TRAIN_FLAGS, "--avg-non-ignore=true"])[0]) == [
      "avg_non_ignore: False -> True"]


def test_settings_against_devices_and_warmup_warning(tmp_path, caplog):
  with pytest.raises(ValueError, match="--batch-size 3: must be a multiple of the 2 devices"):
    config.validate(tiny_cfg(tmp_path, batch_size=3), devices=2, processes=1)
  config.validate(tiny_cfg(tmp_path, warmup_steps=30, steps=20), devices=1, processes=1)
  assert "--warmup-steps 30 is longer than the run (--steps 20)" in caplog.text
  with pytest.raises(ValueError, match="mscan_x: no such file or directory, nor a released model"):
    config.validate(tiny_cfg(tmp_path, pretrained="mscan_x"), devices=1, processes=1)
  config.validate(tiny_cfg(tmp_path, pretrained="mscan-l_imagenet"), devices=1, processes=1)


def test_recipe_refusal_needs_a_complete_checkpoint_and_a_done_run_says_so(straight, tmp_path, capsys):
  # config.json of a run that never saved a step (e.g. it failed): another recipe may start
  wd = tmp_path / "run"
  (wd / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)
  (wd / "config.json").write_text(config.to_json(tiny_cfg(wd, lr=0.5)))
  assert command("train").main([*TRAIN_FLAGS, "--ckpt-every=10", f"--workdir={wd}"]) == 0
  assert json.loads((wd / "config.json").read_text())["lr"] == 1e-3
  # a finished run, run again: nothing to do, said
  capsys.readouterr()
  done = copy_run(straight[0], tmp_path / "done", keep=(10, 20))
  assert command("train").main(["--config", str(done / "config.json")]) == 0
  assert "is already at step 20 (--steps 20): nothing to do" in capsys.readouterr().out
  # the recipe guard still holds where a complete step exists
  assert command("train").main(["--config", str(done / "config.json"), "--lr=0.5"]) == 2
  one_error_line(capsys.readouterr().err, "lr: 0.001 -> 0.5")


# ---------------------------------------------------------------------------------------------
# (6) disk full

@pytest.fixture
def small_disk(tmp_path):
  mnt = tmp_path / "disk"
  mnt.mkdir()
  res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
  if res.returncode:  # a real full disk needs a small filesystem: mounting one needs root
    pytest.skip(f"cannot mount a 3 MB tmpfs to fill (not root?): {res.stderr.strip()}")
  yield mnt
  subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_stops_with_one_line_and_the_same_command_resumes(straight, small_disk, capsys):
  """3 MB: the first checkpoint (~2 MB) fits, the second does not; one line naming the
  directory, bytes needed and free; step 10 intact; after freeing space the command resumes."""
  wd = small_disk / "run"
  argv = [*TRAIN_FLAGS, "--ckpt-every=10", f"--workdir={wd}"]
  assert command("train").main(argv) == 2
  line = one_error_line(capsys.readouterr().err, f"{wd}/checkpoints: no space for the checkpoint "
                        "of step 20", "saved steps 10 are intact")
  assert re.search(r"needs ~\d+\.\d MB, \d+\.\d MB free", line)
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["10"]
  subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
  assert command("train").main(argv) == 0
  assert checkpoint.complete_steps(wd, checkpoint.ITEMS) == [10, 20]
  model, variables = checkpoint.load_checkpoint(wd)
  for a, b in zip(jax.tree.leaves(variables["params"]), params(straight[1]["state"])):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_a_write_that_runs_out_of_space_is_one_line_too(small_disk, capfd, monkeypatch):
  """The space check passes (a wrong estimate) but orbax's writers hit ENOSPC: still one line,
  no traceback flood, no unfinished entry left."""
  wd = small_disk / "run"
  monkeypatch.setattr(faults, "free_bytes", lambda d: 1 << 40)
  argv = [*TRAIN_FLAGS, "--ckpt-every=10", f"--workdir={wd}"]
  assert command("train").main(argv) == 2
  err = capfd.readouterr().err
  one_error_line(err, f"{wd}/checkpoints: no space for the checkpoint of step 20")
  assert "Event loop is closed" not in err and "never retrieved" not in err
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["10"]


def test_unwritable_workdir_is_one_line(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  assert command("train").main([*TRAIN_FLAGS, f"--workdir={blocker}/run"]) == 2
  one_error_line(capsys.readouterr().err, f"--workdir {blocker}/run: cannot write there")


# ---------------------------------------------------------------------------------------------
# (7) eval.py, predict.py, convert/from_torch.py

def test_eval_names_what_a_bad_checkpoint_path_is(straight, tmp_path, capsys):
  ev = command("eval")
  jpg = tmp_path / "photo.jpg"
  cv2.imwrite(str(jpg), np.zeros((8, 8, 3), np.uint8))
  pth = tmp_path / "model.pth"
  pth.write_bytes(b"PK\x03\x04")
  cases = [(tmp_path / "absent", "absent: no such file or directory"),
           (jpg, "photo.jpg: an image, not a segnext-jax checkpoint directory"),
           (pth, "model.pth: a torch checkpoint file, not a segnext-jax checkpoint directory; "
                 "convert it first"),
           (tmp_path, "not a segnext-jax checkpoint (no checkpoints/<step> inside"),
           (straight[0] / "checkpoints" / "4", "checkpoints/4: no such file or directory")]
  for path, needle in cases:
    assert ev.main([str(path)]) == 2
    one_error_line(capsys.readouterr().err, needle)
  assert ev.main([str(straight[0]), "--step=4"]) == 2
  one_error_line(capsys.readouterr().err, "has no complete step 4 (steps: 10, 20)")


def test_eval_takes_a_step_and_names_an_unreadable_one(straight, tmp_path, capsys):
  ev = command("eval")
  wd = copy_run(straight[0], tmp_path / "run", keep=(10, 20))
  outs = []
  for args in ([str(wd), "--step=10"], [str(wd / "checkpoints" / "10")], [str(wd)]):
    out = tmp_path / f"r{len(outs)}.json"
    assert ev.main([*args, "--max-images=2", "--compile-cache=", f"--out={out}"]) == 0
    outs.append(json.loads(out.read_text()))
  printed = capsys.readouterr().out
  assert f"checkpoint: {wd} step 10" in printed and f"checkpoint: {wd} step 20" in printed
  assert outs[0]["per_class"] == outs[1]["per_class"]
  for d in (wd / "checkpoints" / "20" / "model").rglob("d"):
    shutil.rmtree(d)
  assert ev.main([str(wd), "--max-images=2"]) == 2
  one_error_line(capsys.readouterr().err, "checkpoints/20: cannot be read", "--step (10)")


def test_eval_refuses_a_truncated_image_before_the_model_loads(straight, tmp_path, capsys,
                                                               monkeypatch):
  from segnext_jax.cli import inference_flags as inference_cli
  root = tmp_path / "data"
  for d in ("images", "annotations"):
    (root / d / "validation").mkdir(parents=True)
  img, label = Synthetic(size=64)[0]
  good = cv2.imencode(".jpg", img[..., ::-1])[1].tobytes()
  for name, data in (("a", good), ("b", good[: len(good) // 2])):
    (root / "images" / "validation" / f"{name}.jpg").write_bytes(data)
    cv2.imwrite(str(root / "annotations" / "validation" / f"{name}.png"), label.astype(np.uint8))
  monkeypatch.setattr(inference_cli, "load", lambda *a, **k: pytest.fail("model loaded"))
  assert command("eval").main([str(straight[0]), f"--data=ade20k:{root}"]) == 2
  one_error_line(capsys.readouterr().err, "b.jpg")


def test_predict_checks_inputs_before_the_model_and_writes_nothing(straight, tmp_path, capsys,
                                                                   monkeypatch):
  from segnext_jax.cli import inference_flags as inference_cli
  pr = command("predict")
  imgs, empty = tmp_path / "imgs", tmp_path / "empty"
  imgs.mkdir(), empty.mkdir()
  good = cv2.imencode(".jpg", Synthetic(size=64)[0][0][..., ::-1])[1].tobytes()
  (imgs / "a.jpg").write_bytes(good)
  (imgs / "b.jpg").write_bytes(good[: len(good) // 2])  # truncated
  out = tmp_path / "out"
  real_load = inference_cli.load
  monkeypatch.setattr(inference_cli, "load", lambda *a, **k: pytest.fail("model loaded"))
  cases = [([str(imgs)], "b.jpg: not a readable image"),
           ([str(empty)], "empty: no images found (looked for"),
           ([str(tmp_path / "absent.jpg")], "absent.jpg: no such file or directory")]
  for inputs, needle in cases:
    assert pr.main([str(straight[0]), *inputs, "-o", str(out)]) == 2
    one_error_line(capsys.readouterr().err, needle)
    assert not out.exists()
  assert pr.main([str(tmp_path / "nockpt"), str(imgs / "a.jpg"), "-o", str(out)]) == 2
  one_error_line(capsys.readouterr().err, "nockpt: no such file or directory")
  monkeypatch.setattr(inference_cli, "load", real_load)
  assert pr.main([str(straight[0]), str(imgs / "a.jpg"), "-o", str(out), "--step=10",
                  "--compile-cache="]) == 0
  assert (out / "a_classes.png").is_file() and "step 10" in capsys.readouterr().out


def test_from_torch_names_the_kind_of_wrong_file(tmp_path, capsys):
  import torch
  conv = command("from_torch")
  jpg = tmp_path / "photo.jpg"
  cv2.imwrite(str(jpg), np.zeros((8, 8, 3), np.uint8))
  text = tmp_path / "notes.pth"
  text.write_text("hello\n")
  good = tmp_path / "good.pth"
  torch.save({"state_dict": {"a": torch.zeros(3)}}, good)
  trunc = tmp_path / "trunc.pth"
  trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  legacy = tmp_path / "legacy.pth"
  torch.save({"a": torch.zeros(300)}, legacy, _use_new_zipfile_serialization=False)
  legacy.write_bytes(legacy.read_bytes()[:200])
  pickled = tmp_path / "pickled.pth"
  torch.save({"state_dict": {"a": torch.zeros(3)}, "meta": Path("x")}, pickled)
  cases = [(jpg, "photo.jpg: not a readable torch checkpoint (a JPEG image"),
           (text, "notes.pth: not a readable torch checkpoint (a text file"),
           (trunc, "trunc.pth: not a readable torch checkpoint (truncated or damaged"),
           (legacy, "legacy.pth: not a readable torch checkpoint (damaged or truncated"),
           (tmp_path, "a directory, not a torch checkpoint file"),
           (tmp_path / "absent.pth", "absent.pth: no such file"),
           (pickled, "--trust-pickle")]
  for path, needle in cases:
    assert conv.main([str(path), "-o", str(tmp_path / "out")]) == 2, path
    line = one_error_line(capsys.readouterr().err, needle)
    assert ("--trust-pickle" in line) == (path == pickled), line
    assert not (tmp_path / "out").exists()


def test_ctrl_c_is_one_line_and_130(capsys):
  def interrupted(argv):
    raise KeyboardInterrupt
  assert cli.run(interrupted) == 130
  assert capsys.readouterr().err == "interrupted (Ctrl-C)\n"
