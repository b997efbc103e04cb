"""The optimizer of mmseg's SegNeXt recipe: AdamW with mmseg's paramwise_cfg (a table of parameter
groups) and mmengine's LinearLR warm-up + PolyLR decay, as optax."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from segnext_jax.config import TrainConfig

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
  for label in sorted(set(jax.tree.leaves(labels))):  # sorted: a set's order varies per process,
    # and it orders the program's updates: a restarted run could not reuse the compiled step
    group, decay = label.split("|")
    mult = cfg.head_lr_mult if group == "head_lr" else 1.0
    txs[label] = optax.adamw(lambda s, m=mult: m * sched(s), cfg.b1, cfg.b2, eps=1e-8,
                             weight_decay=cfg.weight_decay * float(decay))
  return optax.multi_transform(txs, labels)
