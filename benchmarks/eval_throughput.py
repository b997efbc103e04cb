"""Evaluation throughput once compiled: images/s of `segnext_jax.eval.evaluate` (what eval.py runs),
whole and multi-scale + flip TTA, timed after a first pass over the same images has compiled every
program they need. The time to a first result, compiling included, is eval_cold.py's.

  python benchmarks/eval_throughput.py [--variant t] [--images 10] [--modes whole tta] [--runs 2]

Images: common.write_ade_eval_tree, the set eval_cold.py uses (the three real ADE20K val JPEGs of
tests/data and crops of them at other sizes, 230-700 px), read as an `ade20k:` tree, evaluated
with InferenceConfig's defaults (mmseg 1.x's ADE20K test pipeline; whole: batches of 4). Weights:
random init with fixed NMF bases. One process, opted in to segnext_jax's malloc policy first, as
eval.py is.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import common  # benchmarks/common.py: this script's folder is first on sys.path


def throughput(variant: str, data: Path, mode: str, runs: int) -> dict:
  """Images and median seconds of `runs` evaluate() passes over `data` after one untimed pass
  (which compiles every canvas the images need)."""
  import jax
  from segnext_jax.data.datasets import make_dataset
  from segnext_jax.eval import InferenceConfig, Segmenter, evaluate
  from segnext_jax.model import fixed_bases, init_variables, segnext
  model = segnext(variant)
  variables = {**init_variables(model, jax.random.key(0)), **fixed_bases(model, 0)}
  dataset = make_dataset(f"ade20k:{data}", "val")
  segmenter = Segmenter.for_model(model, InferenceConfig(tta=mode == "tta"))
  images = evaluate(segmenter, variables, dataset, progress=False)["images"]
  seconds = [evaluate(segmenter, variables, dataset, progress=False)["seconds"] for _ in range(runs)]
  return {"images": images, "seconds": statistics.median(seconds)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="t", choices=["t", "s", "b", "l"])
  p.add_argument("--images", type=int, default=10)
  p.add_argument("--modes", nargs="+", default=["whole", "tta"], choices=["whole", "tta"])
  p.add_argument("--runs", type=int, default=2, help="timed passes per mode (median)")
  args = p.parse_args()
  policy = common.keep_freed_memory()  # first: before JAX starts
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    data = Path(tmp) / "ade"
    common.write_ade_eval_tree(data, args.images)
    for mode in args.modes:
      rows.append((mode, throughput(args.variant, data, mode, args.runs)))
  print(f"SegNeXt-{args.variant.upper()} eval throughput, compiled: {args.images} ADE20K-sized images "
        f"(mmseg1 pipeline, scale (2048, 512); TTA: 6 ratios x flip), median of {args.runs} passes "
        f"after a compiling one; {os.cpu_count()} CPU cores, malloc policy {'on' if policy else 'off'}")
  print("| mode | images | seconds per pass | images/s |")
  print("|---|---|---|---|")
  for mode, r in rows:
    print(f"| {mode} | {r['images']} | {r['seconds']:.1f} | {r['images'] / r['seconds']:.2f} |")


if __name__ == "__main__":
  main()
