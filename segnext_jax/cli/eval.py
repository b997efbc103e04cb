"""Evaluate a converted or trained SegNeXt with mmseg's test pipeline and IoUMetric.

  python eval.py converted/segnext_t --data ade20k:/data/ADEChallengeData2016 [--tta] [--out r.json]
  python eval.py runs/synthetic                 # a train.py workdir, on its own validation data
  python eval.py runs/synthetic --step 300      # a chosen step (or: runs/synthetic/checkpoints/300)
NMF bases are the fixed ones stored with the checkpoint (or drawn from --nmf-seed): every image
gets one answer whatever its batch or order, and two runs print identical numbers.
"""
from __future__ import annotations

import json

from segnext_jax import cli
from segnext_jax.cli import inference_flags
from segnext_jax.errors import InputError


def build_parser():
  p = cli.parser(__doc__)
  p.add_argument("checkpoint", help="converted checkpoint dir or train.py workdir")
  cli.add_flag(p, "data", default=None, help="a --data spec as train.py takes it (default: the "
               "training run's data; required for a converted checkpoint)")
  cli.add_flag(p, "batch-size", type=int, default=4, help="images of one padded shape per batch")
  cli.add_flag(p, "max-images", type=int, default=0, help="0 = all")
  cli.add_flag(p, "out", default=None, help="write the results as JSON here")
  cli.add_flag(p, "distributed", action="store_true", help=cli.DISTRIBUTED_HELP)
  inference_flags.add_flags(p)
  return p


def main(argv=None) -> int:
  """Exit status 0, or 2 with one line naming the bad path, step, file or setting (130: Ctrl-C)."""
  return cli.run(_main, argv)


def _main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  cli.quiet_absl()
  if args.distributed:
    cli.init_distributed()
  import jax
  from segnext_jax.data.datasets import check, make_dataset
  import tqdm
  from segnext_jax.eval import Segmenter, evaluate, report
  found = inference_flags.locate(args)  # path and step checked before anything heavy
  data = args.data or (found.meta.get("config") or {}).get("data")
  if data is None:
    raise InputError("--data is required for a converted checkpoint")
  dataset = make_dataset(data, "val")
  check(dataset, decode_images=True)  # every image decodes, labels in range: before the model loads
  run = inference_flags.load(args, found, batch_size=args.batch_size)
  if dataset.num_classes != run.model.num_classes:
    raise InputError(f"the model predicts {run.model.num_classes} classes, {data} has "
                     f"{dataset.num_classes}")
  print(inference_flags.header(found, run))
  segmenter = Segmenter.for_model(run.model, run.cfg, notify=tqdm.tqdm.write)
  res = evaluate(segmenter, run.variables, dataset, args.max_images)
  if res["processes"] > 1:
    tqdm.tqdm.write(f"process {jax.process_index()}: {res['images_here']} of {res['images']} images")
  if jax.process_index() != 0:  # every process has the whole set's metrics; the first reports
    return 0
  names = run.meta.get("class_names") or list(dataset.class_names)
  print(report.format_table(res, names))
  if args.out:
    settings = {**vars(args), "checkpoint": str(found.dir), "step": found.step, "data": data,
                "test_pipeline": inference_flags.describe(run.cfg), "nmf_bases": run.bases}
    with open(args.out, "w") as f:
      json.dump(report.to_json(res, names, settings), f, indent=2)
    print(f"wrote {args.out}")
  return 0


console = cli.console(main)
