"""Training: mmseg's loss, the optax recipe, the sharded train step and the training loop."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from segnext_jax.ham_head import resize_bilinear

IGNORE_INDEX = 255


def seg_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """mmseg CrossEntropyLoss: logits (B,h,w,K) upsampled bilinearly to the labels' (B,H,W) size,
  softmax CE, ignored pixels contribute 0, averaged over ALL pixels (avg_non_ignore=False)."""
  logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / labels.size
