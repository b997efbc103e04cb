"""Inference spread over every device and process: which images a process takes, one lane per
local device, and the counts summed over processes.

Processes split a list of images by index (process p takes p, p + P, ...); within a process each
local device is a lane running its share of those images with its own copy of the variables and
its own compiled programs (the same programs as on one device, so every image gets the same
answer whatever the device count). Only the confusion matrix crosses processes, once, at the end.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from segnext_jax.eval.scores import Segmenter


def my_share(n: int) -> range:
  """The indices of n items this process takes: p, p + P, ... (each item taken by one process)."""
  return range(jax.process_index(), n, jax.process_count())


@dataclasses.dataclass
class Lane:
  """One device's part of the work: a Segmenter with its programs, the variables on the device."""
  device: Any
  segmenter: Segmenter
  variables: dict


def lanes(segmenter: Segmenter, variables: dict, devices: Sequence[Any] | None = None) -> list[Lane]:
  """A lane per device (default: every local device); one device keeps segmenter and variables
  as they are, unless they span processes (a run's state: this process's replica is used)."""
  devices = list(devices or jax.local_devices())
  if len(devices) == 1:
    spans = any(isinstance(x, jax.Array) and not x.is_fully_addressable
                for x in jax.tree.leaves(variables))
    return [Lane(devices[0], segmenter, on_device(variables, devices[0]) if spans else variables)]
  return [Lane(d, segmenter.replica(), on_device(variables, d)) for d in devices]


def on_device(tree: Any, device) -> Any:
  """The arrays of `tree` committed to `device` (a global array: from this process's replica)."""
  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    return jax.device_put(x, device)
  return jax.tree.map(put, tree)


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
  """int64 counts summed over every process (all of them call this, once); exact at any size:
  sent as their int32 halves, since JAX without x64 would cast int64 to int32."""
  if jax.process_count() == 1:
    return counts
  from jax.experimental import multihost_utils
  halves = np.ascontiguousarray(counts, np.int64).view(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves))  # (P, *halves.shape)
  return np.ascontiguousarray(gathered).view(np.int64).sum(0)


def predict(segmenter: Segmenter, variables: dict, images: Sequence[np.ndarray],
            devices: Sequence[Any] | None = None,
            what: Callable[[Segmenter, dict, np.ndarray], Any] | None = None
            ) -> Iterator[tuple[int, Any]]:
  """(index, what(segmenter, variables, image): default the (H, W) class map) of this process's
  share of `images`, in index order, over the local devices (`on_lanes`)."""
  what = what or (lambda seg, v, img: seg.classes(v, img))
  share = my_share(len(images))
  results = on_lanes(lanes(segmenter, variables, devices), [images[i] for i in share],
                     lambda lane, img: what(lane.segmenter, lane.variables, img))
  yield from zip(share, results)


def on_lanes(found: Sequence[Lane], items: Sequence[Any], fn: Callable[[Lane, Any], Any]
             ) -> Iterator[Any]:
  """fn(lane, item) of each item, in order; item n runs on lane n % lanes, each lane in a thread
  of its own (one item at a time per device)."""
  if len(found) == 1:
    yield from (fn(found[0], item) for item in items)
    return
  with contextlib.ExitStack() as stack:
    pools = [stack.enter_context(cf.ThreadPoolExecutor(1)) for _ in found]
    queued = [pools[n % len(found)].submit(fn, found[n % len(found)], item)
              for n, item in enumerate(items)]
    yield from (future.result() for future in queued)
