"""What every command shares (flag spelling, the compile cache, error exits); one module per command.

The commands (`segnext_jax.cli.train`, `eval`, `predict`, `export`, `from_torch`, `to_torch`) are
installed as `segnext-train`, `segnext-eval`, ... and run by the top-level scripts of the
repository (`python train.py`, ...), which are the same `main`.

Flags are spelled `--batch-size`; `--batch_size` is accepted as an alias everywhere. Every script's
`main` is `cli.run(_main, argv)`: an expected failure (bad input, a fault) ends as one line on
stderr and exit status 2 (a graceful stop: 128 + the signal), Ctrl-C as one line and 130, never a
traceback; SEGNEXT_JAX_TRACEBACK=1 shows the traceback instead. Expected means a
segnext_jax.errors.UserError, or an OSError naming a file (missing, unreadable, disk full):
anything else is a bug, shown with its traceback and a line saying so (exit status 1).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from segnext_jax import cache, cpu_memory, faults
from segnext_jax.errors import InputError, UserError

BUG = ("this is a bug in segnext-jax, not in your input or files: please report it with the "
       "command and the traceback above")


def default_compile_cache() -> Path:
  """The cache root's xla/ (cache.py: $SEGNEXT_JAX_CACHE, else ~/.cache/segnext-jax)."""
  return cache.root() / "xla"


def add_flag(parser: argparse.ArgumentParser, name: str, *aliases: str, **kwargs):
  """`--a-b` plus the alias `--a_b` (and any extra aliases), one dest."""
  dashed = "--" + name.replace("_", "-")
  spellings = dict.fromkeys([dashed, "--" + name.replace("-", "_"), *aliases])
  return parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)


class UsageError(InputError):
  """A command line the parser cannot take (an unknown flag, a bad value): one line, status 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):
    """argparse's usage dump and exit, as the one line every other bad input gets."""
    raise UsageError(f"{message} (see {self.prog} --help)")


def parser(doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
  """The command's parser: its module docstring as the description, shown as written; a bad
  command line raises UsageError (cli.run: one line, exit status 2)."""
  return _Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def enable_compile_cache(path: str | None = None) -> None:
  """Persist compiled programs on disk: a dataset's padded shapes, or a run's train step, compile
  once per machine. None: the directory JAX already has (JAX_COMPILATION_CACHE_DIR), else
  default_compile_cache(); '': leave JAX's setting as it is (off unless configured)."""
  import jax
  if path is None:
    path = jax.config.jax_compilation_cache_dir or default_compile_cache()
  if not path:
    return
  jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
  # every program: inference compiles many small ones (StagedForward's parts, the resizes)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


COMPILE_CACHE_HELP = ("persistent XLA compilation cache directory (default: "
                      "$JAX_COMPILATION_CACHE_DIR, else $SEGNEXT_JAX_CACHE/xla, "
                      "~/.cache/segnext-jax/xla by default; '' to disable)")


DISTRIBUTED_HELP = ("join a multi-process run: jax.distributed.initialize() from SLURM/TPU/MPI's "
                    "variables, or JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and "
                    "JAX_PROCESS_ID (docs/training.md#devices-and-hosts)")


def init_distributed() -> None:
  """jax.distributed.initialize() with the process layout from JAX_NUM_PROCESSES and
  JAX_PROCESS_ID when set (plain ssh, localhost), else what JAX detects (SLURM, TPU, MPI); CPU
  processes exchange over gloo. Before anything else uses JAX."""
  import jax
  layout = {name: int(os.environ[var]) for name, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                          ("process_id", "JAX_PROCESS_ID"))
            if os.environ.get(var)}
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU backend's only
  try:
    jax.distributed.initialize(**layout)
  except (ValueError, RuntimeError) as e:
    raise UserError(f"--distributed: {one_line(e)} (set JAX_COORDINATOR_ADDRESS, "
                    "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under SLURM)") from None


def quiet_absl(level: int = logging.ERROR) -> None:
  """Library chatter off: absl (orbax) below `level`, JAX's 'Unable to initialize backend' notes."""
  logging.getLogger("absl").setLevel(level)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def one_line(e: BaseException) -> str:
  """An exception as one line: its first line, or its type when it has no message."""
  if isinstance(e, OSError) and e.strerror and e.filename:
    return f"{e.filename}: {e.strerror}"
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
  """main(argv) in the commands' runtime (cpu_memory's malloc policy), with expected failures and
  Ctrl-C turned into one line on stderr and an exit status (2, a fault's own status, or 130)."""
  cpu_memory.keep_freed_memory()
  with faults.quiet_async_errors():
    try:
      return main(argv)
    except KeyboardInterrupt:
      if os.environ.get("SEGNEXT_JAX_TRACEBACK"):
        raise
      print("interrupted (Ctrl-C)", file=sys.stderr)
      return 130
    except Exception as e:
      if os.environ.get("SEGNEXT_JAX_TRACEBACK"):
        raise
      if not is_expected(e):
        traceback.print_exc()
        print(f"error: {one_line(e)}\n{BUG}", file=sys.stderr)
        return 1
      code, prefix = (e.exit_code, e.prefix) if isinstance(e, faults.Fault) else (2, "error")
      print(f"{prefix}: {one_line(e)}", file=sys.stderr)
      return code


def is_expected(e: BaseException) -> bool:
  """Whether `e` is the input's or the environment's (one line), not a bug (a traceback). An
  OSError naming a file (no such file, permission denied, read-only or full disk) counts: the
  file is the user's or the machine's, and OpenCV, PIL, orbax and the OS raise it from any
  depth, where wrapping every open in a UserError would still miss some."""
  return isinstance(e, UserError) or (isinstance(e, OSError) and bool(e.filename))


def console(main: Callable[[Sequence[str] | None], int]) -> Callable[[], None]:
  """A `[project.scripts]` entry point: main(sys.argv[1:]) ending the process with its status."""
  return lambda: exit_with(main(None))


def exit_with(code: int) -> None:
  """End a script with `code`; after a failure, without waiting for orbax's abandoned writer
  threads (whose interpreter-shutdown noise would follow the one line)."""
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()
  if code:
    os._exit(code)
  sys.exit(code)
