"""Training: the train state, the sharded train step, run checkpoints and the training loop."""
from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from segnext_jax import checkpoint
from segnext_jax.config import TrainConfig, recipe_diff, to_json
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


def build_model(cfg: TrainConfig, num_classes: int) -> SegNeXt:
  return segnext(cfg.variant, **model_kwargs(cfg, num_classes), remat=cfg.remat,
                 nmf_grad=cfg.nmf_grad,
                 dtype=jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32)


def model_kwargs(cfg: TrainConfig, num_classes: int) -> dict:
  """What a checkpoint's metadata needs to rebuild the model (beyond the variant)."""
  return {**cfg.model_overrides, "num_classes": num_classes, "nmf_rank": cfg.nmf_rank}


def create_train_state(cfg: TrainConfig, model: SegNeXt, variables: dict) -> TrainState:
  """A fresh state; its step is a plain int32 (not flax's weakly typed 0), as a restored one is,
  so a fresh run and its resumption compile the same step program (one compile-cache entry)."""
  state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                            tx=make_optimizer(cfg, variables["params"]),
                            batch_stats=variables["batch_stats"], nmf_bases=variables["nmf_bases"])
  return state.replace(step=jnp.zeros((), jnp.int32))


def train_step(state: TrainState, batch: dict, base_key: jax.Array, *,
               schedule: optax.Schedule) -> tuple[TrainState, dict]:
  """Forward (BN batch stats over the global batch), mmseg CE, backward, AdamW update.

  Randomness (DropPath/Dropout2d, NMF bases) is derived from (base_key, step), never stored.
  """
  key = jax.random.fold_in(base_key, state.step)
  k_drop, k_nmf = jax.random.split(key)

  def loss_fn(params):
    logits, new = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                 train=True, mutable=["batch_stats"],
                                 rngs={"dropout": k_drop, "nmf": k_nmf})
    return seg_cross_entropy(logits, batch["label"]), new["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  lr = schedule(state.step)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr}


def make_mesh() -> jax.sharding.Mesh:
  """1-D data-parallel mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def jit_train_step(cfg: TrainConfig, mesh: jax.sharding.Mesh):
  """train_step jitted over the mesh: batch sharded on 'data', state replicated, state donated."""
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step = functools.partial(train_step, schedule=lr_schedule(cfg))
  return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=0)


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """This process's part of the global batch -> global arrays sharded along 'data'."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints of a run (layout: segnext_jax/checkpoint.py)

def save_state(mngr, state: TrainState, meta: dict) -> None:
  checkpoint.save(mngr, int(state.step), state.variables(), meta,
                  opt={"opt_state": state.opt_state, "step": state.step})


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
  """A workdir with checkpoints resumes only with the recipe it was started with."""
  saved = workdir / "config.json"
  if not saved.is_file() or not (workdir / checkpoint.SUBDIR).is_dir():
    return
  diff = recipe_diff(json.loads(saved.read_text()), cfg)
  if diff:
    raise RecipeMismatch(f"{workdir} was trained with another recipe ({'; '.join(diff)}); use a new "
                         "--workdir, or --config " + str(saved) + " to resume it")


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
  """Train per `cfg` in cfg.workdir, resuming from its latest checkpoint. `stop_after` ends the
  process-local run early at that step (a simulated preemption, for tests). Returns final metrics."""
  from segnext_jax.eval_lib import evaluate
  from segnext_jax.inference import InferenceConfig, Predictor
  from segnext_jax.data.loader import TrainLoader
  from segnext_jax.data.transforms import TrainPipeline
  import tqdm

  workdir = Path(cfg.workdir)
  check_resumable(workdir, cfg)
  train_ds, val_ds = prepare_data(cfg)
  model = build_model(cfg, train_ds.num_classes)
  mesh = make_mesh()
  repl = NamedSharding(mesh, P())
  variables = init_variables(model, jax.random.key(cfg.seed))
  resuming = (workdir / checkpoint.SUBDIR).is_dir() and any((workdir / checkpoint.SUBDIR).iterdir())
  if cfg.pretrained and not resuming:  # a resumed run takes every weight from its checkpoint
    from segnext_jax.pretrained import load_pretrained
    variables, report = load_pretrained(cfg.pretrained, variables, cfg.variant)
    log.warning("pretrained %s: %s", cfg.pretrained, report.summary())
  lead = jax.process_index() == 0
  if lead:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(to_json(cfg))
  log.info("config: %s", to_json(cfg))
  state = jax.device_put(create_train_state(cfg, model, variables), repl)
  meta = dict(variant=cfg.variant, model=model_kwargs(cfg, train_ds.num_classes),
              class_names=list(train_ds.class_names),
              palette=np.asarray(train_ds.palette).astype(int).tolist(),
              config=json.loads(to_json(cfg)), nmf_bases=f"fixed, drawn at init from seed {cfg.seed}")
  mngr = checkpoint.manager(workdir, cfg.keep_ckpts, create=True)
  if mngr.latest_step() is not None:
    state = restore_state(mngr, state, mngr.latest_step(), mesh)
    log.warning("resumed from %s at step %d", mngr.directory, int(state.step))
  start = int(state.step)
  writer = MetricWriter(workdir, start, enabled=lead)
  step_fn = jit_train_step(cfg, mesh)
  base_key = jax.random.key(cfg.seed + 1)
  pipeline = TrainPipeline(crop=(cfg.crop_size, cfg.crop_size), scale=tuple(cfg.resize_scale))
  loader = TrainLoader(train_ds, pipeline, cfg.batch_size, cfg.seed, start, cfg.workers,
                       process_index=jax.process_index(), process_count=jax.process_count())
  predictor = Predictor.for_model(model.clone(remat=False), InferenceConfig(  # compiled once
      scale=tuple(cfg.resize_scale), mode=cfg.eval_mode, crop=tuple(cfg.eval_crop),
      stride=tuple(cfg.eval_stride), batch_size=max(1, min(8, cfg.batch_size))))
  history: dict[str, Any] = {"loss": [], "eval": []}
  end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  bar = tqdm.tqdm(total=cfg.steps, initial=start, disable=not progress or not lead,
                  unit="step", dynamic_ncols=True)
  t_last, n_last = time.perf_counter(), start
  try:
    for step, batch in loader:
      if step >= end:
        break
      state, metrics = step_fn(state, shard_batch(batch, mesh), base_key)
      done = step + 1
      if done % cfg.log_every == 0 or done == end:
        m = jax.device_get(metrics)
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"loss is {m['loss']} at step {done}")
        ips = (done - n_last) * cfg.batch_size / (time.perf_counter() - t_last)
        t_last, n_last = time.perf_counter(), done
        history["loss"].append((done, float(m["loss"])))
        writer.write(done, {**{k: float(v) for k, v in m.items()}, "images_per_s": ips})
        bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", img_s=f"{ips:.1f}")
      bar.update(1)
      if done % cfg.eval_every == 0 or done == cfg.steps:
        res = evaluate(predictor, state.variables(), val_ds, cfg.eval_images, progress=False)
        history["eval"].append((done, res["mIoU"], res["aAcc"]))
        pct = {k: 100 * res[k] for k in ("aAcc", "mIoU", "mAcc")}
        writer.write(done, pct, prefix="val", extra={"IoU": {
            n: (None if not np.isfinite(v) else 100 * float(v))
            for n, v in zip(train_ds.class_names, res["IoU"])}})
        bar.write(f"step {done}: val mIoU {pct['mIoU']:.2f}  aAcc {pct['aAcc']:.2f}  "
                  f"mAcc {pct['mAcc']:.2f}  ({res['images']} images)")
      if done % cfg.ckpt_every == 0 or done == end:
        save_state(mngr, state, meta)
  finally:
    bar.close()
    loader.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return {"state": state, "history": history}
