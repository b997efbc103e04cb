r"""Train SegNeXt with mmseg's recipe (a short synthetic run when no data is given).

  python train.py                                   # synthetic data, SegNeXt-T, a few minutes on CPU
  python train.py --variant=l --data=ade20k:/data/ADEChallengeData2016 \
      --pretrained=mscan_l_20230227-cef260d4.pth --workdir=runs/l
  python train.py --config runs/l/config.json      # replay a run's saved config (later flags win)
The config is TrainConfig's defaults (mmseg's ADE20K recipe) <- --config (a preset, by default the
one --data implies, or a saved config.json) <- the flags given; the defaults below are a bare
run's (the synthetic preset), each preset's values are in segnext_jax/recipes.py. Re-running with
the same --workdir resumes from its latest complete checkpoint; a different recipe there is refused.
SIGTERM or Ctrl-C saves the step the run is at and exits 143/130; every other fault (disk full,
NaN, a second run, a damaged step) is in docs/faults.md. Multi-host: add --distributed on every
host; each process loads only its shard of every global batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import typing
from pathlib import Path
from typing import Any

from segnext_jax import cli
from segnext_jax.config import TrainConfig, load_preset, make_config
from segnext_jax.recipes import RECIPES, kind_of

BARE = "synthetic"  # the preset of a bare `train.py` (TrainConfig.data's default)


def build_parser() -> argparse.ArgumentParser:
  p = cli.parser(__doc__)
  cli.add_flag(p, "config", default=None, metavar="NAME|FILE.json",
               help=f"preset ({', '.join(RECIPES)}) or a saved config.json (default: the --data "
               "kind's preset)")
  cli.add_flag(p, "distributed", action="store_true", help=cli.DISTRIBUTED_HELP)
  cli.add_flag(p, "compile-cache", default=None,
               help=cli.COMPILE_CACHE_HELP + ": a restart or resume does not compile the step again")
  hints = typing.get_type_hints(TrainConfig)
  bare, paper = make_config(load_preset(BARE), {}), TrainConfig()
  for f in dataclasses.fields(TrainConfig):
    typ = hints[f.name]
    kw: dict = dict(default=None, help=f"{f.metadata.get('help', '')} ({_defaults(f.name, bare, paper)})")
    if typ is bool:
      kw.update(type=_bool, metavar="BOOL")
    elif f.name == "class_weight":
      kw.update(type=class_weights, metavar="W0,W1,...|FILE")
    elif typing.get_origin(typ) is tuple:
      kw.update(type=int, nargs=2, metavar=("LONG", "SHORT") if f.name == "resize_scale" else ("H", "W"))
    elif typing.get_origin(typ) is typing.Literal:
      kw.update(choices=typing.get_args(typ))
    elif typ is dict:
      kw.update(type=json.loads, metavar="JSON")
    else:
      kw.update(type=typ)
    cli.add_flag(p, f.name, **kw)
  return p


def _defaults(name: str, bare: TrainConfig, paper: TrainConfig) -> str:
  """'default X' as a bare run uses it, and the ADE20K recipe's value where that differs."""
  a, b = getattr(bare, name), getattr(paper, name)
  return f"default {_show(a)}" + ("" if a == b else f"; ADE20K recipe {_show(b)}")


def _show(v: Any) -> str:
  if isinstance(v, tuple):
    return " ".join(map(str, v))
  return json.dumps(v) if isinstance(v, dict) else (str(v) if v != "" else "none")


def _bool(s: str) -> bool:
  if s.lower() not in ("1", "true", "yes", "0", "false", "no"):
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
  return s.lower() in ("1", "true", "yes")


def class_weights(text: str) -> tuple[float, ...]:
  """--class-weight: comma-separated weights, or a file of them (commas, spaces or one per line);
  each finite and not negative, not all zero."""
  source = text
  if Path(text).is_file():
    source = Path(text).read_text()
  elif not any(c.isdigit() for c in text):
    raise argparse.ArgumentTypeError(f"{text!r}: neither a file nor comma-separated weights")
  parts = [t for t in source.replace(",", " ").split() if t]
  try:
    weights = tuple(float(t) for t in parts)
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"{text}: {e}") from None
  bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
  if not weights or bad or not any(weights):
    raise argparse.ArgumentTypeError(
        f"{text}: " + (f"{bad[0]} is not a weight (finite, 0 or more)" if bad else
                       "no positive weight"))
  return weights


def resolve(argv=None) -> tuple[TrainConfig, bool, str | None]:
  """(config, distributed, compile cache) from the command line."""
  args = vars(build_parser().parse_args(argv))
  preset, distributed, cache = args.pop("config"), args.pop("distributed"), args.pop("compile_cache")
  flags: dict[str, Any] = {k: v for k, v in args.items() if v is not None}
  preset = preset or kind_of(flags.get("data", BARE))
  cfg = make_config(load_preset(preset), flags)
  logging.info("preset %s%s", preset, "" if not flags else f", flags {', '.join(sorted(flags))}")
  return cfg, distributed, cache


def _compile_cache(path: str | None) -> None:
  """The persistent compile cache, except for a step over several CPU devices: a 2-device XLA:CPU
  step loaded from the cache once deadlocked in its collectives (each device waiting in another
  rendezvous), so such steps compile fresh."""
  import jax
  if jax.default_backend() == "cpu" and jax.device_count() > 1:
    jax.config.update("jax_enable_compilation_cache", False)
  else:
    cli.enable_compile_cache(path)


def main(argv=None) -> int:
  """Exit status: 0 done (or nothing to do), 2 a one-line error (settings, data, recipe, lock,
  disk, non-finite loss, unreadable checkpoint), 143/130 stopped by SIGTERM/SIGINT after saving
  the step it was at (docs/faults.md)."""
  return cli.run(_main, argv)


def _main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  cli.quiet_absl(logging.WARNING)  # a run shows orbax's warnings
  cfg, distributed, cache = resolve(argv)
  if distributed:
    cli.init_distributed()
  _compile_cache(cache)
  from segnext_jax.trainer import train_and_evaluate
  result = train_and_evaluate(cfg)
  if result.get("nothing_to_do"):
    print(result["nothing_to_do"])
  elif result["history"]["eval"]:
    step, miou, aacc = result["history"]["eval"][-1]
    print(f"final (step {step}): val mIoU {100 * miou:.2f}, aAcc {100 * aacc:.2f}; workdir {cfg.workdir}")
  if result.get("best"):
    b = result["best"]
    print(f"best {b['metric']} {b['value']:.2f} at step {b['step']}: {b['dir']}")
  return 0


console = cli.console(main)
