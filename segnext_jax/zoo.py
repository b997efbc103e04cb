"""The released SegNeXt checkpoints by name: a table, a verified download cache, converted copies.

`fetch(name)` downloads a released .pth once into the cache (resumable, sha256-checked, safe for
concurrent processes), `converted(name)` converts it once into a checkpoint directory beside it,
`resolve(x)` turns a name into that directory and leaves a path alone, and `local(x)` turns a name
into the fetched .pth. docs/zoo.md has the table, the cache, the environment variables and the
offline procedure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import logging
import os
import shutil
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from segnext_jax import cache
from segnext_jax.errors import InputError, UserError

try:
  import fcntl
except ImportError:  # not POSIX: no lock between processes, downloads still land atomically
  fcntl = None

log = logging.getLogger("segnext_jax.zoo")

MMSEG = "https://download.openmmlab.com/mmsegmentation/v0.5/segnext/"
PRETRAIN = "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segnext/"

URL_ENV = "SEGNEXT_JAX_ZOO_URL"   # a base URL that replaces each release's own: BASE/<file name>
TIMEOUT_S = 60                    # per connect and per read
ATTEMPTS = 5                      # downloads resumed within one call, while each makes progress
CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Release:
  """One released checkpoint. `sha256` is the prefix of the file's SHA-256 that its name carries
  (torch.hub's and mmengine's convention: mmseg publishes no full digest)."""
  name: str
  variant: str
  dataset: str
  sha256: str
  url: str
  mmseg_name: str = ""  # mmseg's model name (configs/segnext/metafile.yaml): an alias

  @property
  def file(self) -> str:
    return self.url.rsplit("/", 1)[1]

  @property
  def names(self) -> tuple[str, ...]:
    """Every spelling that picks this row: its name, mmseg's name, the released file name."""
    return tuple(n for n in (self.name, self.mmseg_name, self.file) if n)


RELEASES = (
    # name                     variant dataset   sha256 prefix  URL, mmseg's model name
    Release("segnext_mscan-t_ade20k", "t", "ADE20K", "05bd8466",
            MMSEG + "segnext_mscan-t_1x16_512x512_adamw_160k_ade20k/"
            "segnext_mscan-t_1x16_512x512_adamw_160k_ade20k_20230210_140244-05bd8466.pth",
            "segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512"),
    Release("segnext_mscan-s_ade20k", "s", "ADE20K", "43013668",
            MMSEG + "segnext_mscan-s_1x16_512x512_adamw_160k_ade20k/"
            "segnext_mscan-s_1x16_512x512_adamw_160k_ade20k_20230214_113014-43013668.pth",
            "segnext_mscan-s_1xb16-adamw-160k_ade20k-512x512"),
    Release("segnext_mscan-b_ade20k", "b", "ADE20K", "b6f6c70c",
            MMSEG + "segnext_mscan-b_1x16_512x512_adamw_160k_ade20k/"
            "segnext_mscan-b_1x16_512x512_adamw_160k_ade20k_20230209_172053-b6f6c70c.pth",
            "segnext_mscan-b_1xb16-adamw-160k_ade20k-512x512"),
    Release("segnext_mscan-l_ade20k", "l", "ADE20K", "19b14b63",
            MMSEG + "segnext_mscan-l_1x16_512x512_adamw_160k_ade20k/"
            "segnext_mscan-l_1x16_512x512_adamw_160k_ade20k_20230209_172055-19b14b63.pth",
            "segnext_mscan-l_1xb16-adamw-160k_ade20k-512x512"),
    Release("mscan-t_imagenet", "t", "ImageNet-1K", "119e8c9f", PRETRAIN + "mscan_t_20230227-119e8c9f.pth"),
    Release("mscan-s_imagenet", "s", "ImageNet-1K", "f33ccdf2", PRETRAIN + "mscan_s_20230227-f33ccdf2.pth"),
    Release("mscan-b_imagenet", "b", "ImageNet-1K", "3ab7d230", PRETRAIN + "mscan_b_20230227-3ab7d230.pth"),
    Release("mscan-l_imagenet", "l", "ImageNet-1K", "cef260d4", PRETRAIN + "mscan_l_20230227-cef260d4.pth"),
)


class ZooError(UserError):
  """A download that failed or a file that is not the release: one line naming the URL and file."""


# ---------------------------------------------------------------------------------------------
# Names and places

def find(name: str) -> Release | None:
  """The row `name` picks (its name, mmseg's name or the released file name), else None."""
  return next((r for r in RELEASES if name in r.names), None)


def release(name: str) -> Release:
  """The row `name` picks; an unknown name is an InputError listing the known ones."""
  found = find(name)
  if found is None:
    raise InputError(f"{name!r} is not a released model; known: {', '.join(r.name for r in RELEASES)} "
                     "(mmseg's model names and the released file names work too)")
  return found


def named(arg: str | os.PathLike) -> Release | None:
  """The release `arg` names when it is no existing file or directory (a path always wins)."""
  return None if Path(arg).exists() else find(str(arg))


def cache_dir() -> Path:
  """Where released files and their conversions live: the cache root's zoo/ (cache.py)."""
  return cache.root() / "zoo"


def url(rel: Release) -> str:
  """The release's URL, or $SEGNEXT_JAX_ZOO_URL joined with its file name (a mirror, a test)."""
  base = os.environ.get(URL_ENV)
  return f"{base.rstrip('/')}/{rel.file}" if base else rel.url


# ---------------------------------------------------------------------------------------------
# What the commands call

def local(arg: str | os.PathLike) -> Path:
  """`arg` as a local path: itself when it exists or reads as a path (a separator, a suffix),
  else the fetched .pth of the release it names; any other bare word is an unknown name."""
  rel = check_source(arg)
  return fetch(rel.name) if rel is not None else Path(arg)


def check_source(arg: str | os.PathLike) -> Release | None:
  """The release `arg` names, None when it is (or reads as) a path; an InputError for a bare word
  that is neither: checked before anything is downloaded or written."""
  path = Path(arg)
  rel = named(arg)
  if rel is not None or path.exists() or path.suffix or len(path.parts) > 1 or os.sep in str(arg):
    return rel
  raise InputError(f"{arg}: no such file or directory, nor a released model "
                   f"({', '.join(r.name for r in RELEASES)})")


def resolve(name_or_path: str | os.PathLike) -> str | os.PathLike:
  """A converted checkpoint directory for a release's name (converted once, see `converted`);
  anything else, an existing path first of all, unchanged."""
  rel = named(name_or_path)
  return converted(rel.name) if rel is not None else name_or_path


def fetch(name: str) -> Path:
  """The verified .pth of release `name` in cache_dir(), downloaded once: resumed from
  <file>.part, checked against the release's sha256 prefix, renamed into place."""
  rel = release(name)
  where = cache_dir()
  final = where / rel.file
  if final.exists():
    _verify(final, rel)
    return final
  where.mkdir(parents=True, exist_ok=True)
  part = where / (rel.file + ".part")
  with _locked(part) as f:
    if final.exists():  # another process finished it while this one waited for the lock
      part.unlink(missing_ok=True)
      return final
    log.info("downloading %s to %s", url(rel), final)
    try:
      _download(rel, f)
    except BaseException:
      if not _size(f):  # nothing came: leave no empty .part behind
        part.unlink(missing_ok=True)
      raise
    _verify(part, rel)
    os.replace(part, final)
  return final


def converted(name: str) -> Path:
  """The converted checkpoint directory of release `name` in cache_dir() (what `segnext-convert
  NAME` writes), converted once from the fetched .pth and reused afterwards."""
  rel = release(name)
  out = cache_dir() / f"{rel.name}_jax"
  if out.is_dir():  # only ever made by the rename below: complete
    return out
  pth = fetch(rel.name)
  from segnext_jax import torch_io
  from segnext_jax.checkpoint import save_converted
  variables, meta, _ = torch_io.convert_file(pth, rel.variant)
  tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:12]}")
  save_converted(tmp, variables, meta)
  try:
    tmp.rename(out)
  except OSError:  # another process renamed its copy first
    shutil.rmtree(tmp, ignore_errors=True)
    if not out.is_dir():
      raise
  return out


# ---------------------------------------------------------------------------------------------
# Download, verify, lock

class _Interrupted(Exception):
  """The connection broke or stalled mid-file: resumable."""


def _offline(rel: Release, why: object, have: int = 0, total: int | None = None) -> ZooError:
  kept = (f" after {have} of {total or '?'} bytes (kept in {rel.file}.part: run again to resume)"
          if have else "")
  return ZooError(f"cannot download {url(rel)} ({why}){kept}; without network, {_by_hand(rel)}")


def _by_hand(rel: Release) -> str:
  """The offline procedure, in the words of an error message."""
  return f"download {rel.url} elsewhere and place {rel.file} in {cache_dir()}"


def _download(rel: Release, f: BinaryIO) -> None:
  """Fill `f` (the locked .part) from url(rel), resuming from its size; a broken connection is
  resumed at once while each try makes progress, up to ATTEMPTS tries."""
  total = None
  for _ in range(ATTEMPTS):
    have = _size(f)
    try:
      total = _get(rel, f, have)
      if total is None or _size(f) >= total:
        return
      why = "the connection closed early"
    except _Interrupted as e:
      why = e
    if _size(f) <= have:
      break
  raise _offline(rel, why, _size(f), total)


def _get(rel: Release, f: BinaryIO, have: int) -> int | None:
  """One request from byte `have` (Range), appended to `f`; a server that ignores Range sends
  the whole file, which replaces the .part. Returns the file's full size when the server says it."""
  link = url(rel)
  headers = {"User-Agent": "segnext-jax"} | ({"Range": f"bytes={have}-"} if have else {})
  try:
    r = urllib.request.urlopen(urllib.request.Request(link, headers=headers), timeout=TIMEOUT_S)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:  # the .part is no prefix of the file: start again
      f.truncate(0)
      return _get(rel, f, 0)
    raise ZooError(f"cannot download {link} (HTTP {e.code} {e.reason}); {_by_hand(rel)}") from None
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    raise _offline(rel, getattr(e, "reason", None) or e, have) from None
  with r:
    start, total = _span(r, have)
    if start != have:  # a full answer (Range ignored) or another range: write it from 0
      f.truncate(0)
    from tqdm import tqdm
    with tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
              desc=rel.file, disable=None) as bar:  # None: no bar when stderr is no terminal
      while chunk := _read(r):
        f.write(chunk)
        bar.update(len(chunk))
  f.flush()
  return total


def _span(r, have: int) -> tuple[int, int | None]:
  """(first byte, full size or None) of a response: 206's Content-Range, else the whole file."""
  if getattr(r, "status", None) == 206 and have:
    rng = r.headers.get("Content-Range", "")  # bytes START-END/TOTAL
    try:
      start_end, total = rng.split(" ", 1)[1].split("/")
      return int(start_end.split("-")[0]), None if total == "*" else int(total)
    except (IndexError, ValueError):
      return 0, None
  length = r.headers.get("Content-Length")
  return 0, int(length) if length and length.isdigit() else None


def _read(r) -> bytes:
  try:
    return r.read(CHUNK)
  except (http.client.HTTPException, OSError) as e:  # reset, timeout, IncompleteRead
    raise _Interrupted(type(e).__name__ + (f": {e}" if str(e) else "")) from e


def _size(f: BinaryIO) -> int:
  return os.fstat(f.fileno()).st_size


def sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def _verify(path: Path, rel: Release) -> None:
  """`path` must be the release (its sha256 starts with the table's); if not it is removed."""
  digest = sha256(path)
  if not digest.startswith(rel.sha256):
    path.unlink(missing_ok=True)
    raise ZooError(f"{rel.file}: sha256 {digest} does not start with the release's {rel.sha256} "
                   f"(from {url(rel)}); removed it from {path.parent}: run again, or check the mirror")


@contextlib.contextmanager
def _locked(part: Path) -> Iterator[BinaryIO]:
  """`part` opened for appending under an exclusive lock: one process downloads, the others
  wait for it. A file that was renamed or removed while this one waited is opened again."""
  while True:
    f = open(part, "ab")
    if fcntl is None:
      break
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      if os.fstat(f.fileno()).st_ino == os.stat(part).st_ino:
        break
    except FileNotFoundError:
      pass
    f.close()
  try:
    yield f
  finally:
    f.close()
