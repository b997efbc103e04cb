"""Faults of a run and the one-line errors they end with: the workdir lock, a graceful stop on
SIGTERM/SIGINT, disk space, and quieting orbax's background writers when one of them fails.

What a user sees in each case is tabled in docs/faults.md.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Iterator

from segnext_jax.errors import UserError

log = logging.getLogger("segnext_jax.faults")

LOCK_FILE = "train.lock"


class Fault(UserError):
  """An expected failure of a run: the CLI prints `prefix: message` (one line) and exits with
  `exit_code`."""
  exit_code = 2
  prefix = "error"


class WorkdirLocked(Fault):
  """Another live process holds the workdir's lock."""


class DiskFull(Fault):
  """Not enough space to write the next checkpoint (or a write failed with ENOSPC)."""


class NonFinite(Fault):
  """The loss or the gradient norm stopped being finite."""


class Stopped(Fault):
  """A SIGTERM/SIGINT stopped the run after saving its step; exit status 128 + signal number."""
  prefix = "stopped"

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


# ---------------------------------------------------------------------------------------------
# The workdir lock

class WorkdirLock:
  """An exclusive `flock` on WORKDIR/train.lock, which names its holder (host, PID, start time).

  The kernel drops the lock when its process dies, so a stale file never blocks a new run."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    self.workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise WorkdirLocked(f"{self.workdir} is in use by {holder} (lock {self.path}); wait for "
                          "it to finish or stop it, or use another --workdir") from None
    os.ftruncate(fd, 0)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    os.write(fd, f"PID {os.getpid()} on host {socket.gethostname()}, since {now}\n".encode())
    self.fd = fd
    return self

  def release(self) -> None:
    if self.fd is not None:
      os.ftruncate(self.fd, 0)
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None

  def __enter__(self) -> "WorkdirLock":
    return self if self.fd is not None else self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ---------------------------------------------------------------------------------------------
# Graceful stop

class GracefulStop:
  """SIGTERM/SIGINT set a flag that the training loop reads after each step (it then saves that
  step and stops); a second signal exits at once with 128 + its number, saving nothing more.

  Installed only in the main thread (Python delivers signals there)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool = True):
    self.enabled = enabled and threading.current_thread() is threading.main_thread()
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ""

  def _handle(self, signum: int, frame) -> None:
    if self.signum is not None:
      sys.stderr.write(f"stopped: second {signal.Signals(signum).name}, exiting at once without "
                       "saving (the last saved step is intact)\n")
      sys.stderr.flush()
      os._exit(128 + signum)
    self.signum = signum
    log.warning("%s received: finishing the current step and saving it (send it again to exit "
                "at once)", self.name)

  def __enter__(self) -> "GracefulStop":
    if self.enabled:
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()


# ---------------------------------------------------------------------------------------------
# Disk space

def mb(n: float) -> str:
  return f"{n / 2**20:.1f} MB"


def free_bytes(directory: str | os.PathLike) -> int:
  """Free bytes on the file system of `directory` (or of its nearest existing parent)."""
  path = Path(directory).absolute()
  while not path.exists():
    path = path.parent
  return shutil.disk_usage(path).free


def tree_bytes(directory: str | os.PathLike) -> int:
  """Bytes of the files under `directory` (a checkpoint step's size on disk)."""
  return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def is_disk_full(e: BaseException) -> bool:
  """ENOSPC anywhere in an exception's chain (tensorstore says RESOURCE_EXHAUSTED)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(e)
    if "No space left on device" in text or "RESOURCE_EXHAUSTED" in text or "Disk quota" in text:
      return True
    e = e.__cause__ or e.__context__
  return False


# ---------------------------------------------------------------------------------------------
# Quiet failures of background writers

def _quiet_unraisable(default):
  """orbax/tensorstore callbacks that fire after a failed write's event loop closed report
  'Event loop is closed' (dozens of them); everything else goes to the default hook."""
  def hook(u) -> None:
    if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
      return
    if isinstance(u.exc_value, ImportError) and "shutting down" in str(u.exc_value):
      return
    default(u)
  return hook


@contextlib.contextmanager
def quiet_async_errors() -> Iterator[None]:
  """While a failure is turned into one line: asyncio's 'exception was never retrieved' logs and
  the closed-loop callbacks of orbax's async writers are silenced (they repeat the one error)."""
  previous = sys.unraisablehook
  sys.unraisablehook = _quiet_unraisable(previous)
  aio = logging.getLogger("asyncio")
  level = aio.level
  aio.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    aio.setLevel(level)
    sys.unraisablehook = previous


@contextlib.contextmanager
def quiet_logs(*names: str) -> Iterator[None]:
  """Silence the named loggers' errors (orbax logs every failed writer thread through absl)."""
  loggers = [logging.getLogger(n) for n in names]
  levels = [l.level for l in loggers]
  for l in loggers:
    l.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for l, lvl in zip(loggers, levels):
      l.setLevel(lvl)
