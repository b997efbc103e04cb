"""The recipe table against the configs it cites: mmseg 1.x's _base_ dataset configs (crop, train
and test scales, ratio range, cat_max_ratio) and its SegNeXt ADE20K config (TrainConfig's defaults:
batch, optimizer, schedule, test mode, NMF rank); every --data kind has a row; eval defaults."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from segnext_jax.config import TrainConfig, load_preset, make_config
from segnext_jax.data.folder import LAYOUTS
from segnext_jax.data.voc import DEVKIT_LAYOUTS
from segnext_jax.data.transforms import TrainPipeline
from segnext_jax.recipes import DATA_SPECS, RECIPES, kind_of, recipe_of

# per kind: mmseg 1.x's _base_/datasets config (Cityscapes: the 1024 one SegNeXt trains with)
MMSEG_BASE = {"ade20k": "ade20k.py", "cityscapes": "cityscapes_1024x1024.py",
              "coco_stuff": "coco-stuff164k.py", "voc": "pascal_voc12_aug.py",
              "pascal_context": "pascal_context_59.py", "pascal_context60": "pascal_context.py",
              "isaid": "isaid.py", "folder": "ade20k.py"}


def mmseg_config(rel: str):
  from mmengine.config import Config
  import mmseg
  return Config.fromfile(Path(mmseg.__file__).parent / ".mim/configs" / rel)


@pytest.mark.parametrize("kind", list(MMSEG_BASE))
def test_recipes_follow_mmsegs_dataset_configs(kind):
  cfg, row = mmseg_config(f"_base_/datasets/{MMSEG_BASE[kind]}"), RECIPES[kind]
  train = cfg.train_dataloader.dataset
  train = train.datasets[0] if "datasets" in train else train
  resize = next(t for t in train.pipeline if t.type == "RandomResize")
  crop = next(t for t in train.pipeline if t.type == "RandomCrop")
  test = next(t for t in cfg.val_dataloader.dataset.pipeline if t.type == "Resize")
  assert tuple(crop.crop_size) == (row["crop_size"],) * 2 == tuple(cfg.crop_size)
  assert tuple(resize.scale) == row["resize_scale"] == tuple(test.scale)
  pipeline = TrainPipeline(crop=(row["crop_size"],) * 2, scale=row["resize_scale"])
  assert (tuple(resize.ratio_range), crop.cat_max_ratio) == (pipeline.ratio_range,
                                                              pipeline.cat_max_ratio)
  if row["eval_mode"] == "slide":  # SegNeXt's Cityscapes test_cfg: the crop, stride 3/4 of it
    assert (row["eval_crop"], row["eval_stride"]) == ((1024, 1024), (768, 768))
  # SegNeXt paper Sec. 4 and appendix Tab. 1: 80k iterations for COCO-Stuff and the Pascal sets
  assert row["steps"] == (80_000 if kind in ("coco_stuff", "voc", "pascal_context",
                                             "pascal_context60") else 160_000)


def test_defaults_are_mmsegs_segnext_ade20k_recipe():
  """TrainConfig() is segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512, field by field."""
  ref, cfg = mmseg_config("segnext/segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512.py"), TrainConfig()
  opt = ref.optim_wrapper.optimizer
  warm, poly = ref.param_scheduler
  assert cfg.batch_size == ref.train_dataloader.batch_size == 16
  assert (cfg.lr, (cfg.b1, cfg.b2), cfg.weight_decay) == (opt.lr, tuple(opt.betas), opt.weight_decay)
  assert cfg.head_lr_mult == ref.optim_wrapper.paramwise_cfg.custom_keys["head"].lr_mult
  assert (cfg.warmup_factor, cfg.warmup_steps) == (warm.start_factor, warm.end)
  assert (cfg.poly_power, cfg.steps) == (poly.power, poly.end) == (poly.power, ref.train_cfg.max_iters)
  assert cfg.eval_mode == ref.model.test_cfg.mode
  assert cfg.nmf_rank == ref.model.decode_head.ham_kwargs.MD_R
  assert (cfg.crop_size,) * 2 == tuple(ref.crop_size)
  assert {k: getattr(cfg, k) for k in RECIPES["ade20k"]} == RECIPES["ade20k"]


def test_every_data_kind_has_a_preset_that_makes_a_config():
  assert set(DATA_SPECS) == {"synthetic", "tfds", *LAYOUTS, *DEVKIT_LAYOUTS}
  assert {row for _, row in DATA_SPECS.values()} == set(RECIPES)
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  for kind, row in RECIPES.items():
    assert set(row) <= fields, kind
    cfg = make_config(load_preset(kind), {})
    assert all(getattr(cfg, k) == v for k, v in row.items()), kind
  assert kind_of("tfds:ade20k_semantic:/d") == "ade20k" and kind_of("isaid:/x") == "isaid"
  with pytest.raises(ValueError, match="unknown dataset 'coco:/x'"):
    kind_of("coco:/x")


def test_eval_defaults_come_from_the_recipe():
  """A converted checkpoint's test pipeline, from its --data spec's recipe."""
  from segnext_jax.eval.config import InferenceConfig
  test = lambda spec: InferenceConfig.from_train(recipe_of(spec))
  city = test("cityscapes:/data/cityscapes")
  assert (city.scale, city.mode, city.crop, city.stride) == ((2048, 1024), "slide", (1024, 1024),
                                                             (768, 768))
  ade = test("ade20k:/data/ade")
  assert (ade.scale, ade.mode, ade.crop, ade.stride) == ((2048, 512), "whole", (512, 512), (341, 341))
  assert InferenceConfig() == ade  # the Python API's defaults are the commands'
  assert test("pascal_context:/x").scale == (520, 520)
  assert recipe_of(None) == {} and recipe_of("nonsense:/x") == {}
