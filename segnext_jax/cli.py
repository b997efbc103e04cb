"""What every command-line entry point shares: flag spelling, the compile cache, error exits.

Flags are spelled `--batch-size`; `--batch_size` is accepted as an alias everywhere.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

DEFAULT_CACHE = "~/.cache/segnext-jax/xla"
FAST_CPU_HINT = ("On Linux, segnext_jax sets glibc's malloc to reuse XLA's freed step buffers instead "
                 "of page-faulting fresh ones every step (segnext_jax/cpu_memory.py); "
                 "SEGNEXT_JAX_MALLOC=system opts out.")


def add_flag(parser: argparse.ArgumentParser, name: str, *aliases: str, **kwargs):
  """`--a-b` plus the alias `--a_b` (and any extra aliases), one dest."""
  dashed = "--" + name.replace("_", "-")
  spellings = dict.fromkeys([dashed, "--" + name.replace("-", "_"), *aliases])
  return parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)


def parser(doc: str | None) -> argparse.ArgumentParser:
  return argparse.ArgumentParser(description=doc, epilog=FAST_CPU_HINT,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def enable_compile_cache(path: str | None = None) -> None:
  """Persist compiled programs on disk: a dataset's padded shapes, or a run's train step, compile
  once per machine. None: the directory JAX already has (JAX_COMPILATION_CACHE_DIR), else
  DEFAULT_CACHE; '': leave JAX's setting as it is (off unless configured)."""
  import jax
  if path is None:
    path = jax.config.jax_compilation_cache_dir or DEFAULT_CACHE
  if not path:
    return
  jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
  # every program: inference compiles many small ones (StagedForward's parts, the resizes)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


COMPILE_CACHE_HELP = (f"persistent XLA compilation cache directory (default: $JAX_COMPILATION_CACHE_DIR, "
                      f"else {DEFAULT_CACHE}; '' to disable)")


def quiet_absl() -> None:
  logging.getLogger("absl").setLevel(logging.ERROR)
