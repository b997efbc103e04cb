"""The train state and the sharded train step (the loop that runs it: trainer.py)."""
from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from segnext_jax import backend
from segnext_jax.config import RUNTIME_FIELDS, TrainConfig, to_json
from segnext_jax.data.transforms import device_normalize
from segnext_jax.loss import seg_cross_entropy
from segnext_jax.model import SegNeXt, segnext
from segnext_jax.optim import lr_schedule, make_optimizer


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
