"""Evaluate a segmentor over a dataset: a Segmenter's classes for every image, mmseg's IoUMetric,
on every device and process (eval/spread.py).

Single-view whole inference runs images of one program (canvas) together, in batches of
cfg.batch_size; decoding and resizing run in worker threads, ahead of the device, and each
loaded image starts its programs compiling (a CompiledForward) before its turn comes.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
import time
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
import tqdm

from segnext_jax.eval import spread
from segnext_jax.eval.metrics import confusion_matrix, metrics_from_confusion
from segnext_jax.eval.original import Merged, ViewMap
from segnext_jax.eval.scores import Segmenter


def evaluate(segmenter: Segmenter, variables: dict, dataset, max_images: int = 0,
             progress: bool = True, workers: int = 4, devices: Sequence | None = None) -> dict:
  """Whole-set metrics over `dataset` (its first max_images if > 0): aAcc, mIoU, mAcc, per-class
  IoU and Acc, the confusion matrix, images, devices, processes and seconds. Every process takes
  its share of the images and every local device (or `devices`) a part of that (eval/spread.py);
  in a multi-process run every process calls this and gets the whole set's metrics."""
  n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
  k = dataset.num_classes
  share, procs = spread.my_share(n), jax.process_count()
  lanes = spread.lanes(segmenter, variables, devices)
  lock = threading.Lock()
  t0 = time.perf_counter()
  with cf.ThreadPoolExecutor(workers) as pool, tqdm.tqdm(
      total=n, unit="img", desc="eval", disable=not progress or jax.process_index() != 0) as bar:

    def run(j: int) -> np.ndarray:
      lane, cm = lanes[j], np.zeros((k, k), np.int64)
      steps = _batched if lane.segmenter.cfg.batches_images else _per_image
      compiling = getattr(lane.segmenter.forward, "compiling", None)
      for pred, label in steps(lane.segmenter, lane.variables, dataset, share[j::len(lanes)], pool,
                               ahead=2 * workers):
        cm += confusion_matrix(pred, label, k)
        with lock:
          if compiling is not None:
            queued = compiling()
            bar.set_postfix_str(f"compiling {queued} shape(s)" if queued else "", refresh=False)
          bar.update(min(procs, bar.total - bar.n))  # the other processes run alongside
      return cm

    if len(lanes) == 1:
      counts = run(0)
    else:
      with cf.ThreadPoolExecutor(len(lanes), thread_name_prefix="segnext-lane") as lane_pool:
        counts = sum(lane_pool.map(run, range(len(lanes))))
  cm = spread.sum_over_processes(counts)
  seconds = time.perf_counter() - t0
  return {**metrics_from_confusion(cm), "images": n, "images_here": len(share),
          "devices": len(lanes) * procs, "processes": procs, "seconds": seconds,
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
