"""Evaluation throughput on ADE20K-sized images: `segnext_jax.eval.evaluate` (what eval.py runs), whole
and multi-scale + flip TTA, with a cold and then a warm on-disk compile cache.

  python benchmarks/eval_throughput.py [--variant t] [--images 10] [--modes whole tta]

The images are the three real ADE20K val JPEGs of tests/data, each also cut and resized to other
sizes of ADE20K's val set (which has no single size), written as an `ade20k:` tree. Each
(mode, cache) run is its own process: 'cold' starts from an empty compile cache, 'warm' reuses
the cache the cold run filled (what a second eval.py run on the same machine gets).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ADE_SAMPLE = ROOT / "tests" / "data" / "ade20k_val3"
# (height, width) of ADE20K val images: the three samples' own sizes come first.
SIZES = [(512, 683), (683, 512), (512, 768), (384, 512), (512, 640), (600, 800), (480, 640),
         (512, 910), (768, 512), (427, 640)]


def write_ade_tree(dst: Path, n: int) -> None:
  """n images + annotations in ADEChallengeData2016 layout, from the real val samples."""
  import cv2
  src_img = sorted((ADE_SAMPLE / "images" / "validation").glob("*.jpg"))
  src_ann = sorted((ADE_SAMPLE / "annotations" / "validation").glob("*.png"))
  for sub in ("images", "annotations"):
    (dst / sub / "validation").mkdir(parents=True, exist_ok=True)
  for i in range(n):
    img = cv2.imread(str(src_img[i % len(src_img)]), cv2.IMREAD_COLOR)
    ann = cv2.imread(str(src_ann[i % len(src_ann)]), cv2.IMREAD_UNCHANGED)
    if i >= len(src_img):  # another ADE size, same content
      h, w = SIZES[i % len(SIZES)]
      img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
      ann = cv2.resize(ann, (w, h), interpolation=cv2.INTER_NEAREST)
    name = f"ADE_val_{i + 1:08d}"
    cv2.imwrite(str(dst / "images" / "validation" / f"{name}.jpg"), img)
    cv2.imwrite(str(dst / "annotations" / "validation" / f"{name}.png"), ann)


def run_one(args) -> dict:
  """One evaluation in this process (the --side child)."""
  from segnext_jax.cli import enable_compile_cache
  from segnext_jax.data.datasets import make_dataset
  from segnext_jax.eval import InferenceConfig, Segmenter, evaluate
  from segnext_jax.model import fixed_bases, init_variables, segnext
  import jax
  enable_compile_cache(args.cache)
  model = segnext(args.variant)
  variables = {**init_variables(model, jax.random.key(0)), **fixed_bases(model, 0)}
  dataset = make_dataset(f"ade20k:{args.data}", "val")
  segmenter = Segmenter.for_model(model, InferenceConfig(tta=args.mode == "tta"))
  t = time.perf_counter()
  res = evaluate(segmenter, variables, dataset, progress=False)
  return {"seconds": time.perf_counter() - t, "images": res["images"]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="t", choices=["t", "s", "b", "l"])
  p.add_argument("--images", type=int, default=10)
  p.add_argument("--modes", nargs="+", default=["whole", "tta"], choices=["whole", "tta"])
  p.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--mode", help=argparse.SUPPRESS)
  p.add_argument("--data", help=argparse.SUPPRESS)
  p.add_argument("--cache", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.side:
    print(json.dumps(run_one(args)))
    return
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    data = Path(tmp) / "ade"
    write_ade_tree(data, args.images)
    for mode in args.modes:
      cache = Path(tmp) / f"cache-{mode}"
      for state in ("cold", "warm"):
        cmd = [sys.executable, __file__, "--side", "--variant", args.variant, "--mode", mode,
               "--data", str(data), "--cache", str(cache)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
          sys.exit(f"{mode}/{state} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((mode, state, r["images"], r["seconds"]))
      shutil.rmtree(cache, ignore_errors=True)
  print(f"SegNeXt-{args.variant.upper()} eval.py throughput, {args.images} ADE20K-sized images "
        f"(mmseg1 pipeline, scale (2048, 512); TTA: 6 ratios x flip), {os.cpu_count()} CPU cores")
  print("| mode | compile cache | images | seconds | images/s |")
  print("|---|---|---|---|---|")
  for mode, state, n, s in rows:
    print(f"| {mode} | {state} | {n} | {s:.1f} | {n / s:.2f} |")


if __name__ == "__main__":
  main()
