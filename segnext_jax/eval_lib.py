"""Evaluation: mmseg IoUMetric (whole-set intersections/unions), and inference modes."""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from segnext_jax.data.transforms import normalize, rescale_size, resize_image
from segnext_jax.ham_head import random_bases
from segnext_jax.resize import IGNORE_INDEX as IGNORE, bilinear_taps, resize_bilinear


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE) -> np.ndarray:
  """(K, K) int64 counts [label, pred] over the non-ignored pixels."""
  valid = label != ignore_index
  idx = label[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
  return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray) -> dict:
  """mmseg IoUMetric: per-class IoU/Acc from set-wide sums; classes absent from both prediction
  and label are NaN and excluded from the means; aAcc over all non-ignored pixels."""
  cm = cm.astype(np.float64)
  inter = np.diag(cm)
  label_area, pred_area = cm.sum(1), cm.sum(0)
  union = label_area + pred_area - inter
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / union
    acc = inter / label_area
  return {"aAcc": float(inter.sum() / max(cm.sum(), 1)), "mIoU": float(np.nanmean(iou)),
          "mAcc": float(np.nanmean(acc)), "IoU": iou, "Acc": acc}


# ---------------------------------------------------------------------------------------------
# Test pipeline (mmseg 1.x ADE20K): keep-ratio resize to fit `scale`, normalize, pad to /32;
# logits -> bilinear to the padded size -> crop the padding -> bilinear to the original size.

def keep_ratio_resize(img: np.ndarray, scale: tuple[int, int], ratio: float = 1.0) -> np.ndarray:
  hw = rescale_size(img.shape[:2], (int(scale[0] * ratio), int(scale[1] * ratio)))
  return resize_image(img, hw)


def pad_to(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Zero-pad an (H, W, C) normalized image at the bottom/right (mmseg stack_batch)."""
  out = np.zeros((*hw, x.shape[2]), x.dtype)
  out[:x.shape[0], :x.shape[1]] = x
  return out


def padded_shape(hw: tuple[int, int], divisor: int = 32) -> tuple[int, int]:
  return (-(-hw[0] // divisor) * divisor, -(-hw[1] // divisor) * divisor)


def postprocess(logits: jax.Array, valid_hw: tuple[int, int], ori_hw: tuple[int, int],
                flip: bool = False, argmax: bool = False) -> np.ndarray:
  """Crop the padding, undo a horizontal flip, resize bilinearly (torch, align_corners=False) to
  the original size; on the device, returning (H, W, K) logits or, with argmax, (H, W) classes.

  Output sizes are padded to multiples of 128 with dummy indices, so the original sizes of a
  whole dataset share a handful of compiled programs."""
  rows = _axis_indices(ori_hw[0], valid_hw[0], flip=False)
  cols = _axis_indices(ori_hw[1], valid_hw[1], flip=flip)
  out = _gather_resize(jnp.asarray(logits), *rows, *cols, argmax=argmax)
  return np.asarray(out)[:ori_hw[0], :ori_hw[1]]


def resize_logits(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """torch F.interpolate(bilinear, align_corners=False) of (H, W, K) to hw."""
  return postprocess(x, x.shape[:2], hw)


def _axis_indices(n_out: int, n_in: int, flip: bool, bucket: int = 128):
  """torch's source indices/weights along one axis, padded to a multiple of `bucket`."""
  i0, i1, lam = bilinear_taps(n_out, n_in)
  if flip:  # the flipped crop's column c is the unflipped column n_in - 1 - c
    i0, i1 = n_in - 1 - i0, n_in - 1 - i1
  size = -(-n_out // bucket) * bucket
  pad = lambda a: np.pad(a, (0, size - n_out))
  return pad(i0), pad(i1), pad(lam)


@functools.partial(jax.jit, static_argnames="argmax")
def _gather_resize(x, i0h, i1h, lh, i0w, i1w, lw, *, argmax: bool):
  x = x[i0h] * (1 - lh)[:, None, None] + x[i1h] * lh[:, None, None]                # (Ho, W, K)
  x = x[:, i0w] * (1 - lw)[None, :, None] + x[:, i1w] * lw[None, :, None]          # (Ho, Wo, K)
  return jnp.argmax(x, axis=-1).astype(jnp.int32) if argmax else x


TTA_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
DEFAULT_CACHE = "~/.cache/segnext-jax/xla"


def add_inference_flags(parser) -> None:
  """Flags shared by eval.py and predict.py."""
  parser.add_argument("--tta", action="store_true", help="ratios 0.5-1.75 x flip, softmax averaged")
  parser.add_argument("--nmf-seed", type=int, default=0, help="NMF bases of image i: key(seed) + i")
  parser.add_argument("--scale", type=int, nargs=2, default=None, help="test resize (long short); "
                      "default 2048 512, or the training run's resize_scale")
  parser.add_argument("--compile-cache", default=DEFAULT_CACHE,
                      help="persistent XLA compilation cache ('' to disable)")


def load_for_inference(args):
  """(model, variables, the training run's config or {}, test scale) for parsed CLI args."""
  from segnext_jax.checkpoint import load_checkpoint, train_config
  enable_compile_cache(args.compile_cache)
  model, variables = load_checkpoint(args.checkpoint)
  run_cfg = train_config(args.checkpoint) or {}
  scale = tuple(args.scale or run_cfg.get("resize_scale", (2048, 512)))
  return model, variables, run_cfg, scale


def enable_compile_cache(path: str = DEFAULT_CACHE) -> None:
  """Persist compiled programs on disk: ADE20K's ~100 padded shapes compile once per machine,
  not once per evaluation."""
  if not path:
    return
  jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  scale: tuple[int, int] = (2048, 512)
  mode: str = "whole"                 # whole | slide
  crop: tuple[int, int] = (1024, 1024)  # slide window
  stride: tuple[int, int] = (768, 768)
  tta: bool = False                   # ratios 0.5-1.75 x flip, softmax averaged
  nmf_seed: int = 0                   # NMF initial bases of image i: key(nmf_seed) folded with i
  batch_size: int = 4                 # images of equal padded shape run together (whole mode)
  size_divisor: int = 32


class Predictor:
  """Seg logits at the original image size for one image, mmseg 1.x test semantics.

  NMF bases are drawn per image from fold_in(key(nmf_seed), index), so results do not depend on
  batching, order or run: two evaluations with the same seed are identical."""

  def __init__(self, model, variables: dict, cfg: EvalConfig):
    self.model, self.cfg, self.variables = model, cfg, variables  # variables may be replaced
    self.base_key = jax.random.key(cfg.nmf_seed)

    def logits_fn(variables, images, bases):  # variables are an argument, not baked constants
      logits = model.apply(variables, images, train=False, nmf_bases=bases)
      return resize_bilinear(logits, images.shape[1:3])
    self.logits_fn = jax.jit(logits_fn)

  def bases(self, indices) -> jax.Array:
    keys = jnp.stack([jax.random.fold_in(self.base_key, int(i)) for i in indices])
    c, r = self.model.head_channels, self.model.nmf_rank
    return jax.vmap(lambda k: random_bases(k, 1, c, r)[0])(keys)

  def run(self, images: np.ndarray, indices) -> jax.Array:
    """(B,H,W,3) normalized, padded -> (B,H,W,K) logits at the input size (on the device)."""
    return self.logits_fn(self.variables, jnp.asarray(images), self.bases(indices))

  def prepare(self, img: np.ndarray, ratio: float = 1.0,
              flip: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 RGB -> (normalized, [flipped,] padded to /divisor at bottom-right, resized (h, w))."""
    x = normalize(keep_ratio_resize(img, self.cfg.scale, ratio))
    x = x[:, ::-1] if flip else x
    return pad_to(x, padded_shape(x.shape[:2], self.cfg.size_divisor)), x.shape[:2]

  def slide(self, x: np.ndarray, index: int) -> np.ndarray:
    """mmseg slide_inference on one padded image: window logits averaged by overlap count."""
    (ch, cw), (sh, sw) = self.cfg.crop, self.cfg.stride
    h, w = x.shape[:2]
    preds = np.zeros((h, w, self.model.num_classes), np.float32)
    count = np.zeros((h, w, 1), np.float32)
    for gy in range(max(h - ch + sh - 1, 0) // sh + 1):
      for gx in range(max(w - cw + sw - 1, 0) // sw + 1):
        y2, x2 = min(gy * sh + ch, h), min(gx * sw + cw, w)
        y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
        preds[y1:y2, x1:x2] += np.asarray(self.run(x[None, y1:y2, x1:x2], [index])[0])
        count[y1:y2, x1:x2] += 1
    return preds / count

  def predict(self, img: np.ndarray, index: int) -> np.ndarray:
    """Logits (whole/slide) or averaged softmax (TTA), (H, W, K) at img's size."""
    ratios, flips = (TTA_RATIOS, (False, True)) if self.cfg.tta else ((1.0,), (False,))
    total = None
    for ratio in ratios:
      prepared = [self.prepare(img, ratio, f) for f in flips]
      batch, valid = np.stack([p[0] for p in prepared]), prepared[0][1]
      if self.cfg.mode == "slide":
        out = np.stack([self.slide(b, index) for b in batch])
      else:
        out = self.run(batch, [index] * len(flips))
      for o, f in zip(out, flips):
        o = postprocess(o, valid, img.shape[:2], flip=f)
        o = softmax(o) if self.cfg.tta else o
        total = o if total is None else total + o
    return total / (len(ratios) * len(flips))


def softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def evaluate(predictor: Predictor, dataset, max_images: int = 0, workers: int = 4,
             progress: bool = True) -> dict:
  """Whole-set metrics over `dataset` (first max_images if > 0), mmseg IoUMetric semantics.

  Whole mode without TTA batches images of equal padded shape (bounded compiles: one program per
  padded shape); host decoding and resizing run in worker threads, ahead of the device."""
  n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
  k = predictor.model.num_classes
  cm = np.zeros((k, k), np.int64)
  t0 = time.perf_counter()
  batched = predictor.cfg.mode == "whole" and not predictor.cfg.tta
  with cf.ThreadPoolExecutor(workers) as pool, tqdm.tqdm(total=n, unit="img", disable=not progress,
                                                        desc="eval") as bar:
    def load(i):
      img, label = dataset[i]
      return (i, img, label, *predictor.prepare(img)) if batched else (i, img, label)

    buckets: dict[tuple, list] = {}
    def flush(shape):
      items = buckets.pop(shape)
      # Pad the batch to a power of two: a bounded number of programs per shape (log2 batch + 1)
      # without running a full batch of padding for the few leftover images of a shape.
      pad = min(1 << (len(items) - 1).bit_length(), predictor.cfg.batch_size) - len(items)
      images = np.stack([it[3] for it in items] + [np.zeros_like(items[0][3])] * pad)
      logits = predictor.run(images, [it[0] for it in items] + [0] * pad)
      for it, lg in zip(items, logits):
        pred = postprocess(lg, it[4], it[1].shape[:2], argmax=True)
        cm[:] += confusion_matrix(pred, it[2], k)
      bar.update(len(items))

    for item in _prefetch(pool, load, range(n), ahead=2 * workers + predictor.cfg.batch_size):
      if not batched:
        i, img, label = item
        cm += confusion_matrix(predictor.predict(img, i).argmax(-1), label, k)
        bar.update(1)
        continue
      shape = item[3].shape
      buckets.setdefault(shape, []).append(item)
      if len(buckets[shape]) == predictor.cfg.batch_size:
        flush(shape)
    for shape in list(buckets):
      flush(shape)
  seconds = time.perf_counter() - t0
  return {**metrics_from_confusion(cm), "images": n, "seconds": seconds, "images_per_s": n / seconds,
          "confusion": cm}


def _prefetch(pool: cf.ThreadPoolExecutor, fn, items, ahead: int):
  """pool.map with a bounded look-ahead, in order."""
  pending = collections.deque()
  for x in items:
    pending.append(pool.submit(fn, x))
    if len(pending) >= ahead:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()
