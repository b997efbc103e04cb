"""Training configuration: one dataclass (defaults = mmseg's ADE20K recipe), named presets, replay.

A run's config = TrainConfig defaults <- a preset (a row of recipes.RECIPES, by default the one
--data implies, or a saved config.json) <- command-line flags. The resolved config is saved as
WORKDIR/config.json; `train.py --config WORKDIR/config.json` replays it, and resuming a workdir
with a different recipe is refused. `validate` refuses settings that cannot run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

from segnext_jax.errors import InputError
from segnext_jax.recipes import DATA_HELP, RECIPES

Variant = Literal["t", "s", "b", "l"]
Precision = Literal["fp32", "bf16"]
NMFGrad = Literal["unroll", "one_step"]


_ADE = RECIPES["ade20k"]


def _f(default: Any, help: str) -> Any:
  return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every recipe setting; defaults are mmseg's segnext_mscan-*_1xb16-adamw-160k_ade20k-512x512."""
  variant: Variant = _f("t", "model size")
  model_overrides: dict = dataclasses.field(default_factory=dict, metadata={
      "help": 'extra segnext() kwargs as JSON, e.g. \'{"depths": [1, 1, 1, 1]}\''})
  data: str = _f("synthetic", DATA_HELP)
  workdir: str = _f("runs/segnext", "checkpoints, config.json, metrics.jsonl, TensorBoard events")
  pretrained: str = _f("", "ImageNet MSCAN .pth (mmseg/official), segmentor .pth, converted dir, "
                       "or a released model's name (docs/zoo.md)")
  steps: int = _f(_ADE["steps"], "total iterations")
  batch_size: int = _f(16, "global batch (split across devices and processes)")
  crop_size: int = _f(_ADE["crop_size"], "square train crop")
  resize_scale: tuple[int, int] = _f(_ADE["resize_scale"], "RandomResize base scale and test scale (long short)")
  lr: float = _f(6e-5, "AdamW base lr")
  head_lr_mult: float = _f(10.0, "lr multiplier of decode_head params")
  weight_decay: float = _f(0.01, "AdamW decoupled decay (none on backbone norms)")
  b1: float = _f(0.9, "AdamW beta1")
  b2: float = _f(0.999, "AdamW beta2")
  warmup_steps: int = _f(1500, "LinearLR warm-up length")
  warmup_factor: float = _f(1e-6, "LinearLR start factor")
  poly_power: float = _f(1.0, "PolyLR power after warm-up")
  seed: int = _f(0, "init, data order, augmentation, dropout and NMF draws")
  precision: Precision = _f("fp32", "compute dtype (params and NMF stay fp32)")
  remat: bool = _f(False, "rematerialise MSCA blocks: less memory, more compute "
                "(benchmarks/train_step.py --remat measures both)")
  nmf_grad: NMFGrad = _f("unroll", "unroll (mmseg: backprop through NMF) | one_step (Hamburger's)")
  nmf_rank: int = _f(16, "NMF rank R (mmseg 1.x: 16)")
  class_weight: tuple[float, ...] = _f((), "CrossEntropyLoss class_weight, one per class: "
                                       "W0,W1,... or a file of them (none: unweighted)")
  avg_non_ignore: bool = _f(False, "CrossEntropyLoss avg_non_ignore: average over the labelled "
                            "pixels only")
  eval_mode: Literal["whole", "slide"] = _f(_ADE["eval_mode"], "validation inference mode")
  eval_crop: tuple[int, int] = _f(_ADE["eval_crop"], "slide window (eval_mode=slide)")
  eval_stride: tuple[int, int] = _f(_ADE["eval_stride"], "slide stride (eval_mode=slide)")
  eval_every: int = _f(16_000, "validate every N steps")
  eval_images: int = _f(0, "validation images (0 = all)")
  ckpt_every: int = _f(16_000, "checkpoint every N steps")
  keep_ckpts: int = _f(3, "checkpoints kept")
  log_every: int = _f(50, "log metrics every N steps")
  save_best: str = _f("", "keep WORKDIR/best, the validated step with the highest METRIC: mIoU, "
                      "mAcc, aAcc or IoU.<class name> (none: off)")
  workers: int = _f(min(8, max(1, (os.cpu_count() or 2) - 1)),
                    "worker processes that decode and augment training images (0: in the training "
                    "process, for debugging); benchmarks/input_pipeline.py measures their rate")


# Fields that change how a run is watched or stored, not what it computes: a resumed run may
# change them (and the step budget); any other difference from the saved config is refused.
# `pretrained` only sets the initial weights, which a resumed run takes from its checkpoint.
RUNTIME_FIELDS = ("steps", "workdir", "eval_every", "eval_images", "ckpt_every", "keep_ckpts",
                  "log_every", "workers", "pretrained", "save_best")

def load_preset(name_or_file: str) -> dict[str, Any]:
  """A preset's overlay: a RECIPES row's name, or a saved config.json (replays every field)."""
  if name_or_file in RECIPES:
    return dict(RECIPES[name_or_file])
  path = Path(name_or_file)
  if not path.is_file():
    raise InputError(f"--config {name_or_file!r}: neither a preset ({', '.join(RECIPES)}) nor a file")
  try:
    values = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise InputError(f"--config {path}: not JSON ({e})") from None
  unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
  if unknown:
    raise InputError(f"--config {path}: unknown settings {unknown}")
  return values


def make_config(overlay: dict[str, Any], flags: dict[str, Any]) -> TrainConfig:
  """Defaults <- overlay <- flags, with types checked and tuples restored from JSON lists."""
  hints = typing.get_type_hints(TrainConfig)
  values = {**overlay, **flags}
  for name, value in values.items():
    if name not in hints:
      raise InputError(f"unknown setting {name!r}")
    values[name] = _coerce(name, hints[name], value)
  return TrainConfig(**values)


def _coerce(name: str, typ: Any, value: Any) -> Any:
  origin = typing.get_origin(typ)
  if origin is tuple:
    item = typing.get_args(typ)[0]
    return tuple(item(v) for v in value)
  if origin is Literal:
    if value not in typing.get_args(typ):
      raise InputError(f"{name}={value!r}: expected one of {typing.get_args(typ)}")
    return value
  if typ is float and isinstance(value, int):
    return float(value)
  return value


def to_json(cfg: TrainConfig) -> str:
  return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


def recipe_diff(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
  """'field: saved -> now' for every recipe field that differs (runtime fields ignored; a field
  the saved config predates had its default)."""
  now, default = json.loads(to_json(cfg)), json.loads(to_json(TrainConfig()))
  return [f"{k}: {saved.get(k, default[k])!r} -> {now[k]!r}" for k in sorted(now)
          if k not in RUNTIME_FIELDS and saved.get(k, default[k]) != now[k]]


def validate(cfg: TrainConfig, devices: int, processes: int) -> None:
  """Refuse settings that cannot run (ValueError naming the flag), before anything is written;
  warn about ones that run but are probably not meant."""
  from segnext_jax import backend, best_checkpoint, zoo
  from segnext_jax.model import TOTAL_STRIDE
  backend.policy()  # a bad SEGNEXT_JAX_POLICY: its one-line error before the workdir is touched
  flag = lambda name: "--" + name.replace("_", "-")
  for name in ("steps", "batch_size", "crop_size", "ckpt_every", "log_every", "eval_every",
               "keep_ckpts", "nmf_rank"):
    if getattr(cfg, name) < 1:
      raise InputError(f"{flag(name)} {getattr(cfg, name)}: must be at least 1")
  for name in ("warmup_steps", "eval_images", "workers"):
    if getattr(cfg, name) < 0:
      raise InputError(f"{flag(name)} {getattr(cfg, name)}: must not be negative")
  if not (math.isfinite(cfg.lr) and cfg.lr > 0):
    raise InputError(f"--lr {cfg.lr}: must be a positive number")
  if cfg.batch_size % devices:
    raise InputError(f"--batch-size {cfg.batch_size}: must be a multiple of the {devices} devices "
                     f"({processes} process{'es' if processes > 1 else ''}), which split each batch")
  if cfg.crop_size < TOTAL_STRIDE:
    raise InputError(f"--crop-size {cfg.crop_size}: must be at least {TOTAL_STRIDE} (the network's "
                     "stride)")
  for name in ("resize_scale", "eval_crop", "eval_stride"):
    if min(getattr(cfg, name)) < 1:
      raise InputError(f"{flag(name)} {' '.join(map(str, getattr(cfg, name)))}: must be positive")
  if cfg.eval_mode == "slide" and any(s > c for s, c in zip(cfg.eval_stride, cfg.eval_crop)):
    raise InputError(f"--eval-stride {cfg.eval_stride} is larger than --eval-crop {cfg.eval_crop}: "
                     "sliding windows would leave gaps")
  if cfg.save_best:
    best_checkpoint.check_metric(cfg.save_best)
  if cfg.pretrained:
    zoo.check_source(cfg.pretrained)  # an unknown name: one line, before the workdir is touched
  if cfg.warmup_steps > cfg.steps:
    logging.getLogger("segnext_jax.train").warning(
        "--warmup-steps %d is longer than the run (--steps %d): the lr never reaches --lr",
        cfg.warmup_steps, cfg.steps)


def validate_for_data(cfg: TrainConfig, num_classes: int, class_names: Sequence[str]) -> None:
  """Settings that name the data's classes: one weight per class, a --save-best class."""
  from segnext_jax import best_checkpoint
  if cfg.class_weight and len(cfg.class_weight) != num_classes:
    raise InputError(f"--class-weight has {len(cfg.class_weight)} weights, but {cfg.data} has "
                     f"{num_classes} classes ({', '.join(class_names[:3])}, ...)")
  if cfg.save_best:
    best_checkpoint.check_metric(cfg.save_best, list(class_names))
