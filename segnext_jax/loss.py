"""mmseg's decode-head loss: CrossEntropyLoss on logits upsampled to the label size."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from segnext_jax.resize import IGNORE_INDEX, bilinear_matrix


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
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return _upsampled_ce(logits, labels.astype(jnp.int32))
