"""Train SegNeXt with mmseg's ADE20K recipe (or a short synthetic run when no data is given).

  python train.py                                   # synthetic data, SegNeXt-T, a few minutes on CPU
  python train.py --variant=l --data=ade20k:/data/ADEChallengeData2016 \
      --pretrained=mscan_l_20230227-cef260d4.pth --workdir=runs/l
Re-running with the same --workdir resumes from its latest checkpoint.
Multi-host: call with SEGNEXT_DISTRIBUTED=1 on every host (jax.distributed.initialize reads the
cluster from the environment); each process loads only its shard of every global batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing

HELP = {
    "variant": "model size: t, s, b or l", "data": "synthetic | ade20k:PATH | tfds:scene_parse150[:DATA_DIR]",
    "workdir": "checkpoints, config.json (resumes if it holds checkpoints)",
    "pretrained": "ImageNet MSCAN .pth (mmseg/official), mmseg segmentor .pth or converted dir",
    "steps": "total iterations", "batch_size": "global batch (split across devices)",
    "crop_size": "square train crop", "resize_scale": "RandomResize base scale (long short)",
    "lr": "AdamW base lr", "head_lr_mult": "lr multiplier of decode_head params",
    "weight_decay": "AdamW decoupled decay (none on backbone norms)",
    "warmup_steps": "LinearLR warm-up length", "warmup_factor": "LinearLR start factor",
    "poly_power": "PolyLR power after warm-up", "precision": "fp32 | bf16 (compute; NMF stays fp32)",
    "remat": "rematerialise MSCA blocks to save memory", "nmf_grad": "unroll (mmseg) | one_step",
    "eval_every": "validate every N steps", "eval_images": "validation images (0 = all)",
    "ckpt_every": "checkpoint every N steps", "keep_ckpts": "checkpoints kept",
}


def parse_args(argv=None) -> dict:
  from segnext_jax.train_lib import TrainConfig
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  hints = typing.get_type_hints(TrainConfig)
  for f in dataclasses.fields(TrainConfig):
    typ = hints[f.name]
    kw: dict = dict(default=None, help=f"{HELP.get(f.name, '')} (default {f.default})")
    if typ is bool:
      kw.update(type=lambda s: s.lower() in ("1", "true", "yes"), metavar="BOOL")
    elif typing.get_origin(typ) is tuple:
      kw.update(type=int, nargs=2)
    else:
      kw.update(type=typ)
    p.add_argument(f"--{f.name}", **kw)
  args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(p.parse_args(argv)).items()}
  return {k: v for k, v in args.items() if v is not None}


def main(argv=None) -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  if os.environ.get("SEGNEXT_DISTRIBUTED"):
    import jax
    jax.distributed.initialize()
  from segnext_jax.train_lib import TrainConfig, train_and_evaluate
  args = parse_args(argv)
  cfg = TrainConfig.for_data(args.pop("data", "synthetic"), **args)
  result = train_and_evaluate(cfg)
  if result["history"]["eval"]:
    step, miou, aacc = result["history"]["eval"][-1]
    print(f"final (step {step}): val mIoU {100 * miou:.2f}, aAcc {100 * aacc:.2f}; workdir {cfg.workdir}")


if __name__ == "__main__":
  from segnext_jax.cpu_runtime import reexec_with_huge_pages
  reexec_with_huge_pages()
  main()
