"""Train input pipeline speed: our TrainLoader (grain worker processes) per worker count against
mmseg 1.x's own ADE20K `train_pipeline` on one core, measured in the same run.

  python benchmarks/input_pipeline.py --make-data /tmp/ade_bench      # 24 ADE-sized JPEGs, once
                                                                       # (common.write_ade_train_tree)
  python benchmarks/input_pipeline.py --data ade20k:/tmp/ade_bench --workers 1 2

Prints one line per worker count, `workers=N images_per_s=X` (batch 16, 512x512 crops, the ADE20K
train recipe: RandomResize (2048, 512) x 0.5-2, RandomCrop cat_max 0.75, flip, photometric), then
mmseg's `train_pipeline` (LoadImageFromFile, LoadAnnotations(reduce_zero_label), RandomResize,
RandomCrop, RandomFlip, PhotoMetricDistortion, PackSegInputs) in a subprocess pinned to one core,
the CPU time per image of each (ours: the training process and its workers), and a per-sample
profile of our stages on one thread. Both sides read the same files. Images/s depend on what
else the machine runs; CPU time per image much less so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common  # benchmarks/common.py: this script's folder is first on sys.path


def mmseg_rate(root: Path, samples: int) -> tuple[float, float]:
  """(images/s, CPU ms per image) of mmseg 1.x's ADE20KDataset with the train_pipeline of its
  _base_ ade20k config, on this core."""
  from segnext_jax.mmseg_reference import stub_mmcv_ops
  stub_mmcv_ops()
  import cv2
  import mmseg
  from mmengine.config import Config
  from mmseg.datasets import ADE20KDataset
  from mmseg.utils import register_all_modules
  cv2.setNumThreads(1)
  register_all_modules()
  cfg = Config.fromfile(Path(mmseg.__file__).parent / ".mim/configs/_base_/datasets/ade20k.py")
  ds = ADE20KDataset(data_root=str(root), pipeline=cfg.train_pipeline, data_prefix=dict(
      img_path="images/training", seg_map_path="annotations/training"))
  np.random.seed(0)
  for i in range(4):  # warm-up: imports and first calls
    ds[i]
  c, t = time.process_time(), time.perf_counter()
  for i in range(samples):
    ds[i % len(ds)]
  return samples / (time.perf_counter() - t), 1e3 * (time.process_time() - c) / samples


def recipe_pipeline():
  """TrainPipeline as train.py builds it for ADE20K (ratio range, cat_max_ratio: mmseg's, the
  pipeline's defaults)."""
  from segnext_jax.data.transforms import TrainPipeline
  from segnext_jax.recipes import RECIPES
  r = RECIPES["ade20k"]
  return TrainPipeline(crop=(r["crop_size"],) * 2, scale=tuple(r["resize_scale"]))


def _workers() -> list:
  import psutil
  return [p for p in psutil.Process().children()
          if "resource_tracker" not in " ".join(p.cmdline())]


def loader_rate(ds, workers: int, batches: int, batch: int = 16) -> tuple[float, float]:
  """TrainLoader's steady (images/s, CPU ms per image of this process and its workers); the
  first two batches (process start, warm-up) are not timed."""
  from segnext_jax.data.loader import TrainLoader
  loader = TrainLoader(ds, recipe_pipeline(), batch, seed=0, workers=workers)
  try:
    it = iter(loader)
    for _ in range(2):
      next(it)
    procs = _workers()
    cpu = lambda: time.process_time() + sum(sum(p.cpu_times()[:2]) for p in procs)
    c, t = cpu(), time.perf_counter()
    for _ in range(batches):
      next(it)
    n = batches * batch
    return n / (time.perf_counter() - t), 1e3 * (cpu() - c) / n
  finally:
    loader.close()


def profile_stages(ds, samples: int) -> tuple[dict[str, float], dict[str, float]]:
  """Mean ms per sample of each stage of TrainLoader's work, one thread (cv2 too), and of the
  decodes inside dataset[i] (timed apart, not in the total)."""
  import cv2
  from segnext_jax.data import files, transforms as T
  cv2.setNumThreads(1)
  pipe, ms, inside = recipe_pipeline(), {}, {}
  def lap(table, name, t0):
    table[name] = table.get(name, 0.0) + 1e3 * (time.perf_counter() - t0) / samples
    return time.perf_counter()
  for n in range(samples):
    rng, i = np.random.default_rng([0, n, 0]), n % len(ds)
    t = time.perf_counter()
    files.read_image(ds.images[i])
    t = lap(inside, "decode image (cv2)", t)
    files.read_mask(ds.masks[i])
    t = lap(inside, "decode mask (PIL)", t)
    img, label = ds[i]
    t = lap(ms, "dataset[i]: decode, check, label map", t)
    ratio = rng.uniform(*pipe.ratio_range)
    hw = T.rescale_size(img.shape[:2], (int(pipe.scale[0] * ratio), int(pipe.scale[1] * ratio)))
    img, label = T.resize_image(img, hw), T.resize_label(label, hw)
    t = lap(ms, "resize", t)
    img, label = T.random_crop(img, label, rng, pipe.crop, pipe.cat_max_ratio)
    t = lap(ms, "crop (cat_max re-draws)", t)
    if rng.random() < pipe.flip_prob:
      img, label = cv2.flip(img, 1), label[:, ::-1]
    t = lap(ms, "flip", t)
    img = T.photometric_distortion(np.ascontiguousarray(img), rng)
    t = lap(ms, "photometric", t)
    out = np.zeros((*pipe.crop, 3), np.uint8)
    out[:img.shape[0], :img.shape[1]] = img
    lap(ms, "pad (uint8)", t)
  ms["total"] = sum(ms.values())
  return ms, inside


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", help="ade20k:DIR (an ADEChallengeData2016 tree)")
  p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  p.add_argument("--batches", type=int, default=12, help="timed batches of 16 per worker count")
  p.add_argument("--mmseg-samples", type=int, default=192)
  p.add_argument("--profile-samples", type=int, default=96)
  p.add_argument("--make-data", metavar="DIR", help="write 24 ADE-sized pairs to DIR and exit")
  p.add_argument("--mmseg-only", metavar="DIR", help=argparse.SUPPRESS)  # the pinned child
  args = p.parse_args(argv)
  if args.make_data:
    print(f"wrote {common.write_ade_train_tree(Path(args.make_data))}; run with --data "
          f"ade20k:{args.make_data}")
    return
  if args.mmseg_only:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rate, cpu_ms = mmseg_rate(Path(args.mmseg_only), args.mmseg_samples)
    print(json.dumps({"images_per_s": rate, "cpu_ms": cpu_ms}))
    return
  if not args.data or not args.data.startswith("ade20k:"):
    p.error("--data ade20k:DIR is required (make one with --make-data DIR)")
  common.keep_freed_memory()  # first, as train.py: the loader's process is the trainer's
  from segnext_jax.data.datasets import make_dataset
  ds = make_dataset(args.data, "train")
  print(f"{args.data}: {len(ds)} images, batch 16, 512x512 crops, ADE20K recipe; "
        f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start")
  cpu = {}
  for w in args.workers:
    rate, cpu[w] = loader_rate(ds, w, args.batches)
    print(f"workers={w} images_per_s={rate:.1f}", flush=True)
  child = subprocess.run([sys.executable, __file__, "--mmseg-only", args.data.partition(":")[2],
                          "--mmseg-samples", str(args.mmseg_samples)],
                         capture_output=True, text=True, check=True)
  mm = json.loads(child.stdout.strip().splitlines()[-1])
  print(f"mmseg train_pipeline (1 core) images_per_s={mm['images_per_s']:.1f}")
  print("CPU time per image (all processes; what a loaded machine does not change much), and "
        "the images/s one core gives at that cost:")
  for w, ms in cpu.items():
    print(f"  ours, workers={w:<3d} {ms:6.2f} ms  {1e3 / ms:6.1f} images/s per core")
  print(f"  mmseg, 1 core   {mm['cpu_ms']:6.2f} ms  {1e3 / mm['cpu_ms']:6.1f} images/s per core")
  stages, inside = profile_stages(ds, args.profile_samples)
  print(f"our per-sample stages, one thread ({args.profile_samples} samples), ms:")
  for name, ms in stages.items():
    print(f"  {name:38s} {ms:6.2f}")
  for name, ms in inside.items():
    print(f"    within dataset[i]: {name:19s} {ms:6.2f}")
  print(f"load average {os.getloadavg()[0]:.2f} at the end (numbers from a loaded machine are noisy)")


if __name__ == "__main__":
  main()
