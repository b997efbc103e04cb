"""Evaluate a segmentor over a dataset: a Segmenter's classes for every image, mmseg's IoUMetric.

Single-view whole inference runs images of one program (canvas) together, in batches of
cfg.batch_size; decoding and resizing run in worker threads, ahead of the device, and each
loaded image starts its programs compiling (a CompiledForward) before its turn comes.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import tqdm

from segnext_jax.eval.metrics import confusion_matrix, metrics_from_confusion
from segnext_jax.eval.original import Merged, ViewMap
from segnext_jax.eval.scores import Segmenter


def evaluate(segmenter: Segmenter, variables: dict, dataset, max_images: int = 0,
             progress: bool = True, workers: int = 4) -> dict:
  """Whole-set metrics over `dataset` (its first max_images if > 0): aAcc, mIoU, mAcc, per-class
  IoU and Acc, the confusion matrix, images and seconds."""
  n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
  k = dataset.num_classes
  cm = np.zeros((k, k), np.int64)
  t0 = time.perf_counter()
  compiling = getattr(segmenter.forward, "compiling", None)
  with cf.ThreadPoolExecutor(workers) as pool, tqdm.tqdm(total=n, unit="img", desc="eval",
                                                        disable=not progress) as bar:
    steps = _batched if segmenter.cfg.batches_images else _per_image
    for pred, label in steps(segmenter, variables, dataset, range(n), pool, ahead=2 * workers):
      cm += confusion_matrix(pred, label, k)
      if compiling is not None:
        queued = compiling()
        bar.set_postfix_str(f"compiling {queued} shape(s)" if queued else "", refresh=False)
      bar.update(1)
  seconds = time.perf_counter() - t0
  return {**metrics_from_confusion(cm), "images": n, "seconds": seconds,
          "images_per_s": n / seconds, "confusion": cm}


def _per_image(seg: Segmenter, variables: dict, dataset, indices, pool, ahead: int):
  """(classes, label) per image, any mode (slide, TTA); each image's programs start compiling
  in the background as soon as it is loaded."""
  def load(i):
    img, label = dataset[i]
    seg.warm(variables, img.shape[:2])
    return img, label

  for img, label in _prefetch(pool, load, indices, ahead):
    yield seg.classes(variables, img), label


def _batched(seg: Segmenter, variables: dict, dataset, indices, pool, ahead: int):
  """(classes, label) per image, single-view whole inference run in batches of one program."""
  cfg = seg.cfg

  def load(i):
    img, label = dataset[i]
    (view,) = cfg.views(img.shape[:2])
    seg.warm(variables, img.shape[:2], batch=cfg.batch_size)
    return cfg.prepare(img, view), label

  groups: dict = {}
  for prepared, label in _prefetch(pool, load, indices, ahead + cfg.batch_size):
    group = groups.setdefault(prepared.canvas, [])
    group.append((prepared, label))
    if len(group) == cfg.batch_size:
      yield from _run_batch(seg, variables, groups.pop(prepared.canvas))
  for canvas in list(groups):
    yield from _run_batch(seg, variables, groups.pop(canvas))


def _run_batch(seg: Segmenter, variables: dict, items: list) -> Iterator:
  # A fixed batch (the leftover images of a canvas padded with fillers): one program per canvas.
  logits = seg.run(variables, [prepared for prepared, _ in items], batch=seg.cfg.batch_size)
  for i, (prepared, label) in enumerate(items):
    merged = Merged(prepared.ori)
    merged.add(logits, ViewMap.of(prepared, logits.shape[1:3], i), "argmax")
    yield merged.result(classes=True), label


def _prefetch(pool: cf.ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
  """pool.map with a bounded look-ahead, in order."""
  pending: collections.deque = collections.deque()
  for x in items:
    pending.append(pool.submit(fn, x))
    if len(pending) >= ahead:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()
