"""train.py's run: settings, data and workdir checked, then the loop of steps and its actions.

The loop runs train steps; after each, `itstime` says which actions are due (log, validate,
checkpoint) and `_Run` performs them. A step's loss is checked to be finite before any action
publishes it; a stop (SIGTERM/SIGINT, or jax.distributed's preemption notice) ends the loop after
the step it is at, which is then saved.
"""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from segnext_jax import best_checkpoint, config, faults
from segnext_jax.config import TrainConfig, to_json
from segnext_jax.errors import InputError
from segnext_jax.metric_writer import MetricWriter
from segnext_jax.model import init_variables
from segnext_jax.run_checkpoint import RunCheckpoints, check_resumable, saved_steps, tree_nbytes
from segnext_jax.train_lib import (TrainState, build_model, create_train_state, jit_train_step,
                                   make_mesh, model_kwargs, shard_batch)

log = logging.getLogger("segnext_jax.train")


def itstime(step: int, every: int, last: int) -> bool:
  """Whether an action due every `every` steps, and at step `last`, is due after `step`."""
  return step % every == 0 or step == last


def prepare_data(cfg: TrainConfig):
  """(train, val) datasets, checked before anything is written: bad data fails here."""
  from segnext_jax.data.datasets import check, make_dataset
  train_ds, val_ds = make_dataset(cfg.data, "train"), make_dataset(cfg.data, "val")
  for ds in (train_ds, val_ds):
    check(ds)
  if train_ds.num_classes != val_ds.num_classes:
    raise InputError(f"{cfg.data}: train has {train_ds.num_classes} classes, val {val_ds.num_classes}")
  return train_ds, val_ds


def train_and_evaluate(cfg: TrainConfig, stop_after: int | None = None, progress: bool = True) -> dict:
  """Train per `cfg` in cfg.workdir, resuming from its latest complete checkpoint. `stop_after`
  ends the process-local run early at that step (a simulated preemption, for tests). Returns
  {'state', 'history'} (+ 'best' with --save-best; 'nothing_to_do': a sentence, when the run was
  already done).

  Settings, recipe and data are checked before anything is written; the workdir is locked for the
  run (faults.WorkdirLock); SIGTERM/SIGINT save the current step and raise faults.Stopped."""
  workdir = Path(cfg.workdir)
  lead = jax.process_index() == 0
  config.validate(cfg, jax.device_count(), jax.process_count())
  with contextlib.ExitStack() as stack:
    lock = faults.WorkdirLock(workdir)
    if lead:
      stack.callback(lock.release)
      if workdir.is_dir():
        _acquire(lock)  # a second run on this workdir stops here, before the data check
    check_resumable(workdir, cfg)
    train_ds, val_ds = prepare_data(cfg)
    config.validate_for_data(cfg, train_ds.num_classes, train_ds.class_names)
    if lead and lock.fd is None:
      _acquire(lock)
    try:
      return _train(cfg, workdir, lead, train_ds, val_ds, stop_after, progress)
    except OSError as e:
      if faults.is_disk_full(e):
        raise faults.DiskFull(f"{workdir}: disk full writing {e.filename or 'a file'} "
                              f"({faults.mb(faults.free_bytes(workdir))} free); saved steps are "
                              "intact; free space and re-run the same command to resume") from None
      raise


def _acquire(lock: faults.WorkdirLock) -> None:
  try:
    lock.acquire()
  except OSError as e:
    raise faults.Fault(f"--workdir {lock.workdir}: cannot write there ({e.strerror})") from None


def _train(cfg: TrainConfig, workdir: Path, lead: bool, train_ds, val_ds, stop_after: int | None,
           progress: bool) -> dict:
  steps = saved_steps(workdir, lead)
  model = build_model(cfg, train_ds.num_classes)
  mesh = make_mesh()
  state = initial_state(cfg, model, mesh, pretrained=not steps)
  ckpts = RunCheckpoints(workdir, cfg.keep_ckpts)
  if steps:
    state = ckpts.restore_latest(state, steps, mesh)
    ckpts.saved = int(state.step)
    log.warning("resumed from %s at step %d", ckpts.dir, int(state.step))
  start = int(state.step)
  if start >= cfg.steps:
    ckpts.mngr.close()
    return {"state": state, "history": {"loss": [], "eval": []}, "nothing_to_do": (
        f"{workdir} is already at step {start} (--steps {cfg.steps}): nothing to do; raise "
        "--steps to train further")}
  best = None
  if cfg.save_best:  # before config.json: another metric's best/ is refused with nothing written
    best = best_checkpoint.BestCheckpoint(workdir, cfg.save_best, cfg, resumed=bool(steps), lead=lead)
    if best.step is not None:
      log.info("best %s so far: %.2f at step %d (%s)", cfg.save_best, best.value, best.step, best.dir)
  if lead:
    (workdir / "config.json").write_text(to_json(cfg))
  log.info("%s on %s: SegNeXt-%s, steps %d-%d of batch %d at crop %d, %s; workdir %s", "resumed" if steps
           else "fresh run", cfg.data, cfg.variant.upper(), start + 1, cfg.steps, cfg.batch_size,
           cfg.crop_size, cfg.precision, workdir)
  log.debug("config: %s", to_json(cfg))
  ckpts.check_space(state, cfg.steps - start, cfg.ckpt_every,
                    best=0 if best is None else tree_nbytes(state.variables()))
  meta = dict(variant=cfg.variant, model=model_kwargs(cfg, train_ds.num_classes),
              class_names=list(train_ds.class_names),
              palette=np.asarray(train_ds.palette).astype(int).tolist(),
              config=json.loads(to_json(cfg)), nmf_bases=f"fixed, drawn at init from seed {cfg.seed}")
  end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  run = _Run(cfg, lead, state, mesh, ckpts, meta, best, val_ds, model, end, progress)
  return run.loop(train_ds)


def initial_state(cfg: TrainConfig, model, mesh: jax.sharding.Mesh, pretrained: bool = True
                  ) -> TrainState:
  """A fresh state on the mesh (replicated): seeded init, then --pretrained's weights on a
  fresh run (a resumed run takes every weight from its checkpoint)."""
  variables = init_variables(model, jax.random.key(cfg.seed))
  if cfg.pretrained and pretrained:
    from segnext_jax.pretrained import load_pretrained
    variables, report = load_pretrained(cfg.pretrained, variables, cfg.variant)
    log.warning("pretrained %s: %s", cfg.pretrained, report.summary())
  return jax.device_put(create_train_state(cfg, model, variables), NamedSharding(mesh, P()))


class _Finite:
  """Each step's finite flag, read a step late (the next step is already queued, so no per-step
  host sync); an action that publishes a step requires it first: nothing non-finite is logged
  as a result, validated or saved."""

  def __init__(self, cfg: TrainConfig, ckpts: RunCheckpoints):
    self.cfg, self.ckpts = cfg, ckpts
    self.last: tuple[int, dict] | None = None  # (step, metrics) of the newest step run
    self.checked = 0

  def step_done(self, step: int, metrics: dict) -> None:
    previous, self.last = self.last, (step, metrics)
    if previous is not None:
      self._check(*previous)

  def require(self) -> None:
    """NonFinite unless the newest step's loss and gradient norm are finite."""
    if self.last is not None:
      self._check(*self.last)

  def _check(self, step: int, metrics: dict) -> None:
    if step <= self.checked or bool(metrics["finite"]):
      self.checked = max(self.checked, step)
      return
    m, cfg, saved = jax.device_get(metrics), self.cfg, self.ckpts.saved
    hint = f"lower --lr (now {cfg.lr:g}) or lengthen --warmup-steps (now {cfg.warmup_steps})"
    if cfg.precision == "bf16":
      hint += ", or train in --precision fp32"
    last = f"the last checkpoint is step {saved}" if saved is not None else "no checkpoint was saved"
    raise faults.NonFinite(f"loss {float(m['loss']):.4g}, gradient norm {float(m['grad_norm']):.4g} "
                           f"at step {step}: training diverged; {hint}; {last} (nothing non-finite "
                           "is ever saved)")


class _Run:
  """One process's part of a run from its start step: the loop and its actions."""

  def __init__(self, cfg: TrainConfig, lead: bool, state: TrainState, mesh: jax.sharding.Mesh,
               ckpts: RunCheckpoints, meta: dict, best: best_checkpoint.BestCheckpoint | None,
               val_ds, model, end: int, progress: bool):
    from segnext_jax.eval import InferenceConfig, Segmenter
    import tqdm
    self.cfg, self.lead, self.state, self.mesh = cfg, lead, state, mesh
    self.ckpts, self.meta, self.best, self.val_ds, self.end = ckpts, meta, best, val_ds, end
    self.start = self.done = int(state.step)
    self.history: dict[str, Any] = {"loss": [], "eval": []}
    self.finite = _Finite(cfg, ckpts)
    self.stop = faults.GracefulStop(enabled=jax.process_count() == 1)
    self.writer = MetricWriter(Path(cfg.workdir), self.start, enabled=lead)
    self.step_fn = jit_train_step(cfg, mesh)
    self.base_key = jax.random.key(cfg.seed + 1)
    self.segmenter = Segmenter.for_model(model.clone(remat=False), InferenceConfig.from_train(
        cfg, batch_size=max(1, min(8, cfg.batch_size))))  # compiled once, for every validation
    # smoothing: the rate of the last ~20 updates, not of the last one (steps vary around logging)
    self.bar = tqdm.tqdm(total=cfg.steps, initial=self.start, disable=not progress or not lead,
                         unit="step", dynamic_ncols=True, smoothing=0.05)
    self.rate_since = (time.perf_counter(), self.start)

  def loop(self, train_ds) -> dict:
    from segnext_jax.data.loader import TrainLoader
    from segnext_jax.data.transforms import TrainPipeline
    cfg = self.cfg
    pipeline = TrainPipeline(crop=(cfg.crop_size, cfg.crop_size), scale=tuple(cfg.resize_scale))
    loader = TrainLoader(train_ds, pipeline, cfg.batch_size, cfg.seed, self.start, cfg.workers,
                         process_index=jax.process_index(), process_count=jax.process_count())
    log.info("compiling the train step (the first step waits for it)")
    try:
      with self.stop:
        for step, batch in loader:
          if step >= self.end or self.stop.requested:
            break
          self.state, metrics = self.step_fn(self.state, shard_batch(batch, self.mesh), self.base_key)
          self.done = done = step + 1
          self.finite.step_done(done, metrics)
          if itstime(done, cfg.log_every, self.end):
            self.log(done, metrics)
          self.bar.update(1)
          if self.stopping(done):
            break
          if itstime(done, cfg.eval_every, cfg.steps):
            self.validate(done)
          if itstime(done, cfg.ckpt_every, self.end):
            self.save()
        if self.stop.requested and self.finite.last is not None and self.ckpts.saved != self.done:
          self.save()  # the step it was at
    finally:
      batch = None  # its shared memory is unlinked before close() returns, not at the exit
      self.bar.close()
      loader.close()
      self.ckpts.close(self.lead)
      self.writer.close()
    if self.stop.requested:
      raise self.stopped()
    return self.result()

  def stopping(self, done: int) -> bool:
    """Whether the run stops after step `done`: a signal, or (multi-process) jax.distributed's
    preemption notice, on which every process saves this step."""
    if jax.process_count() > 1 and self.ckpts.mngr.reached_preemption(done):
      self.stop.signum = signal.SIGTERM
    return self.stop.requested

  def log(self, done: int, metrics: dict) -> None:
    """Loss, gradient norm, lr and images/s of step `done`: metrics.jsonl, TensorBoard, the bar."""
    self.finite.require()
    m = jax.device_get({k: v for k, v in metrics.items() if k != "finite"})
    t0, n0 = self.rate_since
    self.rate_since = (time.perf_counter(), done)
    ips = (done - n0) * self.cfg.batch_size / (self.rate_since[0] - t0)
    self.history["loss"].append((done, float(m["loss"])))
    self.writer.write(done, {**{k: float(v) for k, v in m.items()}, "images_per_s": ips})
    self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", img_s=f"{ips:.1f}")

  def validate(self, done: int) -> None:
    """mIoU, aAcc, mAcc and per-class IoU on the val split; WORKDIR/best when it is a new best."""
    from segnext_jax.eval import evaluate
    self.finite.require()
    res = evaluate(self.segmenter, self.state.variables(), self.val_ds, self.cfg.eval_images,
                   progress=False)
    if res["processes"] > 1:
      log.info("step %d: validation: this process (%d of %d) evaluated %d of %d images", done,
               jax.process_index(), res["processes"], res["images_here"], res["images"])
    self.history["eval"].append((done, res["mIoU"], res["aAcc"]))
    pct = {k: 100 * res[k] for k in ("aAcc", "mIoU", "mAcc")}
    iou = {n: (None if not np.isfinite(v) else 100 * float(v))
           for n, v in zip(self.meta["class_names"], res["IoU"])}
    scalars, extra, note = dict(pct), {"IoU": iou}, ""
    if self.best is not None:
      metric = self.cfg.save_best
      value = best_checkpoint.metric_value(metric, pct, iou)
      if self.best.beats(done, value):
        self.best.save(done, value, self.state.variables(), self.meta)
        note = f"  (new best {metric}: {self.best.dir})"
      if self.best.step is not None:
        scalars[f"best_{metric}"], extra["best_step"] = self.best.value, self.best.step
    self.writer.write(done, scalars, prefix="val", extra=extra)
    self.bar.write(f"step {done}: val mIoU {pct['mIoU']:.2f}  aAcc {pct['aAcc']:.2f}  "
                   f"mAcc {pct['mAcc']:.2f}  ({res['images']} images){note}")
    self.bar.unpause()  # the rate and time left count training steps, not validation

  def save(self) -> None:
    """The newest step as a run checkpoint (never a non-finite one)."""
    self.finite.require()
    self.ckpts.save(self.state, self.meta)

  def stopped(self) -> faults.Stopped:
    name, signum = self.stop.name, self.stop.signum
    if self.finite.last is None:
      saved = self.ckpts.saved
      return faults.Stopped(f"{name} before the first step: nothing trained" + (
          f"; the last checkpoint is step {saved}" if saved is not None else ""), signum)
    return faults.Stopped(f"{name} after step {self.done}: saved {self.ckpts.dir}/{self.done}; "
                          "re-run the same command to resume", signum)

  def result(self) -> dict:
    out = {"state": self.state, "history": self.history}
    if self.best is not None and self.best.step is not None:
      out["best"] = {"metric": self.cfg.save_best, "value": self.best.value, "step": self.best.step,
                     "dir": str(self.best.dir)}
    return out
