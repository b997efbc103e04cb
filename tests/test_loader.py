"""TrainLoader on grain worker processes: the batches of mmseg's own train pipeline (to the bit,
after the train step's normalisation), independent of the worker count and per-process shards,
worker faults as one-line DataErrors, no processes left behind, and a uint8 train step equal to
the float32 one."""
from __future__ import annotations

import contextlib
import functools
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import psutil
import pytest

from conftest import shm_left
from segnext_jax.data.datasets import DataError, make_dataset
from segnext_jax.data.loader import TrainLoader
from segnext_jax.data import IGNORE_INDEX as IGNORE
from segnext_jax.data.transforms import TrainPipeline, device_normalize
from segnext_jax.mmseg_reference import stub_mmcv_ops

REPO = Path(__file__).resolve().parents[1]
ADE = Path(__file__).parent / "data" / "ade20k_val3"
PIPE = TrainPipeline(crop=(64, 64), scale=(256, 64))  # ratio 0.5 gives images under the crop: padded
MMSEG_CONFIG = "segnext/segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512.py"
normalize_jit = jax.jit(device_normalize)


# ---------------------------------------------------------------------------------------------
# The oracle: mmseg 1.x's own train pipeline and SegDataPreProcessor, built from its SegNeXt
# ADE20K config (crop and scale set to PIPE's), run on the samples the loader reads. mmseg draws
# from numpy's global random functions; `draws_from(rng)` serves each such call from the
# Generator the loader gives the sample (one draw of the same distribution per call), so both
# pipelines see the same random numbers and must make the same decisions with them.

@contextlib.contextmanager
def draws_from(rng: np.random.Generator):
  """numpy.random's legacy functions, as mmcv/mmseg's transforms call them, drawing from `rng`."""
  def choice(options, p):  # legacy choice with p: the first option whose cumulative p exceeds u
    return options[int(np.searchsorted(np.cumsum(p), rng.random(), side="right"))]
  with mock.patch.multiple(np.random, random_sample=lambda: rng.random(),
                           randint=lambda low, high=None: rng.integers(low, high),
                           uniform=lambda low, high: rng.uniform(low, high), choice=choice):
    yield


@functools.cache
def mmseg_train_steps(crop: tuple[int, int], scale: tuple[int, int]) -> tuple[list, object]:
  """The config's train_pipeline after its two loading steps (RandomResize, RandomCrop,
  RandomFlip, PhotoMetricDistortion, PackSegInputs) and its SegDataPreProcessor (normalise,
  BGR to RGB, pad to the crop with 0 and 255), with `crop` and `scale`."""
  stub_mmcv_ops()
  import mmseg
  from mmengine.config import Config
  from mmseg.registry import MODELS, TRANSFORMS
  from mmseg.utils import register_all_modules
  register_all_modules()
  cfg = Config.fromfile(Path(mmseg.__file__).parent / ".mim/configs" / MMSEG_CONFIG)
  changes = {"RandomResize": {"scale": scale}, "RandomCrop": {"crop_size": crop}}
  steps = [TRANSFORMS.build({**t, **changes.get(t["type"], {})})
           for t in cfg.train_pipeline if not t["type"].startswith("Load")]
  return steps, MODELS.build({**cfg.model.data_preprocessor, "size": crop})


def mmseg_batch(ds, global_batch: int, seed: int, step: int, slots) -> dict:
  """mmseg's float32 batch of the given slots of `step`: the loader's sample order (consecutive
  slices of the permutation seeded by (seed, epoch)), each sample's draws from the Generator
  seeded by (seed, step, slot). Images enter mmseg as it loads them, BGR."""
  steps, preprocess = mmseg_train_steps(PIPE.crop, PIPE.scale)
  per_epoch = max(len(ds) // global_batch, 1)
  epoch, pos = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(len(ds))
  packed = []
  for slot in slots:
    img, label = ds[int(perm[(pos * global_batch + slot) % len(ds)])]
    results = {"img": np.ascontiguousarray(img[..., ::-1]), "gt_seg_map": label,
               "seg_fields": ["gt_seg_map"], "img_shape": img.shape[:2], "ori_shape": img.shape[:2]}
    with draws_from(np.random.default_rng([seed, step, slot])):
      for t in steps:
        results = t(results)
    packed.append(results)
  out = preprocess({"inputs": [p["inputs"] for p in packed],
                    "data_samples": [p["data_samples"] for p in packed]}, training=True)
  labels = [d.gt_sem_seg.data[0].numpy() for d in out["data_samples"]]
  return {"image": out["inputs"].permute(0, 2, 3, 1).numpy(),
          "label": np.stack(labels).astype(np.int32)}


def _take(loader: TrainLoader, n: int) -> list[tuple[int, dict]]:
  try:
    return [item for _, item in zip(range(n), loader)]
  finally:
    loader.close()


def _ade_train(root: Path, copies: int = 2) -> Path:
  """An ADE20K tree whose training split is the 3 real samples, `copies` times (6 pairs)."""
  for kind in ("images", "annotations"):
    for split in ("training", "validation"):
      (root / kind / split).mkdir(parents=True)
    for i in range(copies):
      for f in sorted((ADE / kind / "validation").iterdir()):
        shutil.copy(f, root / kind / "training" / f"{i}_{f.name}")
        shutil.copy(f, root / kind / "validation" / f"{i}_{f.name}")
  return root


def _children() -> list[psutil.Process]:
  """This process's descendants, less multiprocessing's resource tracker (one per process, for
  the life of the process: not a worker)."""
  return [p for p in psutil.Process().children(recursive=True)
          if "resource_tracker" not in " ".join(p.cmdline())]


# ---------------------------------------------------------------------------------------------

def test_batches_are_mmsegs_train_pipeline_to_the_bit():
  """Real ADE20K JPEGs, small crops with padding: records normalised as the train step does are
  the float32 batches of mmseg's train pipeline and preprocessor bit for bit, labels equal, for
  a fresh start and a resumed one, for the whole batch and for a process's shard."""
  ds = make_dataset(f"ade20k:{ADE}", "val")
  for seed, start, pi, pc in [(0, 0, 0, 1), (7, 5, 0, 1), (7, 5, 1, 2)]:
    local = 4 // pc
    slots = range(pi * local, (pi + 1) * local)
    got = _take(TrainLoader(ds, PIPE, 4, seed, start_step=start, workers=0, process_index=pi,
                            process_count=pc), 3)
    for k, (step, batch) in enumerate(got):
      assert step == start + k
      assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.uint8
      ref = mmseg_batch(ds, 4, seed, step, slots)
      image = np.asarray(normalize_jit(batch["image"], batch["hw"]))
      assert image.dtype == np.float32 and ref["image"].dtype == np.float32
      assert np.array_equal(image.view(np.uint32), ref["image"].view(np.uint32)), (seed, step)
      assert np.array_equal(batch["label"].astype(np.int32), ref["label"]), (seed, step)
  padded = (batch["hw"] < 64).any()
  assert padded or any((b["hw"] < 64).any() for _, b in got)  # the padding path was taken


def test_crop_retries_decide_as_mmsegs_random_crop():
  """random_crop's cat_max_ratio decisions (histogram counts, ignore left out) and its number of
  re-draws are mmseg RandomCrop's (np.unique counts, 10) from the same draws: the same crop, told
  apart by the image, which codes each pixel's position. Labels of a few large classes and ignore
  regions (re-draws happen, not always), and of one class with a small square of another (a crop
  that passes is rare: the re-draws often run out)."""
  from segnext_jax.data.transforms import random_crop
  stub_mmcv_ops()
  from mmseg.datasets.transforms import RandomCrop
  mmseg_crop = RandomCrop((40, 40), cat_max_ratio=0.75)
  rows, cols = np.mgrid[:96, :128]
  img = np.stack([rows, cols, rows ^ cols], -1).astype(np.uint8)
  draws = {"blocks": [], "square": []}  # per label: how many offsets random_crop drew
  for seed in range(60):
    g = np.random.default_rng(seed)
    blocks = g.choice([0, 1, 2, IGNORE], (6, 8), p=[.4, .1, .1, .4]).repeat(16, 0).repeat(16, 1)
    square = np.zeros((96, 128), np.uint8)
    side, y, x = g.integers(21, 31), g.integers(0, 66), g.integers(0, 98)
    square[y:y + side, x:x + side] = 1
    for kind, label in (("blocks", blocks.astype(np.uint8)), ("square", square)):
      a = np.random.default_rng([seed, 1])
      ours = random_crop(img, label, a, (40, 40))
      with draws_from(np.random.default_rng([seed, 1])):
        ref = mmseg_crop({"img": img, "gt_seg_map": label, "seg_fields": ["gt_seg_map"]})
      assert np.array_equal(ours[0], ref["img"]), (kind, seed)
      assert np.array_equal(ours[1], ref["gt_seg_map"]), (kind, seed)
      replay = np.random.default_rng([seed, 1])
      draws[kind].append(next(n for n in range(1, 12) if np.array_equal(
          [replay.integers(0, 57), replay.integers(0, 89)], ours[0][0, 0, :2])))
  assert 10 < sum(n > 1 for n in draws["blocks"]) < 60  # re-draws happened, and not always
  assert 10 < draws["square"].count(11) < 60  # 1 + 10 draws: the re-draws ran out


def test_worker_processes_give_the_in_process_batches_and_shards_partition():
  ds = make_dataset(f"ade20k:{ADE}", "val")
  whole = _take(TrainLoader(ds, PIPE, 4, 3, start_step=2, workers=0), 3)
  procs = _take(TrainLoader(ds, PIPE, 4, 3, start_step=2, workers=2, process_index=1,
                            process_count=2), 3)
  first = _take(TrainLoader(ds, PIPE, 4, 3, start_step=2, workers=0, process_index=0,
                            process_count=2), 3)
  for (s, w), (s1, p1), (s0, p0) in zip(whole, procs, first):
    assert s == s0 == s1
    for key in ("image", "label", "hw"):
      assert np.array_equal(np.concatenate([p0[key], p1[key]]), w[key]), (s, key)


def test_worker_batches_are_used_in_shared_memory_and_freed_with_them():
  """The trainer takes a worker's batch where grain put it (no copy) and its shared memory goes
  when the last reference does: nothing is left in /dev/shm after the batches and the loader."""
  import gc
  shm = lambda: {p.name for p in Path("/dev/shm").iterdir()}
  before = shm()
  ds = make_dataset(f"ade20k:{ADE}", "val")
  batches = _take(TrainLoader(ds, PIPE, 4, 3, workers=1), 3)
  assert all(type(b["image"]).__name__ == "SharedMemoryArray" for _, b in batches)
  assert len(shm() - before) >= 3  # at least each held batch's image
  reference = _take(TrainLoader(ds, PIPE, 4, 3, workers=0), 3)
  for (s, b), (r, ref) in zip(batches, reference):
    assert s == r and all(np.array_equal(b[k], ref[k]) for k in ref)
  del batches, b
  gc.collect()
  deadline = time.monotonic() + 10  # grain unlinks in a background thread
  while shm() - before and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not shm() - before


def test_close_returns_with_the_dropped_batches_unlinked(slow_shm_frees):
  """close() waits for grain's background unlinks of the batches already dropped (here 0.3 s
  each): a trainer that exits right after it leaves nothing for the resource tracker to warn
  about after the run's last line."""
  loader = TrainLoader(make_dataset(f"ade20k:{ADE}", "val"), PIPE, 4, 3, workers=1)
  it = iter(loader)
  for _ in range(3):
    step, batch = next(it)
  assert step == 2 and slow_shm_frees and shm_left(slow_shm_frees)  # the last batch is held
  deadline = time.monotonic() + 60
  while not loader._ahead.full() and time.monotonic() < deadline:  # and the next is collected
    time.sleep(0.05)
  assert loader._ahead.full()
  del batch
  loader.close()
  assert not shm_left(slow_shm_frees)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_image_mid_run_is_the_one_line_data_error(tmp_path, capfd, workers):
  """An image that breaks after the pre-training check (truncated): the batches before it come,
  then its batch raises the dataset's DataError naming the file, not a worker's traceback."""
  ds = make_dataset(f"ade20k:{_ade_train(tmp_path / 'ade')}", "train")
  bad = 4
  ds.images[bad].write_bytes(ds.images[bad].read_bytes()[:300])
  loader = TrainLoader(ds, PIPE, 2, seed=1, workers=workers)
  from segnext_jax.data.loader import batch_indices
  first_bad = next(s for s in range(100) if bad in batch_indices(len(ds), 2, s, 1))
  steps = []
  try:
    with pytest.raises(DataError) as e:
      for step, _ in loader:
        steps.append(step)
  finally:
    loader.close()
  assert steps == list(range(first_bad))
  msg = str(e.value)
  assert msg.startswith(str(ds.images[bad])) and "not a readable image" in msg and "\n" not in msg
  assert "Traceback" not in capfd.readouterr().err


def test_close_leaves_no_processes_and_workers_ignore_signals_and_follow_the_trainer(tmp_path):
  ds = make_dataset(f"ade20k:{ADE}", "val")
  before = {p.pid for p in _children()}
  loader = TrainLoader(ds, PIPE, 4, seed=0, workers=2)
  next(iter(loader))
  workers = [p for p in _children() if p.pid not in before]
  assert len(workers) == 2
  t = time.perf_counter()
  loader.close()
  assert time.perf_counter() - t < 15
  assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
  assert {p.pid for p in _children()} <= before

  # A trainer whose workers get SIGINT/SIGTERM (a terminal's Ctrl-C, a group kill) goes on; a
  # trainer that dies (SIGKILL: no close) leaves no workers running.
  script = textwrap.dedent(f"""
      import os, signal, sys, psutil
      sys.path.insert(0, {str(REPO)!r})
      from segnext_jax.data.datasets import make_dataset
      from segnext_jax.data.loader import TrainLoader
      from segnext_jax.data.transforms import TrainPipeline
      if __name__ == "__main__":
        loader = TrainLoader(make_dataset("ade20k:{ADE}", "val"), TrainPipeline(crop=(64, 64),
                             scale=(256, 64)), 4, seed=0, workers=1)
        it = iter(loader)
        next(it)
        pids = [p.pid for p in psutil.Process().children()
                if "resource_tracker" not in " ".join(p.cmdline())]
        print(*pids, flush=True)
        for pid in pids:
          os.kill(pid, signal.SIGINT)
          os.kill(pid, signal.SIGTERM)
        steps = [next(it)[0] for _ in range(3)]
        print("steps", *steps, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      """)
  out, err = tmp_path / "out", tmp_path / "err"
  with out.open("w") as o, err.open("w") as e:  # files, not pipes: surviving workers hold pipes
    code = subprocess.run([sys.executable, "-c", script], stdout=o, stderr=e, timeout=120).returncode
  lines, stderr = out.read_text().splitlines(), err.read_text()
  assert code == -signal.SIGKILL, stderr[-2000:]
  assert lines[1] == "steps 1 2 3" and "Traceback" not in stderr, stderr[-2000:]
  pids = [int(p) for p in lines[0].split()]
  assert len(pids) == 1
  deadline = time.time() + 10
  while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
            for p in pids) and time.time() < deadline:
    time.sleep(0.2)
  assert not [p for p in pids if psutil.pid_exists(p)
              and psutil.Process(p).status() != psutil.STATUS_ZOMBIE], "workers outlived the trainer"


@pytest.mark.slow  # two TINY train-step compiles
def test_uint8_train_step_is_the_float32_step_to_the_bit():
  """The same batch as uint8 records (normalised and padded in the step) and as mmseg's float32
  batch (host-normalised): loss, gradient norm, updated parameters and BN statistics
  equal bit for bit (TINY model, one padded sample in the batch)."""
  from conftest import TINY
  from segnext_jax.config import TrainConfig
  from segnext_jax.model import init_variables
  from segnext_jax.train_lib import (build_model, create_train_state, jit_train_step, make_mesh,
                                     shard_batch)
  ds = make_dataset(f"ade20k:{ADE}", "val")
  cfg = TrainConfig(model_overrides=TINY, batch_size=2, crop_size=64, warmup_steps=1, steps=10)
  step, u8 = _take(TrainLoader(ds, PIPE, 2, seed=0, start_step=2, workers=0), 1)[0]
  assert (u8["hw"] < 64).any()  # a padded sample: the padding is part of what is compared
  f32 = mmseg_batch(ds, 2, 0, step, range(2))
  model = build_model(cfg, ds.num_classes)
  mesh = make_mesh()
  variables = jax.device_get(init_variables(model, jax.random.key(0)))  # host: each state its own
  run = jit_train_step(cfg, mesh)
  outs = [run(create_train_state(cfg, model, variables), shard_batch(b, mesh), jax.random.key(1))
          for b in (u8, f32)]
  (s8, m8), (s32, m32) = jax.device_get(outs)
  for k in ("loss", "grad_norm"):
    assert np.array_equal(np.asarray(m8[k]), np.asarray(m32[k])), k
  for a, b in zip(jax.tree.leaves(s8.variables()), jax.tree.leaves(s32.variables())):
    assert np.array_equal(np.asarray(a), np.asarray(b))
