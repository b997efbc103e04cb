"""Host-side batching: deterministic per (seed, step), worker threads, prefetch, per-process shards.

Sample order and augmentation depend only on (seed, step), so a resumed run at step k sees exactly
the batches an uninterrupted run sees; no loader state needs checkpointing.
"""
from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
from typing import Callable, Iterator

import numpy as np

from segnext_jax.data.datasets import SegDataset

Batch = dict[str, np.ndarray]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Global sample indices of `step`: consecutive slices of a per-epoch seeded permutation."""
  per_epoch = max(n // batch_size, 1)
  epoch, pos = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[np.arange(pos * batch_size, (pos + 1) * batch_size) % n]


class TrainLoader:
  """Yields {'image': (b,H,W,3) f32, 'label': (b,H,W) i32} for steps start, start+1, ...

  b = global batch / process_count: each process builds only its own shard of every batch.
  """

  def __init__(self, dataset: SegDataset, transform: Callable, global_batch: int, seed: int,
               start_step: int = 0, workers: int = 4, prefetch: int = 2,
               process_index: int = 0, process_count: int = 1):
    if global_batch % process_count:
      raise ValueError(f"batch size {global_batch} is not divisible by {process_count} processes")
    self.dataset, self.transform, self.seed = dataset, transform, seed
    self.global_batch, self.step = global_batch, start_step
    local = global_batch // process_count
    self.local_slice = slice(process_index * local, (process_index + 1) * local)
    self.pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="segnext-data")
    self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._fill, daemon=True)
    self.thread.start()

  def _sample(self, step: int, slot: int, index: int):
    img, label = self.dataset[int(index)]
    return self.transform(img, label, np.random.default_rng([self.seed, step, slot]))

  def make_batch(self, step: int) -> Batch:
    idx = batch_indices(len(self.dataset), self.global_batch, step, self.seed)
    slots = range(self.global_batch)[self.local_slice]
    samples = list(self.pool.map(lambda s: self._sample(step, s, idx[s]), slots))
    return {"image": np.stack([s[0] for s in samples]),
            "label": np.stack([s[1] for s in samples]).astype(np.int32)}

  def _fill(self) -> None:
    step = self.step
    while not self.stop.is_set():
      try:
        item = (step, self.make_batch(step))
      except Exception as e:  # surfaced in the consumer thread
        item = (step, e)
      while not self.stop.is_set():
        try:
          self.queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      step += 1

  def __iter__(self) -> Iterator[tuple[int, Batch]]:
    while True:
      step, batch = self.queue.get()
      if isinstance(batch, Exception):
        raise batch
      yield step, batch

  def close(self) -> None:
    self.stop.set()
    self.thread.join(timeout=5)
    self.pool.shutdown(wait=False, cancel_futures=True)
