"""Evaluate a converted or trained SegNeXt with mmseg's test pipeline and IoUMetric.

  python eval.py converted/segnext_t --data ade20k:/data/ADEChallengeData2016 [--tta] [--out r.json]
  python eval.py runs/synthetic                 # a train.py workdir, on its own validation data
NMF bases of image i come from fold_in(key(--nmf-seed), i): equal seeds give identical results.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np


def format_table(res: dict, names) -> str:
  rows = ["| class | IoU | Acc |", "|---|---|---|"]
  for name, iou, acc in zip(names, res["IoU"], res["Acc"]):
    rows.append(f"| {name} | {100 * iou:.2f} | {100 * acc:.2f} |")
  rows.append(f"\naAcc {100 * res['aAcc']:.2f}  mIoU {100 * res['mIoU']:.2f}  mAcc {100 * res['mAcc']:.2f}"
              f"  ({res['images']} images, {res['images_per_s']:.2f} img/s)")
  return "\n".join(rows)


def to_json(res: dict, names, args) -> dict:
  clean = lambda x: None if not np.isfinite(x) else round(float(x) * 100, 4)
  return {"aAcc": clean(res["aAcc"]), "mIoU": clean(res["mIoU"]), "mAcc": clean(res["mAcc"]),
          "per_class": {n: {"IoU": clean(i), "Acc": clean(a)} for n, i, a in zip(names, res["IoU"], res["Acc"])},
          "images": res["images"], "images_per_s": res["images_per_s"], "settings": vars(args)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoint", help="converted checkpoint dir or train.py workdir")
  p.add_argument("--data", default=None, help="ade20k:PATH | tfds:scene_parse150[:DIR] | synthetic "
                 "(default: the training run's data, else required)")
  p.add_argument("--mode", choices=["whole", "slide"], default="whole")
  p.add_argument("--crop", type=int, nargs=2, default=(1024, 1024), help="slide window")
  p.add_argument("--stride", type=int, nargs=2, default=(768, 768), help="slide stride")
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--max-images", type=int, default=0, help="0 = all")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  from segnext_jax.checkpoint import class_names
  from segnext_jax.data.datasets import make_dataset
  from segnext_jax.eval_lib import EvalConfig, Predictor, add_inference_flags, evaluate, load_for_inference
  add_inference_flags(p)
  args = p.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    model, variables, run_cfg, scale = load_for_inference(args)
    data = args.data or run_cfg.get("data")
    if data is None:
      raise ValueError("--data is required for a converted checkpoint")
    dataset = make_dataset(data, "val")
  except (FileNotFoundError, ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if dataset.num_classes != model.num_classes:
    print(f"error: the model predicts {model.num_classes} classes, {data} has {dataset.num_classes}",
          file=sys.stderr)
    return 2
  cfg = EvalConfig(scale=scale, mode=args.mode, crop=tuple(args.crop), stride=tuple(args.stride),
                   tta=args.tta, nmf_seed=args.nmf_seed, batch_size=args.batch_size)
  res = evaluate(Predictor(model, variables, cfg), dataset, args.max_images)
  names = class_names(args.checkpoint) or list(dataset.class_names)
  print(format_table(res, names))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(to_json(res, names, args), f, indent=2)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  from segnext_jax.cpu_runtime import reexec_with_huge_pages
  reexec_with_huge_pages()
  sys.exit(main())
