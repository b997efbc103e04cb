"""Evaluate a segmentor over a dataset: a Predictor's classes for every image, mmseg's IoUMetric.

Single-view whole inference batches images of one bucket shape (one program per bucket and
power-of-two batch); decoding and resizing run in worker threads, ahead of the device.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import tqdm

from segnext_jax import views as views_lib
from segnext_jax.inference import Predictor, to_original
from segnext_jax.metrics import confusion_matrix, metrics_from_confusion


def evaluate(predictor: Predictor, variables: dict, dataset, max_images: int = 0,
             progress: bool = True, workers: int = 4) -> dict:
  """Whole-set metrics over `dataset` (its first max_images if > 0): aAcc, mIoU, mAcc, per-class
  IoU and Acc, the confusion matrix, images and seconds."""
  n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
  k = dataset.num_classes
  cm = np.zeros((k, k), np.int64)
  t0 = time.perf_counter()
  with cf.ThreadPoolExecutor(workers) as pool, tqdm.tqdm(total=n, unit="img", desc="eval",
                                                        disable=not progress) as bar:
    steps = _batched if predictor.cfg.batches_images else _per_image
    for pred, label in steps(predictor, variables, dataset, range(n), pool, ahead=2 * workers):
      cm += confusion_matrix(pred, label, k)
      bar.update(1)
  seconds = time.perf_counter() - t0
  return {**metrics_from_confusion(cm), "images": n, "seconds": seconds,
          "images_per_s": n / seconds, "confusion": cm}


def _per_image(predictor: Predictor, variables: dict, dataset, indices, pool, ahead: int):
  """(classes, label) per image, any mode (slide, TTA); each image's programs start compiling
  in the background as soon as it is loaded."""
  def load(i):
    img, label = dataset[i]
    predictor.warm(variables, img.shape[:2])
    return img, label

  for img, label in _prefetch(pool, load, indices, ahead):
    yield predictor.classes(variables, img), label


def _batched(predictor: Predictor, variables: dict, dataset, indices, pool, ahead: int):
  """(classes, label) per image, single-view whole inference run in batches of equal shape."""
  cfg = predictor.cfg

  def load(i):
    img, label = dataset[i]
    (view,) = cfg.views(img.shape[:2])
    return (*views_lib.prepare(img, view, cfg.size_divisor), img.shape[:2], label)

  buckets: dict[tuple, list] = {}
  for item in _prefetch(pool, load, indices, ahead + cfg.batch_size):
    key = cfg.padded_shape(item[0].shape[:2])
    bucket = buckets.setdefault(key, [])
    bucket.append(item)
    if len(bucket) == cfg.batch_size:
      yield from _run_batch(predictor, variables, buckets.pop(key))
  for shape in list(buckets):
    yield from _run_batch(predictor, variables, buckets.pop(shape))


def _run_batch(predictor: Predictor, variables: dict, items: list) -> Iterator:
  # Pad the batch to a power of two: a bounded number of programs per shape (log2 batch + 1)
  # without running a full batch of padding for the few leftover images of a shape.
  batch = min(1 << (len(items) - 1).bit_length(), predictor.cfg.batch_size)
  logits = predictor.padded_logits(variables, [it[0] for it in items], batch)
  for i, (x, valid, ori, label) in enumerate(items):
    pred = to_original(logits, valid, ori, out="argmax", index=i, padded=x.shape[:2])
    yield np.asarray(pred)[:ori[0], :ori[1]], label


def _prefetch(pool: cf.ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
  """pool.map with a bounded look-ahead, in order."""
  pending: collections.deque = collections.deque()
  for x in items:
    pending.append(pool.submit(fn, x))
    if len(pending) >= ahead:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()
