"""What the benchmark scripts share: the malloc opt-in, the timing helpers, and the data they run
on (a train batch as TrainLoader builds it, ADE20K-layout image trees made from tests/data).

The scripts run as `python benchmarks/x.py`, and Python puts a script's own folder first on
sys.path, so `import common` finds this file from any working directory with no sys.path edit:
benchmarks/ is a folder of scripts, not a package. Nothing here starts JAX on import.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ADE_SAMPLE = REPO / "tests" / "data" / "ade20k_val3"  # three real ADE20K val JPEGs and masks
NUM_CLASSES = 150  # ADE20K's, the model every benchmark builds
# (height, width) of the evaluation images, 200-700 px: the three samples' own sizes first, then
# crops of them resized to other sizes and aspect ratios (ADE20K's val set has no single size).
EVAL_SIZES = [(512, 683), (364, 500), (300, 400), (480, 640), (700, 525), (230, 310), (256, 455),
              (600, 450), (420, 690), (333, 500), (640, 360), (384, 512)]
# (height, width) of the train-pipeline images: ADE20K train images are mostly ~512 short side.
TRAIN_SIZES = [(512, 683), (683, 512), (512, 768), (384, 512), (512, 512), (600, 800),
               (480, 640), (768, 1024)]


def keep_freed_memory() -> bool:
  """Opt this process in to segnext_jax's CPU malloc policy (segnext_jax/cpu_memory.py), as the
  commands do: call it first, before JAX runs anything. Returns whether it applies here."""
  from segnext_jax import cpu_memory
  return cpu_memory.keep_freed_memory()


# ---------------------------------------------------------------------------------------------
# Timing

def median_ms(fn, runs: int, warmup: int = 2) -> float:
  """Median wall ms of `runs` calls of fn after `warmup` untimed ones."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t) * 1e3)
  return statistics.median(times)


def interleaved_ms(fns, runs: int, warmup: int = 2) -> list[float]:
  """Median ms of each fn, timed alternately run by run so that all see the same machine load."""
  for _ in range(warmup):
    for fn in fns:
      fn()
  times = [[] for _ in fns]
  for _ in range(runs):
    for fn, ts in zip(fns, times):
      t = time.perf_counter()
      fn()
      ts.append((time.perf_counter() - t) * 1e3)
  return [statistics.median(ts) for ts in times]


def matmul_gflops(n: int = 2048, runs: int = 5) -> float:
  """The machine's jitted float32 matmul rate: the practical compute limit of this device."""
  import jax
  x = jax.random.normal(jax.random.key(0), (n, n), np.float32)
  f = jax.jit(lambda a: a @ a)
  ms = median_ms(lambda: jax.block_until_ready(f(x)), runs)
  return 2 * n ** 3 / (ms * 1e-3) / 1e9


def program_gflop(compiled) -> float:
  """FLOPs of a compiled program (XLA's cost analysis), in GFLOP."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) / 1e9


# ---------------------------------------------------------------------------------------------
# Synthetic data

def images(batch: int, size: int, seed: int = 0) -> np.ndarray:
  """A float32 (batch, size, size, 3) N(0, 1) batch: what an inference forward takes (normalised)."""
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NoiseScenes:
  """A SegDataset of uint8 noise images at TRAIN_SIZES and labels of uniformly drawn classes:
  the train loader's input without files (a step's cost does not depend on pixel values)."""
  length: int = 64
  seed: int = 0
  num_classes: int = NUM_CLASSES
  class_names: tuple[str, ...] = tuple(f"class{i}" for i in range(NUM_CLASSES))
  palette: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((NUM_CLASSES, 3), np.uint8))

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, i])
    h, w = TRAIN_SIZES[i % len(TRAIN_SIZES)]
    return (rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            rng.integers(0, self.num_classes, (h, w), dtype=np.uint8))


def train_batch(cfg, step: int = 0) -> dict[str, np.ndarray]:
  """Step `step`'s host batch as the trainer gets it from TrainLoader for `cfg` (a TrainConfig):
  the loader's own Batches over TrainPipeline(crop, resize_scale), so the keys and dtypes are
  the loader's (uint8 image and label padded to the crop, int32 valid size 'hw')."""
  from segnext_jax.data.loader import Batches
  from segnext_jax.data.transforms import TrainPipeline
  pipeline = TrainPipeline(crop=(cfg.crop_size, cfg.crop_size), scale=tuple(cfg.resize_scale))
  return Batches(NoiseScenes(seed=cfg.seed), pipeline, cfg.seed, cfg.batch_size, 0, 0,
                 cfg.batch_size)(step)


def _ade_pair(i: int) -> tuple[np.ndarray, np.ndarray]:
  """ADE_SAMPLE's i-th image (BGR, as cv2 reads it) and mask, cycling over the three."""
  import cv2
  from PIL import Image
  jpgs = sorted((ADE_SAMPLE / "images" / "validation").glob("*.jpg"))
  if not jpgs:
    raise SystemExit(f"{ADE_SAMPLE}: no ADE20K sample images under images/validation")
  jpg = jpgs[i % len(jpgs)]
  mask = np.asarray(Image.open(ADE_SAMPLE / "annotations" / "validation" / f"{jpg.stem}.png"))
  return cv2.imread(str(jpg), cv2.IMREAD_COLOR), mask


def write_ade_eval_tree(dst: Path, n: int) -> list[tuple[int, int]]:
  """n validation images + annotations in ADEChallengeData2016 layout at EVAL_SIZES: each sample
  at its own size, else a random crop of the target's aspect ratio resized to it (seeded).
  Returns their (height, width)."""
  import cv2
  for sub in ("images", "annotations"):
    (dst / sub / "validation").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    img, ann = _ade_pair(i)
    h, w = EVAL_SIZES[i % len(EVAL_SIZES)]
    if (h, w) != img.shape[:2]:
      ch = min(img.shape[0], int(img.shape[1] * h / w))
      cw = min(img.shape[1], int(ch * w / h))
      y, x = rng.integers(0, img.shape[0] - ch + 1), rng.integers(0, img.shape[1] - cw + 1)
      img = cv2.resize(img[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_LINEAR)
      ann = cv2.resize(ann[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_NEAREST)
    name = f"ADE_val_{i + 1:08d}"
    cv2.imwrite(str(dst / "images" / "validation" / f"{name}.jpg"), img)
    cv2.imwrite(str(dst / "annotations" / "validation" / f"{name}.png"), ann)
  return [EVAL_SIZES[i % len(EVAL_SIZES)] for i in range(n)]


def write_ade_train_tree(dst: Path, count: int = 24) -> Path:
  """An ADEChallengeData2016 tree of `count` training pairs (the first 4 also as validation) at
  TRAIN_SIZES: each a 2x2 mirror tiling of one sample, resized (bilinear image, nearest mask),
  so photos keep real texture and masks real class layouts."""
  import cv2
  from PIL import Image
  for split in ("training", "validation"):
    for kind in ("images", "annotations"):
      (dst / kind / split).mkdir(parents=True, exist_ok=True)
  tile = lambda a: np.concatenate([np.concatenate([a, a[:, ::-1]], 1)] * 2, 0)
  for i in range(count):
    img, mask = _ade_pair(i)
    h, w = TRAIN_SIZES[i % len(TRAIN_SIZES)]
    img = cv2.resize(tile(img), (w, h), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(np.ascontiguousarray(tile(mask)), (w, h), interpolation=cv2.INTER_NEAREST)
    for split in ("training", "validation") if i < 4 else ("training",):
      name = f"ADE_{split[:5]}_{i:08d}"
      cv2.imwrite(str(dst / "images" / split / f"{name}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
      Image.fromarray(mask).save(dst / "annotations" / split / f"{name}.png")
  return dst
