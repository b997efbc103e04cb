"""Recipe values per dataset kind: the one table that train presets, eval defaults and CLIs read.

A row overlays TrainConfig's defaults (mmseg's ADE20K recipe). Sizes: `crop_size` is the square
train crop; `resize_scale` (long, short) is both RandomResize's base scale and the test Resize
bound (every mmseg dataset config uses one value for both); `eval_crop`/`eval_stride` matter only
for `eval_mode='slide'` (stride 2/3 of the crop, mmseg's habit). mmseg's ratio range (0.5, 2.0)
and cat_max_ratio 0.75 are the same in every config: they live in data/transforms.py.
This module imports nothing heavy: `config` and the CLIs read it before any data code loads.
"""
from __future__ import annotations

from typing import Any

from segnext_jax.errors import InputError

_ADE = dict(crop_size=512, resize_scale=(2048, 512), eval_mode="whole", eval_crop=(512, 512),
            eval_stride=(341, 341))
_PASCAL_CONTEXT = dict(crop_size=480, resize_scale=(520, 520), eval_mode="whole",
                       eval_crop=(480, 480), eval_stride=(320, 320), steps=80_000)

RECIPES: dict[str, dict[str, Any]] = {
  # mmseg 1.x _base_/datasets/ade20k.py, segnext_mscan-*_1xb16-adamw-160k_ade20k-512x512.py
  "ade20k": dict(_ADE, steps=160_000),
  # SegNeXt local_configs/segnext/*/segnext.*.1024x1024.city.160k.py (test_cfg slide 1024/768);
  # scales: mmseg _base_/datasets/cityscapes_1024x1024.py
  "cityscapes": dict(crop_size=1024, resize_scale=(2048, 1024), eval_mode="slide",
                     eval_crop=(1024, 1024), eval_stride=(768, 768), steps=160_000),
  # SegNeXt segnext.*.512x512.coco_stuff164k.80k.py (test_cfg whole, 80k iterations); crop and
  # scales: mmseg _base_/datasets/coco-stuff164k.py
  "coco_stuff": dict(_ADE, steps=80_000),
  # VOC 2012 + SBD aug: mmseg 1.x _base_/datasets/pascal_voc12_aug.py; 80k iterations: SegNeXt
  # paper Sec. 4 and appendix Tab. 1
  "voc": dict(_ADE, steps=80_000),
  # mmseg 1.x _base_/datasets/pascal_context_59.py / pascal_context.py; 80k: SegNeXt paper
  "pascal_context": _PASCAL_CONTEXT,
  "pascal_context60": _PASCAL_CONTEXT,
  # mmseg 1.x _base_/datasets/isaid.py; 160k, test_cfg whole: JSeg project/segnext/*_896x896_isaid_160k.py
  "isaid": dict(crop_size=896, resize_scale=(896, 896), eval_mode="whole", eval_crop=(896, 896),
                eval_stride=(597, 597), steps=160_000),
  # your own data: the ADE20K recipe, which mmseg's custom-dataset tutorial starts from
  "folder": dict(_ADE, steps=160_000),
  # 128 px procedural scenes: what a bare `python train.py` runs, a few minutes on a CPU
  "synthetic": dict(data="synthetic", crop_size=128, resize_scale=(512, 128), eval_mode="whole",
                    eval_crop=(128, 128), eval_stride=(85, 85), steps=300, batch_size=8, lr=1e-3,
                    head_lr_mult=1.0, warmup_steps=30, eval_every=100, ckpt_every=100,
                    log_every=10, workdir="runs/synthetic"),
}


# --data spec kinds: how each is written and the RECIPES row it trains with. data/datasets.py
# reads each kind (its readers' tables: data/folder.py LAYOUTS, data/voc.py DEVKIT_LAYOUTS).
DATA_SPECS: dict[str, tuple[str, str]] = {
  "synthetic": ("synthetic", "synthetic"),
  "folder": ("folder:PATH", "folder"),
  "ade20k": ("ade20k:PATH", "ade20k"),
  "cityscapes": ("cityscapes:PATH", "cityscapes"),
  "coco_stuff": ("coco_stuff:PATH", "coco_stuff"),
  "isaid": ("isaid:PATH", "isaid"),
  "voc": ("voc:PATH", "voc"),
  "pascal_context": ("pascal_context:PATH", "pascal_context"),
  "pascal_context60": ("pascal_context60:PATH", "pascal_context60"),
  "tfds": ("tfds:ade20k_semantic[:DATA_DIR]", "ade20k"),
}
DATA_HELP = " | ".join(form for form, _ in DATA_SPECS.values())


def parse_spec(spec: str) -> tuple[str, str]:
  """(kind, argument) of a --data spec ('ade20k:/x' -> ('ade20k', '/x')); ValueError (one line)
  for a spec no dataset reads."""
  kind, colon, arg = spec.partition(":")
  form = DATA_SPECS.get(kind, ("",))[0]
  if kind not in DATA_SPECS or (colon and ":" not in form):
    raise InputError(f"unknown dataset {spec!r}; use {DATA_HELP.replace(' | ', ', ')}")
  if ":" in form and not arg:
    raise InputError(f"{kind} needs a path: --data {form}")
  return kind, arg


def kind_of(spec: str) -> str:
  """The RECIPES row of a --data spec ('ade20k:/x' -> 'ade20k'; tfds:ade20k_semantic -> 'ade20k')."""
  return DATA_SPECS[parse_spec(spec)[0]][1]


def recipe_of(spec: str | None) -> dict[str, Any]:
  """The RECIPES row a --data spec trains with, {} for None or an unknown spec (a field a row
  lacks is TrainConfig's default). eval.py/predict.py take a converted checkpoint's test
  pipeline from it (InferenceConfig.from_train)."""
  try:
    return dict(RECIPES[kind_of(spec)]) if spec else {}
  except ValueError:
    return {}  # an unknown spec fails later, with make_dataset's message
