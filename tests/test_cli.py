"""train.py -> eval.py -> predict.py on a tiny synthetic run (in-process, tiny variant)."""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import TINY, TINY_RUN_FLAGS, command
from segnext_jax.checkpoint import load_checkpoint
from segnext_jax.data.datasets import Synthetic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One tiny run shared by this module's tests (the last one resumes it)."""
  train = command("train")
  wd = tmp_path_factory.mktemp("cli") / "run"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train.main([*TINY_RUN_FLAGS, "--steps=3", "--eval_every=3", "--eval_images=4", f"--workdir={wd}"])
  (wd.parent / "train_stdout.txt").write_text(out.getvalue())
  return wd


def test_train_eval_predict_roundtrip(capsys, workdir, tmp_path):
  out = (workdir.parent / "train_stdout.txt").read_text()
  assert "final (step 3): val mIoU" in out
  model, variables = load_checkpoint(workdir)
  assert model.num_classes == 6 and "conv_seg" in variables["params"]["decode_head"]

  ev = command("eval")
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

  pr = command("predict")
  imgs = tmp_path / "imgs"
  imgs.mkdir()
  cv2.imwrite(str(imgs / "scene.png"), Synthetic(size=96)[0][0][..., ::-1])
  cv2.imwrite(str(imgs / "gray.png"), np.full((40, 50), 128, np.uint8))
  cv2.imwrite(str(imgs / "rgba.png"), np.zeros((30, 20, 4), np.uint8))
  (imgs / "broken.jpg").write_bytes(b"\xff\xd8 not really")
  code = pr.main([str(workdir), str(imgs), "-o", str(tmp_path / "pred")])
  captured = capsys.readouterr()  # a bad input is refused before anything is written
  assert code == 2 and "broken.jpg: not a readable image" in captured.err
  assert not (tmp_path / "pred").exists()
  (imgs / "broken.jpg").unlink()
  assert pr.main([str(workdir), str(imgs), "-o", str(tmp_path / "pred")]) == 0
  for stem, hw in (("scene", (96, 96)), ("gray", (40, 50)), ("rgba", (30, 20))):
    classes = cv2.imread(str(tmp_path / "pred" / f"{stem}_classes.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(tmp_path / "pred" / f"{stem}_mask.png"))
    overlay = cv2.imread(str(tmp_path / "pred" / f"{stem}_overlay.png"))
    assert classes.shape == hw and classes.max() < 6 and mask.shape == (*hw, 3)
    assert overlay.shape[1] > hw[1]  # image + legend panel


def read_event_scalars(workdir: Path) -> dict[str, list[tuple[int, float]]]:
  """Scalars of the TensorBoard event files under workdir (TFRecord framing + Event protos)."""
  import struct
  from tensorboardX.proto import event_pb2
  out: dict = {}
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_metrics_on_disk_config_replay_and_recipe_guard(workdir, capsys):
  from segnext_jax import metric_writer
  records = metric_writer.read(workdir)
  train = [r for r in records if r["split"] == "train"]
  val = [r for r in records if r["split"] == "val"]
  assert [r["step"] for r in train] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in train)
  assert {"lr", "grad_norm", "images_per_s"} <= set(train[0])
  assert len(val) == 1 and val[0]["step"] == 3 and 0 <= val[0]["mIoU"] <= 100
  assert set(val[0]["IoU"]) == set(Synthetic.class_names)
  scalars = read_event_scalars(workdir)
  assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
  assert scalars["train/loss"][0][1] == pytest.approx(train[0]["loss"], rel=1e-6)
  assert scalars["val/mIoU"][0][1] == pytest.approx(val[0]["mIoU"], rel=1e-6)

  train_cli = command("train")
  saved = workdir / "config.json"
  # A different recipe value in an existing workdir: refused, naming the field, nothing run.
  assert train_cli.main(["--config", str(saved), "--lr", "0.5"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "lr: 0.001 -> 0.5" in err[0], err
  # The saved config replays the run; a larger step budget resumes it (both flag spellings).
  assert train_cli.main(["--config", str(saved), "--steps", "4", "--eval-every", "100",
                         "--log_every", "1"]) == 0
  assert [r["step"] for r in metric_writer.read(workdir) if r["split"] == "train"] == [1, 2, 3, 4]
  replay = json.loads(saved.read_text())
  assert replay["steps"] == 4 and replay["model_overrides"] == json.loads(json.dumps(TINY))


def test_compile_cache_flag_keeps_a_configured_directory(tmp_path, monkeypatch):
  import jax
  from segnext_jax import cli
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "env"))  # as JAX_COMPILATION_CACHE_DIR
    cli.enable_compile_cache(None)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
    cli.enable_compile_cache("")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
    cli.enable_compile_cache(str(tmp_path / "flag"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "flag")
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.delenv("SEGNEXT_JAX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    cli.enable_compile_cache(None)
    assert jax.config.jax_compilation_cache_dir == str(Path("~/.cache/segnext-jax/xla").expanduser())
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("SEGNEXT_JAX_CACHE", str(tmp_path / "root"))  # the zoo's root, too
    cli.enable_compile_cache(None)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "root" / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    _, _, cache = command("train").resolve(["--compile-cache", str(tmp_path / "train_flag")])
    command("train")._compile_cache(cache)  # what train.py does with the flag
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "train_flag")
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


COMMANDS = {"train": "train.py", "eval": "eval.py", "predict": "predict.py", "export": "export.py",
            "convert": "convert/from_torch.py", "to-torch": "convert/to_torch.py"}


def test_entry_points_and_scripts_run_the_same_commands_from_any_directory(tmp_path):
  """`segnext-NAME --help` (the installed entry point) and `python SCRIPT --help` from another
  directory: both start, show the same options, and the bare train help shows the bare run's
  defaults (the synthetic preset) next to the ADE20K recipe's."""
  import subprocess
  import sys
  bindir = Path(sys.executable).parent
  runs = {}
  for name, script in COMMANDS.items():
    for kind, argv in (("entry", [str(bindir / f"segnext-{name}")]),
                       ("script", [sys.executable, str(REPO / script)])):
      runs[name, kind] = subprocess.Popen([*argv, "--help"], cwd=tmp_path, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  helps = {}
  for key, proc in runs.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (key, err[-2000:])
    helps[key] = out.split("options:", 1)[1]
  for name in COMMANDS:
    assert helps[name, "entry"] == helps[name, "script"], name
  train = " ".join(helps["train", "entry"].split())
  assert "--steps STEPS total iterations (default 300; ADE20K recipe 160000)" in train
  assert "--variant {t,s,b,l}" in train and "--pretrained PRETRAINED" in train
  assert "(default none)" in train and "malloc" not in train


def test_a_missing_extra_is_one_line_naming_it(capsys, monkeypatch, tmp_path):
  """segnext-to-torch without torch, ONNX export without jax2onnx or onnx: one line naming the
  package and the extra that installs it, status 2 (not a traceback called a bug)."""
  from segnext_jax import errors, export
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ModuleNotFoundError
  assert command("to_torch").main([str(tmp_path / "ckpt"), "-o", str(tmp_path / "x.pth")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: writing an mmseg .pth needs torch, which is not installed: "
                 "pip install -e .[convert]"], err
  assert not (tmp_path / "x.pth").exists()
  for module in ("jax2onnx", "onnx"):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(errors.UserError, match=rf"ONNX export needs {module}, .*\[export\]"):
      export.write_onnx(None, {}, {}, tmp_path / "m.onnx", export.OPSET)
    monkeypatch.delitem(sys.modules, module)
  assert errors.optional("json", "dev", "reading").dumps([1]) == "[1]"


def test_user_errors_are_one_line_and_bugs_show_their_traceback(capsys, monkeypatch):
  """cli.run: a UserError (or an OSError naming a file) is one line and status 2; anything else
  is a bug: its traceback, a line saying so, status 1."""
  from segnext_jax import cli, errors, faults
  monkeypatch.delenv("SEGNEXT_JAX_TRACEBACK", raising=False)

  def raising(e):
    def main(argv):
      raise e
    return main

  cases = [(errors.InputError("--lr -1: must be a positive number"), 2),
           (faults.DiskFull("/w: no space"), faults.DiskFull.exit_code),
           (FileNotFoundError(2, "No such file or directory", "/x/y.png"), 2),
           (ValueError("operands could not be broadcast"), 1),
           (RuntimeError("XLA internal"), 1),
           (OSError("no file named"), 1)]
  for exc, status in cases:
    assert cli.run(raising(exc), []) == status, exc
    err = capsys.readouterr().err
    if status == 1:
      assert "Traceback (most recent call last)" in err and err.strip().endswith(cli.BUG), err
      assert f"error: {exc}" in err
    else:
      assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  cli.run(raising(FileNotFoundError(2, "No such file or directory", "/x/y.png")), [])
  assert capsys.readouterr().err == "error: /x/y.png: No such file or directory\n"
