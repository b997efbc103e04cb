"""Evaluate a converted or trained SegNeXt with mmseg's test pipeline and IoUMetric.

  python eval.py converted/segnext_t --data ade20k:/data/ADEChallengeData2016 [--tta] [--out r.json]
  python eval.py runs/synthetic                 # a train.py workdir, on its own validation data
  python eval.py runs/synthetic --step 300      # a chosen step (or: runs/synthetic/checkpoints/300)
NMF bases are the fixed ones stored with the checkpoint (or drawn from --nmf-seed): every image
gets one answer whatever its batch or order, and two runs print identical numbers.
"""
from __future__ import annotations

import json

import numpy as np

from segnext_jax import cli
from segnext_jax.cli import inference_flags


def format_table(res: dict, names) -> str:
  rows = ["| class | IoU | Acc |", "|---|---|---|"]
  for name, iou, acc in zip(names, res["IoU"], res["Acc"]):
    rows.append(f"| {name} | {100 * iou:.2f} | {100 * acc:.2f} |")
  rows.append(f"\naAcc {100 * res['aAcc']:.2f}  mIoU {100 * res['mIoU']:.2f}  mAcc {100 * res['mAcc']:.2f}"
              f"  ({res['images']} images, {res['images_per_s']:.2f} img/s)")
  return "\n".join(rows)


def to_json(res: dict, names, settings: dict) -> dict:
  clean = lambda x: None if not np.isfinite(x) else round(float(x) * 100, 4)
  return {"aAcc": clean(res["aAcc"]), "mIoU": clean(res["mIoU"]), "mAcc": clean(res["mAcc"]),
          "per_class": {n: {"IoU": clean(i), "Acc": clean(a)} for n, i, a in zip(names, res["IoU"], res["Acc"])},
          "images": res["images"], "images_per_s": res["images_per_s"], "settings": settings}


def build_parser():
  p = cli.parser(__doc__)
  p.add_argument("checkpoint", help="converted checkpoint dir or train.py workdir")
  cli.add_flag(p, "data", default=None, help="a --data spec as train.py takes it (default: the "
               "training run's data; required for a converted checkpoint)")
  cli.add_flag(p, "batch-size", type=int, default=4, help="images of one padded shape per batch")
  cli.add_flag(p, "max-images", type=int, default=0, help="0 = all")
  cli.add_flag(p, "out", default=None, help="write the results as JSON here")
  inference_flags.add_flags(p)
  return p


def main(argv=None) -> int:
  """Exit status 0, or 2 with one line naming the bad path, step, file or setting (130: Ctrl-C)."""
  return cli.run(_main, argv)


def _main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  cli.quiet_absl()
  from segnext_jax.data.datasets import check, make_dataset
  import tqdm
  from segnext_jax.eval import Segmenter, evaluate
  meta = inference_flags.read_meta(args)  # path and step checked before anything heavy
  data = args.data or (meta.get("config") or {}).get("data")
  if data is None:
    raise ValueError("--data is required for a converted checkpoint")
  dataset = make_dataset(data, "val")
  check(dataset, decode_images=True)  # every image decodes, labels in range: before the model loads
  run = inference_flags.load(args, batch_size=args.batch_size)
  if dataset.num_classes != run.model.num_classes:
    raise ValueError(f"the model predicts {run.model.num_classes} classes, {data} has "
                     f"{dataset.num_classes}")
  print(f"checkpoint: {args.checkpoint} step {args.step}\ntest pipeline: "
        f"{inference_flags.describe(run.cfg)}\nNMF bases: {run.bases}")
  segmenter = Segmenter.for_model(run.model, run.cfg, notify=tqdm.tqdm.write)
  res = evaluate(segmenter, run.variables, dataset, args.max_images)
  names = run.meta.get("class_names") or list(dataset.class_names)
  print(format_table(res, names))
  if args.out:
    settings = {**vars(args), "checkpoint": str(args.checkpoint), "data": data,
                "test_pipeline": inference_flags.describe(run.cfg), "nmf_bases": run.bases}
    with open(args.out, "w") as f:
      json.dump(to_json(res, names, settings), f, indent=2)
    print(f"wrote {args.out}")
  return 0


console = cli.console(main)
