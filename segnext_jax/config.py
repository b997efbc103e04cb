"""Training configuration: one dataclass (defaults = mmseg's ADE20K recipe), named presets, replay.

A run's config = TrainConfig defaults <- a preset (a row of recipes.RECIPES, by default the one
--data implies, or a saved config.json) <- command-line flags. The resolved config is saved as WORKDIR/config.json; `train.py --config
WORKDIR/config.json` replays it, and resuming a workdir with a different recipe is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

from segnext_jax.recipes import RECIPES, kind_of

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
  data: str = _f("synthetic", "synthetic | ade20k:PATH | cityscapes:PATH | coco_stuff:PATH | "
                 "voc:PATH | pascal_context:PATH | pascal_context60:PATH | isaid:PATH | "
                 "folder:PATH | tfds:ade20k_semantic[:DATA_DIR]")
  workdir: str = _f("runs/segnext", "checkpoints, config.json, metrics.jsonl, TensorBoard events")
  pretrained: str = _f("", "ImageNet MSCAN .pth (mmseg/official), segmentor .pth or converted dir")
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
  remat: bool = _f(False, "rematerialise MSCA blocks (less memory, ~30%% slower)")
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
                    "process, for debugging); each gives ~100 ADE20K 512x512 images/s per core")


# Fields that change how a run is watched or stored, not what it computes: a resumed run may
# change them (and the step budget); any other difference from the saved config is refused.
# `pretrained` only sets the initial weights, which a resumed run takes from its checkpoint.
RUNTIME_FIELDS = ("steps", "workdir", "eval_every", "eval_images", "ckpt_every", "keep_ckpts",
                  "log_every", "workers", "pretrained", "save_best")

# Named presets: the recipe table's rows (segnext_jax/recipes.py cites each source config).
# 'ade20k' is the paper recipe itself; 'synthetic' is a few-minute CPU run.
PRESETS = RECIPES


def preset_for_data(data: str) -> str:
  """The preset a --data spec implies when --config is not given (ValueError if unknown)."""
  return kind_of(data)


def load_preset(name_or_file: str) -> dict[str, Any]:
  """A preset's overlay: a PRESETS name, or a saved config.json (replays every field)."""
  if name_or_file in PRESETS:
    return dict(PRESETS[name_or_file])
  path = Path(name_or_file)
  if not path.is_file():
    raise ValueError(f"--config {name_or_file!r}: neither a preset ({', '.join(PRESETS)}) nor a file")
  try:
    values = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"--config {path}: not JSON ({e})") from None
  unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
  if unknown:
    raise ValueError(f"--config {path}: unknown settings {unknown}")
  return values


def make_config(overlay: dict[str, Any], flags: dict[str, Any]) -> TrainConfig:
  """Defaults <- overlay <- flags, with types checked and tuples restored from JSON lists."""
  hints = typing.get_type_hints(TrainConfig)
  values = {**overlay, **flags}
  for name, value in values.items():
    if name not in hints:
      raise ValueError(f"unknown setting {name!r}")
    values[name] = _coerce(name, hints[name], value)
  return TrainConfig(**values)


def _coerce(name: str, typ: Any, value: Any) -> Any:
  origin = typing.get_origin(typ)
  if origin is tuple:
    item = typing.get_args(typ)[0]
    return tuple(item(v) for v in value)
  if origin is Literal:
    if value not in typing.get_args(typ):
      raise ValueError(f"{name}={value!r}: expected one of {typing.get_args(typ)}")
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
