"""Shared fixtures: the mmseg 1.x torch reference and random mmseg-layout checkpoints."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from pathlib import Path
from types import ModuleType

import pytest

# XLA:CPU for the suite: LLVM at -O0, and fusions by the elemental emitter rather than the MLIR
# fusion emitters; programs compile several times faster (a TINY gradient ~3x) and compute the
# same IEEE results (no fast-math either way). Set before any backend starts, inherited by
# subprocesses. SEGNEXT_TEST_XLA_OPT=default keeps XLA's own choices (docs/testing.md).
SUITE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
if os.environ.get("SEGNEXT_TEST_XLA_OPT", "0") != "default":
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *SUITE_XLA_FLAGS]))

from segnext_jax import cpu_memory  # noqa: E402

cpu_memory.keep_freed_memory()  # before any backend starts: in-process runs as the commands run

from segnext_jax.mmseg_reference import (TorchReference, mmseg_segmentor_modules,  # noqa: F401 (re-export)
                                 segmentor_state_dict)

FP32_ATOL = 1e-4  # on O(1) activations, float32, whole network

# Test files, heaviest first (docs/testing.md has the measured times). xdist's --dist loadfile
# hands files to its two workers in collection order as they free up, so running the long ones
# first lets both workers finish together; files not listed follow, in their usual order.
HEAVY_FIRST = ["test_spread.py", "test_faults.py", "test_topology.py", "test_eval_lib.py", "test_export.py",
               "test_best.py", "test_model.py", "test_train_lib.py", "test_precision.py",
               "test_eval_tta.py", "test_convert.py", "test_parity.py", "test_staged.py",
               "test_inference_cli.py", "test_cli.py", "test_loader.py", "test_padding.py",
               "test_finetune.py", "test_backend.py", "test_gradcheck.py", "test_loss.py",
               "test_pth_reader.py", "test_zoo.py",
               "test_data_pascal.py"]


def pytest_collection_modifyitems(config, items) -> None:
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's order kept


def command(name: str) -> ModuleType:
  """A command's module, segnext_jax.cli.NAME (train, eval, predict, export, from_torch, to_torch):
  what the top-level script and the segnext-* entry point run."""
  return importlib.import_module(f"segnext_jax.cli.{name}")


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax's, once per XLA program built


@contextlib.contextmanager
def xla_programs():
  """The names of the XLA programs built inside the block (compiled, or loaded from the disk
  cache; every jit and eager op, any thread)."""
  import jax
  names = []
  def listen(event, seconds, **kw):
    if event == COMPILE_EVENT:
      names.append(kw.get("fun_name"))
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(scope="session")
def t_variables():
  """Random SegNeXt-T variables of the right tree and shapes, drawn by numpy (compiling T's init
  costs ~20 s of XLA:CPU for values no test depends on)."""
  from export_helpers import random_variables
  from segnext_jax import segnext
  return random_variables(segnext("t"))


@pytest.fixture(scope="session")
def torch_ref_t(tmp_path_factory):
  return TorchReference("t", tmp_path_factory.mktemp("ref_t"))


# A tiny SegNeXt (flax _ResNet1 idea): fast to compile, same code paths as T. Passed as
# segnext("t", **TINY) / TrainConfig(model_overrides=TINY) / --model-overrides JSON.
TINY = dict(embed_dims=(8, 16, 32, 32), depths=(1, 1, 1, 1), head_channels=32)


# One recipe for the tests that train TINY: batch, crop and schedule are constants of the step
# program, so runs with the same --steps share one compiled step through the session's cache
# (test_cli and test_topology at 3 and 4 steps, test_train_lib at 4).
TINY_RUN = dict(model_overrides=TINY, batch_size=2, crop_size=64, resize_scale=(128, 64),
                warmup_steps=1, workers=0, log_every=1)
TINY_RUN_FLAGS = ["--model-overrides", json.dumps(TINY), "--batch-size=2", "--crop-size=64",
                  "--resize-scale", "128", "64", "--warmup-steps=1", "--workers=0", "--log-every=1"]


def tiny_train_model(precision: str = "fp32"):
  """TINY as the trainer builds it (6 classes, DropPath and dropout off: deterministic)."""
  from segnext_jax.config import make_config
  from segnext_jax.recipes import RECIPES
  from segnext_jax.train_lib import build_model
  cfg = make_config(RECIPES["synthetic"], dict(model_overrides=dict(TINY, drop_path=0.0, dropout=0.0),
                                               precision=precision, warmup_steps=0, batch_size=4))
  return cfg, build_model(cfg, 6)


def tiny_train_batch() -> dict:
  """Four 64 px synthetic scenes (a random batch would give near-zero, cancelling gradients),
  their top 5 rows ignored (255)."""
  import numpy as np
  from segnext_jax.data.datasets import Synthetic
  from segnext_jax.data.transforms import normalize
  ds = Synthetic(size=64)
  label = np.stack([ds[i][1] for i in range(4)]).astype(np.int32)
  label[:, :5] = 255
  return dict(image=np.stack([normalize(ds[i][0]) for i in range(4)]), label=label)


def train_loss_grads(model, variables: dict, batch: dict, key):
  """train_step's loss (rng streams derived from `key` as it derives them), its parameter
  gradients and the new BN statistics: one jitted program of its arguments, so tests on the same
  model and shapes (test_precision's fp32, test_backend's CPU policy) share it through the cache."""
  import jax
  from segnext_jax.loss import seg_cross_entropy

  def loss_fn(params, batch_stats, image, label, key):
    k_drop, k_nmf = jax.random.split(key)
    logits, new = model.apply({"params": params, "batch_stats": batch_stats}, image, train=True,
                              mutable=["batch_stats"], rngs={"dropout": k_drop, "nmf": k_nmf})
    return seg_cross_entropy(logits, label), new["batch_stats"]
  (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      variables["params"], variables["batch_stats"], batch["image"], batch["label"], key)
  return float(loss), grads, stats


@pytest.fixture(scope="session")
def tiny_variables():
  """Random variables of segnext("t", **TINY): every layer kind of T (same kernels, masks, NMF),
  logits of T's magnitude (O(0.5) at init), a fraction of its compile time."""
  import jax
  from segnext_jax import init_variables, segnext
  return init_variables(segnext("t", **TINY), jax.random.key(0))


@pytest.fixture
def slow_shm_frees(monkeypatch) -> set:
  """grain's background unlinks of worker batches take 0.3 s each (a loaded machine), and the
  returned set collects the shared-memory names this process opened: a run that exits before
  those unlinks are done leaves them to the resource tracker, which warns after its last line."""
  from grain.multiprocessing import SharedMemoryArray
  opened = set()
  free, open_ = SharedMemoryArray.close_shm_async.__func__, SharedMemoryArray.from_metadata.__func__

  def slow_free(cls, shm, unlink):
    time.sleep(0.3)
    free(cls, shm, unlink)

  def recorded_open(cls, metadata):
    opened.add(metadata.name.lstrip("/"))
    return open_(cls, metadata)
  monkeypatch.setattr(SharedMemoryArray, "close_shm_async", classmethod(slow_free))
  monkeypatch.setattr(SharedMemoryArray, "from_metadata", classmethod(recorded_open))
  return opened


def shm_left(names: set) -> set:
  """Those of `names` still in /dev/shm."""
  return {n for n in names if (Path("/dev/shm") / n).exists()}


CACHE_MAX_BYTES = 4 << 30  # a size limit turns on JAX's file lock: both xdist workers write here


def host_devices_env(devices: int) -> dict:
  """XLA_FLAGS for a subprocess on `devices` forced host devices, keeping the suite's flags."""
  return {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                       f"--xla_force_host_platform_device_count={devices}".strip()}


def cache_env(path: str | os.PathLike) -> dict:
  """The environment that gives a subprocess (train.py, eval.py, ...) the compile cache `path`."""
  return {"JAX_COMPILATION_CACHE_DIR": str(path), "JAX_COMPILATION_CACHE_MAX_SIZE": str(CACHE_MAX_BYTES)}


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> dict:
  """One persistent compile cache for the whole test run, shared by the xdist workers (their
  temporary roots share a parent) and by the subprocesses given the returned environment: a
  program compiled by one test (a TINY train step, an init) is loaded by the others. Inside the
  run's own temporary directory, so nothing outlives it."""
  import jax
  root = tmp_path_factory.getbasetemp()
  path = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "jax_cache"
  path.mkdir(exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return cache_env(path)


SPEED_REFERENCE = "mmseg T forward, 1x512x512, torch CPU"  # the machine's speed, in every run


def machine_speed_ms(repeats: int = 5) -> float:
  """Median ms of mmseg's own SegNeXt-T forward (eval mode, random weights) on one 512x512 image:
  a run's durations divided by it compare across fast and slow machines (docs/testing.md)."""
  import time
  import numpy as np
  import torch
  backbone, head = mmseg_segmentor_modules("t")
  backbone.eval(), head.eval()
  x = torch.zeros(1, 3, 512, 512)
  times = []
  with torch.no_grad():
    for _ in range(repeats + 1):
      t = time.perf_counter()
      head(backbone(x))
      times.append(time.perf_counter() - t)
  return 1000 * float(np.median(times[1:]))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
  """After the durations: this machine's speed, measured now (the xdist controller, workers done)."""
  if os.environ.get("PYTEST_XDIST_WORKER") or config.getoption("collectonly"):
    return
  try:
    ms = machine_speed_ms()
  except Exception as e:  # the reference is informative: it never fails a run
    terminalreporter.write_line(f"machine speed: not measured ({type(e).__name__}: {e})")
    return
  terminalreporter.write_line(f"machine speed: {SPEED_REFERENCE} {ms:.0f} ms (median of 5; "
                              "docs/testing.md relates test times to it)")


COMPILE_LOG = os.environ.get("SEGNEXT_TEST_COMPILE_LOG")  # a directory: where compile time goes


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """With SEGNEXT_TEST_COMPILE_LOG=DIR: one JSON line per test (its fixtures included) in
  DIR/<worker>.jsonl, listing the XLA programs this process built for it (name, seconds; a disk
  cache hit takes well under a second). Subprocesses' programs are not seen."""
  if not COMPILE_LOG:
    yield
    return
  import json
  import time
  start = time.perf_counter()
  with xla_programs_timed() as built:
    yield
  os.makedirs(COMPILE_LOG, exist_ok=True)
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  with open(os.path.join(COMPILE_LOG, f"{worker}.jsonl"), "a") as f:
    f.write(json.dumps(dict(test=item.nodeid, seconds=round(time.perf_counter() - start, 1),
                            programs=built)) + "\n")


@contextlib.contextmanager
def xla_programs_timed():
  """[name, seconds] of each XLA program of 0.1 s or more built inside the block."""
  import jax
  built = []
  def listen(event, seconds, **kw):
    if event == COMPILE_EVENT and seconds >= 0.1:  # eager ops' programs left out
      built.append([kw.get("fun_name"), round(seconds, 2)])
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield built
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
