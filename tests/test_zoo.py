"""zoo.py: released checkpoints by name, fetched from a local HTTP server the tests start (Range,
dropped connections, a server that ignores Range), verified, cached, converted once; the pinned
`segnext-convert segnext_mscan-t_ade20k` refusal of a file whose sha256 is not the release's."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import TINY, TorchReference, command
from segnext_jax import cache, zoo
from segnext_jax.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


class Server:
  """http.server in a thread serving `files` by name, with Range. drops: how many of the next
  responses are cut after half their body; ignore_range: answer every request with the whole
  file; pause: seconds before each body."""

  def __init__(self, files: dict[str, bytes]):
    self.files, self.requests = files, []
    self.drops, self.ignore_range, self.pause = 0, False, 0.0
    owner = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        name, rng = self.path.lstrip("/"), self.headers.get("Range")
        owner.requests.append((name, rng))
        data = owner.files.get(name)
        if data is None:
          return self.send_error(404)
        start = int(rng.split("=")[1].split("-")[0]) if rng and not owner.ignore_range else 0
        if start >= len(data) > 0 and rng:
          return self.send_error(416)
        self.send_response(206 if start else 200)
        if start:
          self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        time.sleep(owner.pause)
        if owner.drops > 0:
          owner.drops -= 1
          body = body[:len(body) // 2]
        self.wfile.write(body)
        self.close_connection = True

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
    threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

  def stop(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory) -> bytes:
  """A random TINY mmseg-layout segmentor checkpoint's bytes."""
  return TorchReference("t", tmp_path_factory.mktemp("zoo_src"), **TINY).path.read_bytes()


def tiny_row(data: bytes) -> zoo.Release:
  """A test-only release of `data` (its hash prefix in its name, as the real ones)."""
  sha = hashlib.sha256(data).hexdigest()[:8]
  return zoo.Release("tiny_test", "t", "test", sha, f"https://example.invalid/x/tiny-{sha}.pth")


@pytest.fixture
def served(tiny_pth, tmp_path, monkeypatch):
  """(server, row): the tiny checkpoint served as the test row's file, the zoo pointed at it,
  an empty cache under tmp_path."""
  row = tiny_row(tiny_pth)
  server = Server({row.file: tiny_pth})
  monkeypatch.setattr(zoo, "RELEASES", (*zoo.RELEASES, row))
  monkeypatch.setenv(zoo.URL_ENV, server.url)
  monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
  yield server, row
  server.stop()


def files_in(path: Path) -> list[Path]:
  return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def run_convert(*args) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = command("from_torch").main([str(a) for a in args])
  return code, out.getvalue(), err.getvalue()


def test_table_is_mmsegs(monkeypatch):
  """Names, URLs and hash prefixes as mmseg's metafile and configs give them."""
  yaml = pytest.importorskip("yaml")
  mmseg = pytest.importorskip("mmseg")
  configs = Path(mmseg.__file__).parent / ".mim" / "configs" / "segnext"
  models = yaml.safe_load((configs / "metafile.yaml").read_text())["Models"]
  for m in models:
    rel = zoo.find(m["Name"])
    assert rel is not None and rel.url == m["Weights"] and rel.dataset == "ADE20K", m["Name"]
    cfg = (configs / f"{m['Name']}.py").read_text()
    backbone = zoo.find(f"mscan-{rel.variant}_imagenet")
    assert f"checkpoint_file = '{backbone.url}'" in cfg, m["Name"]
  assert len(models) == 4 and len(zoo.RELEASES) == 8
  for rel in zoo.RELEASES:
    assert rel.file.endswith(f"-{rel.sha256}.pth") and zoo.find(rel.file) is rel
  monkeypatch.setenv(zoo.URL_ENV, "http://mirror:8000/zoo/")
  assert zoo.url(zoo.release("segnext_mscan-t_ade20k")) == (
      "http://mirror:8000/zoo/segnext_mscan-t_1x16_512x512_adamw_160k_ade20k_20230210_140244-05bd8466.pth")


def test_fetch_convert_once_then_reuse_offline(served, tiny_pth, tmp_path, monkeypatch):
  server, row = served
  pth = zoo.fetch(row.name)
  assert pth == zoo.cache_dir() / row.file and pth.read_bytes() == tiny_pth
  assert server.requests == [(row.file, None)]
  code, out, err = run_convert(row.name, "-o", tmp_path / "by_name")  # segnext-convert NAME
  assert code == 0, err
  assert f"tiny_test: {pth}" in out and "custom size" in out
  server.stop()  # everything from here on comes from the cache
  assert zoo.fetch(row.file) == pth  # the file name is a name too
  conv = zoo.converted(row.name)
  assert conv == zoo.resolve(row.name) == zoo.cache_dir() / "tiny_test_jax"
  from segnext_jax import load_checkpoint, torch_io
  model, _ = load_checkpoint(row.name)  # segnext_jax.load_checkpoint(NAME): the cached conversion
  assert tuple(model.embed_dims) == TINY["embed_dims"]
  from export_helpers import random_variables
  from segnext_jax import segnext
  from segnext_jax.pretrained import load_pretrained
  _, report = load_pretrained(row.name, random_variables(segnext("t", **TINY)), "t")  # --pretrained NAME
  assert not report.not_in_source and not report.reinitialised and not report.unused
  monkeypatch.setattr(torch_io, "convert_file", lambda *a, **k: pytest.fail("converted again"))
  assert zoo.converted(row.name) == conv and zoo.resolve(str(pth)) == str(pth)


def test_default_out_is_name_jax_in_cwd(served, tmp_path, monkeypatch):
  server, row = served
  monkeypatch.chdir(tmp_path)
  code, out, err = run_convert(row.name)
  assert code == 0, err
  assert (tmp_path / "tiny_test_jax" / "checkpoints").is_dir() and "wrote tiny_test_jax" in out


def test_interrupted_download_resumes(served, tiny_pth):
  server, row = served
  server.drops = 1  # the first answer stops halfway: resumed at once with Range
  assert zoo.fetch(row.name).read_bytes() == tiny_pth
  half = len(tiny_pth) // 2
  assert server.requests == [(row.file, None), (row.file, f"bytes={half}-")]


def test_partial_file_resumes_and_range_ignored_restarts(served, tiny_pth):
  server, row = served
  part = zoo.cache_dir() / (row.file + ".part")
  part.parent.mkdir(parents=True)
  third = len(tiny_pth) // 3
  part.write_bytes(tiny_pth[:third])  # left by an earlier, interrupted run
  assert zoo.fetch(row.name).read_bytes() == tiny_pth
  assert server.requests == [(row.file, f"bytes={third}-")] and not part.exists()
  (zoo.cache_dir() / row.file).unlink()
  part.write_bytes(b"x" * third)  # not a prefix: a server that ignores Range must replace it
  server.ignore_range = True
  assert zoo.fetch(row.name).read_bytes() == tiny_pth


def test_download_that_keeps_breaking_keeps_its_part(served, tiny_pth):
  server, row = served
  server.drops = zoo.ATTEMPTS
  with pytest.raises(zoo.ZooError) as e:
    zoo.fetch(row.name)
  msg = str(e.value)
  assert server.url + row.file in msg and f"place {row.file} in {zoo.cache_dir()}" in msg, msg
  part = zoo.cache_dir() / (row.file + ".part")
  have = part.stat().st_size
  assert f"after {have} of {len(tiny_pth)} bytes" in msg and 0 < have < len(tiny_pth)
  server.requests.clear()
  assert zoo.fetch(row.name).read_bytes() == tiny_pth  # the next run resumes
  assert server.requests == [(row.file, f"bytes={have}-")]


def test_wrong_hash_is_one_line_and_leaves_nothing(served, tiny_pth, monkeypatch):
  server, row = served
  bad = dataclasses.replace(row, sha256="00000000")
  monkeypatch.setattr(zoo, "RELEASES", (*zoo.RELEASES[:-1], bad))
  with pytest.raises(zoo.ZooError) as e:
    zoo.fetch(row.name)
  msg = str(e.value)
  assert "\n" not in msg and row.file in msg and "sha256" in msg, msg
  assert hashlib.sha256(tiny_pth).hexdigest() in msg and "00000000" in msg
  assert files_in(zoo.cache_dir()) == []
  # a wrong file placed in the cache by hand is refused and removed the same way
  (zoo.cache_dir() / row.file).write_bytes(tiny_pth)
  with pytest.raises(zoo.ZooError, match="sha256"):
    zoo.fetch(row.name)
  assert files_in(zoo.cache_dir()) == []


def test_concurrent_fetches_download_once(served, tiny_pth):
  server, row = served
  server.pause = 0.5  # the second caller arrives while the first holds the lock
  got = []
  threads = [threading.Thread(target=lambda: got.append(zoo.fetch(row.name))) for _ in range(2)]
  for t in threads:
    t.start()
    time.sleep(0.1)
  for t in threads:
    t.join()
  assert len(got) == 2 and got[0] == got[1] and got[0].read_bytes() == tiny_pth
  assert len(server.requests) == 1 and files_in(zoo.cache_dir()) == [got[0]]


def test_unknown_name_and_offline(served, tiny_pth, tmp_path, monkeypatch):
  server, row = served
  with pytest.raises(InputError) as e:
    zoo.local("segnext_mscan-x_ade20k")
  assert "segnext_mscan-t_ade20k" in str(e.value) and "mscan-l_imagenet" in str(e.value)
  code, _, err = run_convert("segnext_mscan-x_ade20k")
  assert code == 2 and len(err.strip().splitlines()) == 1 and "mscan-t_imagenet" in err, err
  code, _, err = run_convert(tmp_path / "absent.pth")  # a path stays a path
  assert code == 2 and "no such file" in err and "imagenet" not in err, err
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
  monkeypatch.setenv(zoo.URL_ENV, dead)
  with pytest.raises(zoo.ZooError) as e:
    zoo.fetch(row.name)
  msg = str(e.value)
  assert dead + row.file in msg and f"place {row.file} in {zoo.cache_dir()}" in msg, msg
  assert files_in(zoo.cache_dir()) == []
  (zoo.cache_dir() / row.file).write_bytes(tiny_pth)  # the offline procedure
  assert zoo.fetch(row.name).read_bytes() == tiny_pth


def test_pinned_wrong_hash_cli(tmp_path):
  """SEGNEXT_JAX_ZOO_URL=BASE SEGNEXT_JAX_CACHE=DIR segnext-convert segnext_mscan-t_ade20k -o OUT,
  served a T-layout checkpoint that is not the release: exit 2, one line with "sha256", no OUT,
  no file in the cache."""
  import torch
  from conftest import mmseg_segmentor_modules, segmentor_state_dict
  rel = zoo.release("segnext_mscan-t_ade20k")
  src = tmp_path / "t.pth"
  torch.save({"meta": {}, "state_dict": segmentor_state_dict(*mmseg_segmentor_modules("t"))}, src)
  server = Server({rel.file: src.read_bytes()})
  cache_root, out = tmp_path / "cache", tmp_path / "out"
  script = Path(sys.executable).parent / "segnext-convert"
  cmd = [str(script)] if script.exists() else [sys.executable, str(ROOT / "convert" / "from_torch.py")]
  try:
    res = subprocess.run([*cmd, "segnext_mscan-t_ade20k", "-o", str(out)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, zoo.URL_ENV: server.url, cache.CACHE_ENV: str(cache_root)})
  finally:
    server.stop()
  assert server.requests == [(rel.file, None)]
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(lines) == 1 and "sha256" in lines[0], res.stderr
  assert not out.exists() and files_in(cache_root) == []
