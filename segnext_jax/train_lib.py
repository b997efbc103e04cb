"""Training: mmseg's loss, the optax recipe, the sharded train step and the training loop."""
from __future__ import annotations

import dataclasses
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
import orbax.checkpoint as ocp
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from segnext_jax.resize import IGNORE_INDEX, bilinear_matrix
from segnext_jax.model import SegNeXt, init_variables, segnext

log = logging.getLogger("segnext_jax.train")


def _upsample(logits: jax.Array, ah: np.ndarray, aw: np.ndarray) -> jax.Array:
  x = jnp.einsum("Hh,bhwk->bHwk", ah, logits)      # (B,H,w,K)
  return jnp.einsum("Ww,bHwk->bHWk", aw, x)        # (B,H,W,K)


@jax.custom_vjp
def _upsampled_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  ah, aw = _matrices(logits, labels)
  up = _upsample(logits, ah, aw)
  valid = labels != IGNORE_INDEX
  picked = jnp.take_along_axis(up, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(up, axis=-1) - picked
  return jnp.sum(jnp.where(valid, nll, 0.0)) / labels.size


def _matrices(logits, labels):
  return (bilinear_matrix(labels.shape[1], logits.shape[1]),
          bilinear_matrix(labels.shape[2], logits.shape[2]))


def _upsampled_ce_fwd(logits, labels):
  return _upsampled_ce(logits, labels), (logits, labels)


def _upsampled_ce_bwd(res, g):
  """Recompute the upsampled logits; d = (softmax - onehot) * valid * g / N, then the adjoint of
  the upsampling. Keeps ~3 full-resolution (B,H,W,K) buffers instead of autodiff's ~12."""
  logits, labels = res
  ah, aw = _matrices(logits, labels)
  up = _upsample(logits, ah, aw)
  valid = (labels != IGNORE_INDEX)[..., None]
  onehot = jnp.arange(up.shape[-1]) == labels[..., None]
  d = (jax.nn.softmax(up, axis=-1) - onehot) * jnp.where(valid, g / labels.size, 0.0)
  d = jnp.einsum("Ww,bHWk->bHwk", aw, d)
  d = jnp.einsum("Hh,bHwk->bhwk", ah, d)
  return d, np.zeros(labels.shape, jax.dtypes.float0)


_upsampled_ce.defvjp(_upsampled_ce_fwd, _upsampled_ce_bwd)


def seg_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """mmseg CrossEntropyLoss: logits (B,h,w,K) upsampled bilinearly (align_corners=False) to the
  labels' (B,H,W) size, softmax CE, ignored pixels (255) count 0, averaged over ALL pixels
  (avg_non_ignore=False). Memory-lean custom gradient."""
  return _upsampled_ce(logits.astype(jnp.float32), labels.astype(jnp.int32))


# ---------------------------------------------------------------------------------------------
# Config

@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every recipe setting. Defaults: mmseg's ADE20K recipe (segnext_mscan-*_1xb16-adamw-160k);
  `for_data('synthetic')` swaps in a short CPU-sized run."""
  variant: str = "t"                     # t | s | b | l
  data: str = "synthetic"                # synthetic | ade20k:PATH | tfds:scene_parse150[:DATA_DIR]
  workdir: str = "runs/segnext"
  pretrained: str = ""                   # MSCAN ImageNet .pth, mmseg segmentor .pth, or converted dir
  steps: int = 160_000
  batch_size: int = 16                   # global batch, split over all devices/processes
  crop_size: int = 512
  resize_scale: tuple[int, int] = (2048, 512)
  lr: float = 6e-5
  head_lr_mult: float = 10.0
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  warmup_steps: int = 1500
  warmup_factor: float = 1e-6
  poly_power: float = 1.0
  seed: int = 0
  precision: str = "fp32"                # fp32 | bf16 (compute; params and NMF stay fp32)
  remat: bool = False                    # rematerialise MSCA blocks (less memory, ~30% slower)
  nmf_grad: str = "unroll"               # unroll (mmseg) | one_step (Hamburger's, less memory)
  nmf_rank: int = 16
  eval_every: int = 16_000
  eval_images: int = 0                   # 0 = the whole validation split
  ckpt_every: int = 16_000
  keep_ckpts: int = 3
  log_every: int = 50
  workers: int = 4

  @staticmethod
  def for_data(data: str, **overrides) -> "TrainConfig":
    """Paper defaults for real data; a few-minute CPU run for the synthetic set."""
    if data == "synthetic":
      base = dict(steps=300, batch_size=8, crop_size=128, resize_scale=(512, 128), lr=1e-3,
                  head_lr_mult=1.0, warmup_steps=30, eval_every=100, ckpt_every=100,
                  log_every=10, workdir="runs/synthetic")
      overrides = {**base, **overrides}
    return TrainConfig(data=data, **overrides)


# ---------------------------------------------------------------------------------------------
# Optimizer: mmseg paramwise_cfg as a table, and the LinearLR + PolyLR schedule

# (substring of the torch-style parameter name, lr_mult, decay_mult); first match wins, in the
# order mmengine applies custom_keys (longest key first: pos_block, then head, norm).
# Quirk kept on purpose: matching is by substring, so the stem BNs (proj.1 / proj.4) and the
# head's GroupNorms (gn) DO get weight decay, and all decode_head params get lr x10 with decay.
PARAM_GROUPS: list[tuple[str, str, float]] = [
    ("pos_block", "lr", 0.0),
    ("head", "head_lr", 1.0),
    ("norm", "lr", 0.0),
]


def param_name(path: tuple) -> str:
  """Flax param path -> the name the mmseg rules match on (module names equal mmseg's)."""
  return ".".join(getattr(p, "key", str(p)) for p in path)


def param_group(name: str) -> tuple[str, float]:
  """(lr group 'lr' | 'head_lr', decay_mult) for a parameter name."""
  for key, lr_group, decay_mult in PARAM_GROUPS:
    if key in name:
      return lr_group, decay_mult
  return "lr", 1.0


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """mmengine LinearLR(start_factor, begin=0, end=warmup) then PolyLR(power, eta_min=0,
  begin=warmup, end=steps). mmengine spans end - begin - 1 steps: the warm-up reaches the base lr
  at step warmup - 1 and the decay reaches 0 at step steps - 1."""
  w, total = cfg.warmup_steps, cfg.steps
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = cfg.warmup_factor + (1.0 - cfg.warmup_factor) * jnp.minimum(step / max(w - 1, 1), 1.0)
    frac = jnp.clip((step - w) / max(total - w - 1, 1), 0.0, 1.0)
    poly = (1.0 - frac) ** cfg.poly_power
    return cfg.lr * jnp.where(step < w, warm, poly)
  return schedule


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
  """AdamW per (lr group, decay) label via optax.multi_transform."""
  sched = lr_schedule(cfg)
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "%s|%g" % param_group(param_name(path)), params)
  txs = {}
  for label in set(jax.tree.leaves(labels)):
    group, decay = label.split("|")
    mult = cfg.head_lr_mult if group == "head_lr" else 1.0
    txs[label] = optax.adamw(lambda s, m=mult: m * sched(s), cfg.b1, cfg.b2, eps=1e-8,
                             weight_decay=cfg.weight_decay * float(decay))
  return optax.multi_transform(txs, labels)


# ---------------------------------------------------------------------------------------------
# State and step

class TrainState(train_state.TrainState):
  batch_stats: Any = None


def build_model(cfg: TrainConfig, num_classes: int) -> SegNeXt:
  return segnext(cfg.variant, num_classes=num_classes, nmf_rank=cfg.nmf_rank, remat=cfg.remat,
                 nmf_grad=cfg.nmf_grad,
                 dtype=jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32)


def create_train_state(cfg: TrainConfig, model: SegNeXt, variables: dict) -> TrainState:
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=make_optimizer(cfg, variables["params"]),
                           batch_stats=variables["batch_stats"])


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
# Pretrained weights, checkpoints

def load_pretrained(path: str, variables: dict, variant: str) -> tuple[dict, list[str]]:
  """Overlay a .pth (MSCAN ImageNet backbone or mmseg segmentor) or a converted directory onto
  `variables`. Returns (variables, paths NOT loaded); mis-shaped backbone tensors are an error."""
  from segnext_jax import convert_map
  from segnext_jax.checkpoint import load_tree, read_meta
  if Path(path).is_dir():
    meta = read_meta(path)
    source, src_variant = load_tree(path), meta["variant"]
  else:
    source, meta, _ = convert_map.convert_file(path)
    src_variant = meta["variant"]
  if src_variant != variant:
    raise ValueError(f"--pretrained {path} is variant {src_variant!r}, the model is {variant!r}")
  flat_src = convert_map.flatten(source)
  flat = convert_map.flatten(variables)
  loaded, skipped = {}, []
  for p, v in flat.items():
    src = flat_src.get(p)
    if src is not None and tuple(src.shape) == tuple(v.shape):
      loaded[p] = jnp.asarray(src, v.dtype)
    elif src is not None and p[1] != "decode_head":
      raise ValueError(f"--pretrained {path}: {'/'.join(p)} has shape {src.shape}, model {v.shape}")
    else:
      skipped.append("/".join(p))  # e.g. the decode head (backbone-only) or conv_seg (#classes)
  return convert_map.unflatten({**flat, **loaded}), skipped


def checkpoint_manager(workdir: str | Path, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      Path(workdir).absolute() / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=("model", "opt", "meta"))


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, meta: dict) -> None:
  """Atomic (orbax tmp dir + rename): model variables, optimizer state + step, json metadata."""
  step = int(state.step)
  mngr.save(step, args=ocp.args.Composite(
      model=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
      opt=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step}),
      meta=ocp.args.JsonSave(meta)), force=True)


def restore_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, step: int) -> TrainState:
  abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)
  got = mngr.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(abstract({"params": state.params, "batch_stats": state.batch_stats})),
      opt=ocp.args.StandardRestore(abstract({"opt_state": state.opt_state, "step": state.step}))))
  return state.replace(params=got.model["params"], batch_stats=got.model["batch_stats"],
                       opt_state=got.opt["opt_state"], step=got.opt["step"])


# ---------------------------------------------------------------------------------------------
# The loop

def train_and_evaluate(cfg: TrainConfig, stop_after: int | None = None, progress: bool = True) -> dict:
  """Train per `cfg` in cfg.workdir, resuming from its latest checkpoint. `stop_after` ends the
  process-local run early at that step (a simulated preemption, for tests). Returns final metrics."""
  from segnext_jax.data.datasets import make_dataset
  from segnext_jax.data.loader import TrainLoader
  from segnext_jax.data.transforms import TrainPipeline
  from segnext_jax.eval_lib import EvalConfig, Predictor, evaluate
  import tqdm

  workdir = Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
  log.info("config: %s", dataclasses.asdict(cfg))
  train_ds, val_ds = make_dataset(cfg.data, "train"), make_dataset(cfg.data, "val")
  model = build_model(cfg, train_ds.num_classes)
  mesh = make_mesh()
  repl = NamedSharding(mesh, P())
  variables = init_variables(model, jax.random.key(cfg.seed))
  if cfg.pretrained:
    variables, skipped = load_pretrained(cfg.pretrained, variables, cfg.variant)
    n_all = len(jax.tree.leaves(variables))
    log.warning("pretrained %s: loaded %d/%d tensors; NOT loaded (%d): %s", cfg.pretrained,
                n_all - len(skipped), n_all, len(skipped), _summarize(skipped))
  state = jax.device_put(create_train_state(cfg, model, variables), repl)
  meta = dict(variant=cfg.variant, model=dict(num_classes=train_ds.num_classes, nmf_rank=cfg.nmf_rank),
              class_names=list(train_ds.class_names), config=dataclasses.asdict(cfg))
  mngr = checkpoint_manager(workdir, cfg.keep_ckpts)
  if mngr.latest_step() is not None:
    state = jax.device_put(restore_checkpoint(mngr, state, mngr.latest_step()), repl)
    log.warning("resumed from %s at step %d", mngr.directory, int(state.step))
  start = int(state.step)
  step_fn = jit_train_step(cfg, mesh)
  base_key = jax.random.key(cfg.seed + 1)
  pipeline = TrainPipeline(crop=(cfg.crop_size, cfg.crop_size), scale=tuple(cfg.resize_scale))
  loader = TrainLoader(train_ds, pipeline, cfg.batch_size, cfg.seed, start, cfg.workers,
                       process_index=jax.process_index(), process_count=jax.process_count())
  eval_cfg = EvalConfig(scale=tuple(cfg.resize_scale), batch_size=max(1, min(8, cfg.batch_size)))
  predictor = Predictor(model.clone(remat=False), None, eval_cfg)  # compiled once, reused per eval
  history: dict[str, Any] = {"loss": [], "eval": []}
  end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  bar = tqdm.tqdm(total=cfg.steps, initial=start, disable=not progress or jax.process_index() != 0,
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
        bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", img_s=f"{ips:.1f}")
      bar.update(1)
      if done % cfg.eval_every == 0 or done == cfg.steps:
        predictor.variables = {"params": state.params, "batch_stats": state.batch_stats}
        res = evaluate(predictor, val_ds, cfg.eval_images, progress=False)
        history["eval"].append((done, res["mIoU"], res["aAcc"]))
        bar.write(f"step {done}: val mIoU {100 * res['mIoU']:.2f}  aAcc {100 * res['aAcc']:.2f}  "
                  f"mAcc {100 * res['mAcc']:.2f}  ({res['images']} images)")
      if done % cfg.ckpt_every == 0 or done == end:
        save_checkpoint(mngr, state, meta)
  finally:
    bar.close()
    loader.close()
    mngr.wait_until_finished()
    mngr.close()
  return {"state": state, "history": history}


def _summarize(paths: list[str], n: int = 6) -> str:
  heads = sorted({"/".join(p.split("/")[:3]) for p in paths})
  return ", ".join(heads[:n]) + (" ..." if len(heads) > n else "") if paths else "none"
