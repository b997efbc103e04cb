"""Host-side batching: grain worker processes, deterministic per (seed, step, slot), per-process shards.

The record of (step, slot) is `transform.record(*dataset[batch_indices(...)[slot]],
np.random.default_rng([seed, step, slot]))`, whoever computes it, so a resumed run at step k sees
exactly the batches an uninterrupted run sees, with any worker count; no loader state needs
checkpointing. Records are uint8 (image, label, valid size); the train step normalises them.

Why grain's dataset API (MapDataset -> to_iter_dataset -> mp_prefetch) and not grain.DataLoader:
element i is already named by its step (no sampler, no grain-drawn seed wanted), and mp_prefetch
hands element i to worker i % workers and reads them back round-robin, so the batches do not
depend on the worker count. An element is a process's whole batch of one step: a worker stacks
it, grain passes it through shared memory, and the training process uses it there (grain's
SharedMemoryArray, unlinked when the last reference goes): no per-image copy in the trainer.
Workers are processes (no GIL between cv2 calls), so `workers` of them scale with cores.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import queue
import signal
import threading
import time
from typing import Callable, Iterator

import numpy as np

from segnext_jax.data.datasets import SegDataset
from segnext_jax.errors import InputError

Batch = dict[str, np.ndarray]
ENDLESS = 2**62  # elements of a stream (it never ends: the trainer stops reading)
CLOSE_WAIT_S = 60  # close(): longest wait for the batch being collected (a stuck read: give up)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  perm.flags.writeable = False
  return perm


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Global sample indices of `step`: consecutive slices of a per-epoch seeded permutation."""
  per_epoch = max(n // batch_size, 1)
  epoch, pos = divmod(step, per_epoch)
  return _permutation(n, seed, epoch)[np.arange(pos * batch_size, (pos + 1) * batch_size) % n]


@dataclasses.dataclass(frozen=True)
class Batches:
  """Element i of one process's stream: its shard of the batch of step start + i (slots
  first .. first + local - 1 of the global batch). Picklable: what the worker processes get."""
  dataset: SegDataset
  transform: Callable
  seed: int
  global_batch: int
  start: int
  first: int
  local: int

  def record(self, step: int, slot: int) -> dict:
    """The record of (step, slot): sample batch_indices(...)[slot], rng [seed, step, slot]."""
    index = batch_indices(len(self.dataset), self.global_batch, step, self.seed)[slot]
    img, label = self.dataset[int(index)]
    return self.transform.record(img, label, np.random.default_rng([self.seed, step, slot]))

  def __call__(self, i: int) -> Batch:
    recs = [self.record(self.start + i, s) for s in range(self.first, self.first + self.local)]
    return {k: np.stack([r[k] for r in recs]) for k in recs[0]}


def _init_worker(parent: int, index: int, count: int) -> None:
  """In each worker process: signals are the trainer's to handle (it stops the workers when it
  has saved), one cv2 thread per worker process, and exit when the trainer is gone."""
  import cv2
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  cv2.setNumThreads(1)

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)
  threading.Thread(target=watch, daemon=True, name="segnext-parent-watch").start()


def _grain():
  """grain, usable outside absl.app: 0.2.18's mp_prefetch reads one absl flag directly (the
  others through its config, which falls back to defaults); mark that one as given, with its
  default value, as grain does for its own debug flags in each worker."""
  import grain
  from absl import flags
  flags.FLAGS["grain_enable_multiprocess_worker_profiling"].present = True
  return grain


class TrainLoader:
  """Yields (step, {'image': (b,H,W,3) uint8, 'label': (b,H,W) uint8, 'hw': (b,2) int32}) for
  steps start, start+1, ...; b = global batch / process_count: each process builds only its own
  shard of every batch. `workers` processes compute batches (0: a thread of this process);
  about `prefetch` batches are kept ready ahead of the trainer."""

  def __init__(self, dataset: SegDataset, transform: Callable, global_batch: int, seed: int,
               start_step: int = 0, workers: int = 4, prefetch: int = 2,
               process_index: int = 0, process_count: int = 1):
    grain = _grain()
    if global_batch % process_count:
      raise InputError(f"batch size {global_batch} is not divisible by {process_count} processes")
    if workers < 0:
      raise InputError(f"workers {workers}: must be 0 (in this process) or more")
    local = global_batch // process_count
    self.batches = Batches(dataset, transform, seed, global_batch, start_step,
                           process_index * local, local)
    self.step = start_step
    ds = grain.MapDataset.range(ENDLESS).map(self.batches).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if workers:
      ds = ds.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=workers,
                                       per_worker_buffer_size=-(-prefetch // workers)),
          worker_init_fn=functools.partial(_init_worker, os.getpid()))
    self._it = ds.__iter__()
    # one batch ahead in a thread: workers start now (overlapping the model's compile), and
    # collecting a batch from them overlaps the trainer's step
    self._ahead: queue.Queue = queue.Queue(maxsize=1)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, daemon=True, name="segnext-data")
    self._thread.start()

  def _fill(self) -> None:
    while not self._stop.is_set():
      try:
        item = dict(next(self._it))  # grain's shared-memory arrays: freed with their last use
      except BaseException as e:  # raised to the trainer from __iter__; after close: dropped
        item = e
      while not self._stop.is_set():
        try:
          self._ahead.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item, BaseException):
        return

  def __iter__(self) -> Iterator[tuple[int, Batch]]:
    while True:
      yield self._next()  # not held here: a batch is freed when its user drops it

  def _next(self) -> tuple[int, Batch]:
    if self._stop.is_set():
      raise RuntimeError("TrainLoader: iterating after close()")
    batch = self._ahead.get()
    if isinstance(batch, BaseException):
      raise batch
    step, self.step = self.step, self.step + 1
    return step, batch

  def close(self) -> None:
    """Stop and join the worker processes (idempotent; waits at most for the batch being
    collected: grain's iterators must not be closed under a next() in progress, it would never
    return). They are then dropped and collected while the interpreter is whole: left to its
    exit, their __del__ runs close again on half torn-down modules ('Exception ignored').
    Returns when the shared memory of every batch no longer referenced is unlinked: drop the
    batches first."""
    self._stop.set()
    it, self._it = self._it, None
    if it is None:
      return
    self._thread.join(timeout=CLOSE_WAIT_S)
    with contextlib.suppress(queue.Empty):
      self._ahead.get_nowait()  # the batch collected ahead: no one will take it now
    it.close()
    del it
    gc.collect()
    _wait_for_shm_frees()


def _wait_for_shm_frees() -> None:
  """Wait until grain's background thread has closed and unlinked every shared-memory batch
  already released. A process that exits with one in that queue, or half done, leaves it to
  the resource tracker, which warns about it on stderr after the run's last line."""
  from grain.multiprocessing import SharedMemoryArray
  pool = SharedMemoryArray._del_thread_pool  # pylint: disable=protected-access
  if pool is not None:
    pool.apply(int)  # grain's pool has one thread, first in first out: earlier frees are done
