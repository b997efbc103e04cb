"""Training: the train state, the sharded train step, run checkpoints and the training loop."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from segnext_jax import backend, best_checkpoint, checkpoint, faults
from segnext_jax.config import RUNTIME_FIELDS, TrainConfig, recipe_diff, to_json
from segnext_jax.data.transforms import device_normalize
from segnext_jax.metric_writer import MetricWriter
from segnext_jax.loss import seg_cross_entropy
from segnext_jax.model import SegNeXt, init_variables, segnext
from segnext_jax.optim import lr_schedule, make_optimizer

log = logging.getLogger("segnext_jax.train")


# ---------------------------------------------------------------------------------------------
# State and step

class TrainState(train_state.TrainState):
  batch_stats: Any = None
  nmf_bases: Any = None  # the fixed inference bases, carried into every checkpoint

  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats, "nmf_bases": self.nmf_bases}


# A run's static parts (the model, the optimizer, the jitted step) belong to the process, keyed
# by the recipe: a second run of it here (a notebook, a resume after a signal, the tests) hands
# jax the same objects, so its in-memory caches hit and nothing is traced, lowered or loaded again.
_SHARED: dict[tuple, Any] = {}
SHARED_MAX = 16  # recipes kept; the oldest goes first


def _shared(kind: str, cfg: TrainConfig, *key: Any, make) -> Any:
  """The process's `kind` part for cfg's recipe (and `key`), made by make() the first time."""
  saved = json.loads(to_json(cfg))
  recipe = json.dumps({k: v for k, v in saved.items() if k == "steps" or k not in RUNTIME_FIELDS},
                      sort_keys=True)
  full = (kind, recipe, *key)
  if full not in _SHARED:
    while len(_SHARED) >= SHARED_MAX:
      _SHARED.pop(next(iter(_SHARED)))
    _SHARED[full] = make()
  return _SHARED[full]


def build_model(cfg: TrainConfig, num_classes: int) -> SegNeXt:
  return _shared("model", cfg, num_classes, make=lambda: segnext(
      cfg.variant, **model_kwargs(cfg, num_classes), remat=cfg.remat, nmf_grad=cfg.nmf_grad,
      dtype=jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32))


def model_kwargs(cfg: TrainConfig, num_classes: int) -> dict:
  """What a checkpoint's metadata needs to rebuild the model (beyond the variant)."""
  return {**cfg.model_overrides, "num_classes": num_classes, "nmf_rank": cfg.nmf_rank}


def create_train_state(cfg: TrainConfig, model: SegNeXt, variables: dict) -> TrainState:
  """A fresh state; its step is a plain int32 (not flax's weakly typed 0), as a restored one is,
  so a fresh run and its resumption compile the same step program (one compile-cache entry)."""
  tx = _shared("optimizer", cfg, jax.tree.structure(variables["params"]),
               make=lambda: make_optimizer(cfg, variables["params"]))
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables["batch_stats"], nmf_bases=variables["nmf_bases"])
  return state.replace(step=jnp.zeros((), jnp.int32))


def train_step(state: TrainState, batch: dict, base_key: jax.Array, *,
               schedule: optax.Schedule, class_weight: tuple[float, ...] | None = None,
               avg_non_ignore: bool = False) -> tuple[TrainState, dict]:
  """Forward (BN batch stats over the global batch), mmseg CE, backward, AdamW update.

  Randomness (DropPath/Dropout2d, NMF bases) is derived from (base_key, step), never stored.
  A uint8 batch (TrainLoader's: image, label, valid size 'hw') is normalised and padded here,
  to the bit as the host would; a float32 one is taken as it is.
  """
  key = jax.random.fold_in(base_key, state.step)
  k_drop, k_nmf = jax.random.split(key)
  image, label = batch["image"], batch["label"].astype(jnp.int32)
  if image.dtype == jnp.uint8:
    image = device_normalize(image, batch["hw"])

  def loss_fn(params):
    logits, new = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, image,
                                 train=True, mutable=["batch_stats"],
                                 rngs={"dropout": k_drop, "nmf": k_nmf})
    return seg_cross_entropy(logits, label, class_weight, avg_non_ignore), new["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  lr = schedule(state.step)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  grad_norm = optax.global_norm(grads)
  # one scalar the loop reads a step late (no per-step host sync): see check_finite
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  return state, {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite}


def make_mesh() -> jax.sharding.Mesh:
  """1-D data-parallel mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def jit_train_step(cfg: TrainConfig, mesh: jax.sharding.Mesh):
  """train_step jitted over the mesh: batch sharded on 'data', state replicated, state donated."""
  def make():
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = functools.partial(train_step, schedule=lr_schedule(cfg), class_weight=cfg.class_weight
                             or None, avg_non_ignore=cfg.avg_non_ignore)
    return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                   donate_argnums=0)
  return _shared("step", cfg, mesh, backend.policy(), make=make)  # the policy shapes the trace


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """This process's part of the global batch -> global arrays sharded along 'data'."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints of a run (layout: segnext_jax/checkpoint.py)

RUN_ITEMS = ("model", "opt", "meta")  # what a complete step of a train.py workdir holds


def save_state(mngr, state: TrainState, meta: dict) -> None:
  checkpoint.save(mngr, int(state.step), state.variables(), meta,
                  opt={"opt_state": state.opt_state, "step": state.step})


def model_bytes(state: TrainState) -> int:
  """Bytes of a model-only checkpoint (variables; + orbax's metadata): WORKDIR/best's steps."""
  return sum(x.nbytes for x in jax.tree.leaves(state.variables())) + 2**20


def state_bytes(state: TrainState) -> int:
  """Bytes of what a checkpoint stores (variables, optimizer state)."""
  return sum(x.nbytes for x in jax.tree.leaves((state.variables(), state.opt_state)))


def save_checked(mngr, state: TrainState, meta: dict, step: int, needed: int) -> None:
  """Save `step` as write_checked does (DiskFull naming the saved steps that are intact)."""
  ckpt_dir = Path(mngr.directory)
  saved = checkpoint.complete_steps(ckpt_dir.parent, RUN_ITEMS)
  intact = f"saved steps {', '.join(map(str, saved))} are intact" if saved else "no step saved yet"

  def settle():
    with contextlib.suppress(Exception), faults.quiet_logs("absl", "asyncio"):
      mngr.wait_until_finished()  # orbax's writer threads, before removing what they wrote
  write_checked(ckpt_dir, f"the checkpoint of step {step}", needed, intact,
                lambda: save_state(mngr, state, meta), settle)


def write_checked(ckpt_dir: Path, what: str, needed: int, intact: str, write: Callable[[], None],
                  settle: Callable[[], None] = lambda: None) -> None:
  """write() into ckpt_dir if the disk has room for `needed` bytes (DiskFull before writing
  anything otherwise); a write that still fails for space is DiskFull too: settle() (writer
  threads), then its unfinished entries are removed. The one line names `what` and `intact`."""
  full = lambda free: faults.DiskFull(
      f"{ckpt_dir}: no space for {what} (needs ~{faults.mb(needed)}, {faults.mb(free)} free); "
      f"{intact}; free space and re-run the same command to resume")
  free = faults.free_bytes(ckpt_dir)
  if free < needed:
    raise full(free)
  try:
    with faults.quiet_logs("absl", "asyncio"):
      write()
  except Exception as e:
    if not faults.is_disk_full(e):
      raise
    settle()
    remove_unfinished(ckpt_dir)
    raise full(faults.free_bytes(ckpt_dir)) from None


def remove_unfinished(ckpt_dir: Path) -> None:
  """Remove the entries of saves that did not finish (the caller holds the workdir lock)."""
  for tmp in ckpt_dir.glob(f"*{checkpoint.TMP_MARK}*"):
    shutil.rmtree(tmp, ignore_errors=True)


def check_space(workdir: Path, needed: int, saves: int, best: int = 0) -> None:
  """Before the first step: refuse when not even one checkpoint fits, warn when the `saves`
  checkpoints the run will keep (and its best checkpoint, `best` bytes) do not."""
  free = faults.free_bytes(workdir)
  if free < needed:
    raise faults.DiskFull(f"{workdir}: {faults.mb(free)} free, but one checkpoint needs "
                          f"~{faults.mb(needed)}; free space or use another --workdir")
  total = needed * saves + best
  if free < total:
    log.warning("%s: %s free; the %d checkpoints this run keeps%s need ~%s (each ~%s)", workdir,
                faults.mb(free), saves, " and its best" if best else "", faults.mb(total),
                faults.mb(needed))


def restore_latest(mngr, state: TrainState, steps: list[int], mesh: jax.sharding.Mesh) -> TrainState:
  """The newest step that restores. A newer one that does not is renamed <step>.unreadable with
  a warning naming it, but only once an older step restored: that proves the model and the
  reader fit, so the newer step is damaged (a model that no longer fits any step stops with
  the newest step's error, setting nothing aside). In a multi-process run: stop, never rename."""
  bad: list[tuple[int, str]] = []
  for step in reversed(steps):
    try:
      restored = restore_state(mngr, state, step, mesh)
    except Exception as e:  # orbax/tensorstore raise many kinds on damaged files
      bad.append((step, (str(e).strip().splitlines() or [type(e).__name__])[0][:160]))
      if jax.process_count() > 1:
        break
      continue
    ckpt_dir = Path(mngr.directory)
    for s, why in bad:
      kept = checkpoint.set_aside(ckpt_dir.parent, s)
      log.warning("%s/%d cannot be read (%s); resuming from step %d instead; the damaged step is "
                  "kept as %s", ckpt_dir, s, why, step, kept.name)
    if bad:
      mngr.reload()
    return restored
  step, why = bad[0]
  raise checkpoint.CheckpointError(
      f"{mngr.directory}/{step}: cannot be read ({why})" + (
          "; no older step could be read either" if len(bad) > 1 else "") +
      "; move the damaged step aside (or use a new --workdir) to go on")


def restore_state(mngr, state: TrainState, step: int, mesh: jax.sharding.Mesh) -> TrainState:
  """Restore onto THIS run's mesh (replicated), whatever device count wrote the checkpoint."""
  repl = NamedSharding(mesh, P())
  target = lambda t: checkpoint.on_devices(jax.eval_shape(lambda: t), repl)
  got = checkpoint.restore(mngr, step, model=target(state.variables()),
                           opt=target({"opt_state": state.opt_state, "step": state.step}))
  m, o = got["model"], got["opt"]
  return state.replace(params=m["params"], batch_stats=m["batch_stats"], nmf_bases=m["nmf_bases"],
                       opt_state=o["opt_state"], step=o["step"])


class RecipeMismatch(ValueError):
  """Resuming a workdir with another recipe than the one it was trained with."""


def check_resumable(workdir: Path, cfg: TrainConfig) -> None:
  """A workdir with a complete checkpoint resumes only with the recipe it was started with
  (one without: nothing was trained, any recipe may start there)."""
  saved = workdir / "config.json"
  if not saved.is_file() or not checkpoint.complete_steps(workdir, RUN_ITEMS):
    return
  diff = recipe_diff(json.loads(saved.read_text()), cfg)
  if diff:
    raise RecipeMismatch(f"{workdir} was trained with another recipe ({'; '.join(diff)}); use a new "
                         "--workdir, or --config " + str(saved) + " to resume it")


def validate_config(cfg: TrainConfig, devices: int, processes: int) -> None:
  """Refuse settings that cannot run (ValueError naming the flag), before anything is written;
  warn about ones that run but are probably not meant."""
  backend.policy()  # a bad SEGNEXT_JAX_POLICY: its one-line error before the workdir is touched
  flag = lambda name: "--" + name.replace("_", "-")
  for name in ("steps", "batch_size", "crop_size", "ckpt_every", "log_every", "eval_every",
               "keep_ckpts", "nmf_rank"):
    if getattr(cfg, name) < 1:
      raise ValueError(f"{flag(name)} {getattr(cfg, name)}: must be at least 1")
  for name in ("warmup_steps", "eval_images", "workers"):
    if getattr(cfg, name) < 0:
      raise ValueError(f"{flag(name)} {getattr(cfg, name)}: must not be negative")
  if not (np.isfinite(cfg.lr) and cfg.lr > 0):
    raise ValueError(f"--lr {cfg.lr}: must be a positive number")
  if cfg.batch_size % devices:
    raise ValueError(f"--batch-size {cfg.batch_size}: must be a multiple of the {devices} devices "
                     f"({processes} process{'es' if processes > 1 else ''}), which split each batch")
  if cfg.crop_size < 32:
    raise ValueError(f"--crop-size {cfg.crop_size}: must be at least 32 (the network's stride)")
  for name in ("resize_scale", "eval_crop", "eval_stride"):
    if min(getattr(cfg, name)) < 1:
      raise ValueError(f"{flag(name)} {' '.join(map(str, getattr(cfg, name)))}: must be positive")
  if cfg.eval_mode == "slide" and any(s > c for s, c in zip(cfg.eval_stride, cfg.eval_crop)):
    raise ValueError(f"--eval-stride {cfg.eval_stride} is larger than --eval-crop {cfg.eval_crop}: "
                     "sliding windows would leave gaps")
  if cfg.save_best:
    best_checkpoint.check_metric(cfg.save_best)
  if cfg.warmup_steps > cfg.steps:
    log.warning("--warmup-steps %d is longer than the run (--steps %d): the lr never reaches --lr",
                cfg.warmup_steps, cfg.steps)


def check_data_settings(cfg: TrainConfig, dataset) -> None:
  """Settings that name the data's classes: one weight per class, a --save-best class."""
  if cfg.class_weight and len(cfg.class_weight) != dataset.num_classes:
    raise ValueError(f"--class-weight has {len(cfg.class_weight)} weights, but {cfg.data} has "
                     f"{dataset.num_classes} classes ({', '.join(dataset.class_names[:3])}, ...)")
  if cfg.save_best:
    best_checkpoint.check_metric(cfg.save_best, list(dataset.class_names))


def save_best(best: best_checkpoint.BestCheckpoint, step: int, value: float, state: TrainState,
              meta: dict) -> None:
  """`step` as WORKDIR/best, as write_checked does (DiskFull naming the best that is intact)."""
  kept = (f"the best so far (step {best.step}) is intact" if best.step is not None else
          "no best step saved yet")
  write_checked(best.dir / checkpoint.SUBDIR, f"the best checkpoint of step {step}",
                model_bytes(state), kept, lambda: best.save(step, value, state.variables(), meta))


def check_finite(step: int, metrics: dict, cfg: TrainConfig, saved: int | None) -> None:
  """NonFinite (one line: step, values, a hint) when `step`'s loss or gradient norm is not finite.
  Reads one device scalar: the loop calls it for the previous step, after queueing the next."""
  if bool(metrics["finite"]):
    return
  m = jax.device_get(metrics)
  hint = f"lower --lr (now {cfg.lr:g}) or lengthen --warmup-steps (now {cfg.warmup_steps})"
  if cfg.precision == "bf16":
    hint += ", or train in --precision fp32"
  last = f"the last checkpoint is step {saved}" if saved is not None else "no checkpoint was saved"
  raise faults.NonFinite(f"loss {float(m['loss']):.4g}, gradient norm {float(m['grad_norm']):.4g} "
                         f"at step {step}: training diverged; {hint}; {last} (nothing non-finite "
                         "is ever saved)")


# ---------------------------------------------------------------------------------------------
# The loop

def prepare_data(cfg: TrainConfig):
  """(train, val) datasets, checked before anything is written: bad data fails here."""
  from segnext_jax.data.datasets import check, make_dataset
  train_ds, val_ds = make_dataset(cfg.data, "train"), make_dataset(cfg.data, "val")
  for ds in (train_ds, val_ds):
    check(ds)
  if train_ds.num_classes != val_ds.num_classes:
    raise ValueError(f"{cfg.data}: train has {train_ds.num_classes} classes, val {val_ds.num_classes}")
  return train_ds, val_ds


def train_and_evaluate(cfg: TrainConfig, stop_after: int | None = None, progress: bool = True) -> dict:
  """Train per `cfg` in cfg.workdir, resuming from its latest complete checkpoint. `stop_after`
  ends the process-local run early at that step (a simulated preemption, for tests). Returns
  {'state', 'history'} (+ 'nothing_to_do': a sentence, when the run was already done).

  Settings, recipe and data are checked before anything is written; the workdir is locked for the
  run (faults.WorkdirLock); SIGTERM/SIGINT save the current step and raise faults.Stopped."""
  workdir = Path(cfg.workdir)
  lead = jax.process_index() == 0
  validate_config(cfg, jax.device_count(), jax.process_count())
  with contextlib.ExitStack() as stack:
    lock = faults.WorkdirLock(workdir)
    if lead:
      stack.callback(lock.release)
      if workdir.is_dir():
        _acquire(lock)  # a second run on this workdir stops here, before the data check
    check_resumable(workdir, cfg)
    train_ds, val_ds = prepare_data(cfg)
    check_data_settings(cfg, train_ds)
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
  from segnext_jax.eval import InferenceConfig, Segmenter, evaluate
  from segnext_jax.data.loader import TrainLoader
  from segnext_jax.data.transforms import TrainPipeline
  import tqdm

  if lead:
    checkpoint.clean_unfinished(workdir, RUN_ITEMS)
  steps = checkpoint.complete_steps(workdir, RUN_ITEMS)  # the one answer to "is this a resume?"
  model = build_model(cfg, train_ds.num_classes)
  mesh = make_mesh()
  repl = NamedSharding(mesh, P())
  variables = init_variables(model, jax.random.key(cfg.seed))
  if cfg.pretrained and not steps:  # a resumed run takes every weight from its checkpoint
    from segnext_jax.pretrained import load_pretrained
    variables, report = load_pretrained(cfg.pretrained, variables, cfg.variant)
    log.warning("pretrained %s: %s", cfg.pretrained, report.summary())
  state = jax.device_put(create_train_state(cfg, model, variables), repl)
  meta = dict(variant=cfg.variant, model=model_kwargs(cfg, train_ds.num_classes),
              class_names=list(train_ds.class_names),
              palette=np.asarray(train_ds.palette).astype(int).tolist(),
              config=json.loads(to_json(cfg)), nmf_bases=f"fixed, drawn at init from seed {cfg.seed}")
  mngr = checkpoint.manager(workdir, cfg.keep_ckpts, create=True, async_save=False)
  if steps:
    state = restore_latest(mngr, state, steps, mesh)
    log.warning("resumed from %s at step %d", mngr.directory, int(state.step))
  start = int(state.step)
  history: dict[str, Any] = {"loss": [], "eval": []}
  if start >= cfg.steps:
    mngr.close()
    return {"state": state, "history": history, "nothing_to_do": (
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
  saves = min(cfg.keep_ckpts, -(-(cfg.steps - start) // cfg.ckpt_every))
  needed = state_bytes(state) + 2**20  # + orbax's metadata; later: the last step's size on disk
  if steps:
    needed = max(needed, faults.tree_bytes(Path(mngr.directory) / str(start)))
  check_space(workdir, needed, saves, best=0 if best is None else model_bytes(state))
  writer = MetricWriter(workdir, start, enabled=lead)
  step_fn = jit_train_step(cfg, mesh)
  base_key = jax.random.key(cfg.seed + 1)
  pipeline = TrainPipeline(crop=(cfg.crop_size, cfg.crop_size), scale=tuple(cfg.resize_scale))
  loader = TrainLoader(train_ds, pipeline, cfg.batch_size, cfg.seed, start, cfg.workers,
                       process_index=jax.process_index(), process_count=jax.process_count())
  segmenter = Segmenter.for_model(model.clone(remat=False), InferenceConfig(  # compiled once
      scale=tuple(cfg.resize_scale), mode=cfg.eval_mode, crop=tuple(cfg.eval_crop),
      stride=tuple(cfg.eval_stride), batch_size=max(1, min(8, cfg.batch_size))))
  end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  # smoothing: the rate of the last ~20 updates, not of the last one (steps vary around logging)
  bar = tqdm.tqdm(total=cfg.steps, initial=start, disable=not progress or not lead,
                  unit="step", dynamic_ncols=True, smoothing=0.05)
  log.info("compiling the train step (the first step waits for it)")
  t_last, n_last = time.perf_counter(), start
  done, saved = start, (start if steps else None)
  pending = None  # the previous step's metrics: its finite flag is read after the next is queued
  stop = faults.GracefulStop(enabled=jax.process_count() == 1)

  def save(step: int, metrics: dict) -> int:
    nonlocal needed
    check_finite(step, metrics, cfg, saved)  # never a non-finite checkpoint
    save_checked(mngr, state, meta, step, needed)
    needed = max(needed, faults.tree_bytes(Path(mngr.directory) / str(step)))
    return step

  try:
    with stop:
      for step, batch in loader:
        if step >= end or stop.requested:
          break
        state, metrics = step_fn(state, shard_batch(batch, mesh), base_key)
        done = step + 1
        if pending is not None:
          check_finite(*pending, cfg, saved)
        pending = (done, metrics)
        if done % cfg.log_every == 0 or done == end:
          check_finite(done, metrics, cfg, saved)
          m = jax.device_get({k: v for k, v in metrics.items() if k != "finite"})
          ips = (done - n_last) * cfg.batch_size / (time.perf_counter() - t_last)
          t_last, n_last = time.perf_counter(), done
          history["loss"].append((done, float(m["loss"])))
          writer.write(done, {**{k: float(v) for k, v in m.items()}, "images_per_s": ips})
          bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", img_s=f"{ips:.1f}")
        bar.update(1)
        if jax.process_count() > 1 and mngr.reached_preemption(done):
          stop.signum = signal.SIGTERM  # jax.distributed's notice: every process saves this step
        if stop.requested:
          break
        if done % cfg.eval_every == 0 or done == cfg.steps:
          check_finite(done, metrics, cfg, saved)
          res = evaluate(segmenter, state.variables(), val_ds, cfg.eval_images, progress=False)
          history["eval"].append((done, res["mIoU"], res["aAcc"]))
          pct = {k: 100 * res[k] for k in ("aAcc", "mIoU", "mAcc")}
          iou = {n: (None if not np.isfinite(v) else 100 * float(v))
                 for n, v in zip(train_ds.class_names, res["IoU"])}
          scalars, extra, note = dict(pct), {"IoU": iou}, ""
          if best is not None:
            value = best_checkpoint.metric_value(cfg.save_best, pct, iou)
            if best.beats(done, value):
              save_best(best, done, value, state, meta)
              note = f"  (new best {cfg.save_best}: {best.dir})"
            if best.step is not None:
              scalars[f"best_{cfg.save_best}"], extra["best_step"] = best.value, best.step
          writer.write(done, scalars, prefix="val", extra=extra)
          bar.write(f"step {done}: val mIoU {pct['mIoU']:.2f}  aAcc {pct['aAcc']:.2f}  "
                    f"mAcc {pct['mAcc']:.2f}  ({res['images']} images){note}")
          bar.unpause()  # the rate and time left count training steps, not validation
        if done % cfg.ckpt_every == 0 or done == end:
          saved = save(done, metrics)
      if stop.requested and pending is not None and saved != done:  # the step it was at
        saved = save(*pending)
  finally:
    batch = None  # its shared memory is unlinked before close() returns, not at the exit
    bar.close()
    loader.close()
    with contextlib.suppress(Exception), faults.quiet_logs("absl", "asyncio"):
      mngr.wait_until_finished()  # a failed save already said what failed
      mngr.close()
    if lead:
      remove_unfinished(Path(mngr.directory))  # a failed save's leftovers (no writer is left)
    writer.close()
  if stop.requested:
    if pending is None:
      raise faults.Stopped(f"{stop.name} before the first step: nothing trained" + (
          f"; the last checkpoint is step {saved}" if saved is not None else ""), stop.signum)
    raise faults.Stopped(f"{stop.name} after step {done}: saved {mngr.directory}/{done}; re-run "
                         "the same command to resume", stop.signum)
  out = {"state": state, "history": history}
  if best is not None and best.step is not None:
    out["best"] = {"metric": cfg.save_best, "value": best.value, "step": best.step,
                   "dir": str(best.dir)}
  return out
