"""mmseg's decode-head loss: CrossEntropyLoss on logits upsampled to the label size."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from segnext_jax import backend
from segnext_jax.resize import (IGNORE_INDEX, bilinear_bands, bilinear_matrix, resize_bilinear,
                                support_windows)

ROWS_PER_CHUNK = 16  # full-resolution label rows per scan step (measured best of 16-128 on T 2x512)


@functools.lru_cache(maxsize=64)
def _row_chunks(n_out: int, n_in: int, rows: int):
  """The H-axis upsampling cut into chunks of `rows` output rows: chunk c reads `span` low-res
  rows from first[c] with the dense (rows, span) weights mats[c]. Rows past n_out weigh 0."""
  m = bilinear_matrix(n_out, n_in)
  n = -(-n_out // rows)
  m = np.pad(m, ((0, n * rows - n_out), (0, 0))).reshape(n, rows, n_in)
  first, span = support_windows(m.any(axis=1))                             # over (n, n_in)
  mats = np.stack([m[c][:, first[c]:first[c] + span] for c in range(n)])  # (n, rows, span)
  return first.astype(np.int32), mats.astype(np.float32)


def _scan_ce(logits: jax.Array, labels: jax.Array, with_grad: bool):
  """Loss (sum of NLL over valid pixels / N) and, if asked, its gradient w.r.t. the logits.

  Upsampling is separable: along W with 2-tap gathers (a (B,h,W,K) map), along H chunk by chunk
  in a scan, so that the full-resolution scores exist ROWS_PER_CHUNK rows at a time. Each chunk
  takes its softmax once, for the loss and for (softmax - onehot) * valid / N, which goes back
  through the chunk's adjoint into an (h,B,W,K) accumulator."""
  b, hl, wl, k = logits.shape
  big_h, big_w = labels.shape[1:]
  up_w, adj_w = bilinear_bands(big_w, wl)
  rows = min(ROWS_PER_CHUNK, big_h)
  first, mats = _row_chunks(big_h, hl, rows)
  n, span = mats.shape[0], mats.shape[2]
  lab = jnp.pad(labels, ((0, 0), (0, n * rows - big_h), (0, 0)), constant_values=IGNORE_INDEX)
  lab = lab.reshape(b, n, rows, big_w).transpose(1, 2, 0, 3)               # (n,rows,B,W)
  # Rows lead (h, B, W, K): a chunk's H-resize is one (rows, span) x (span, B*W*K) matmul whose
  # operands and result are contiguous, with no layout copies around it.
  xw = up_w.apply(logits, 2).transpose(1, 0, 2, 3)                          # (h,B,W,K)
  dt = logits.dtype
  inv_n = 1.0 / labels.size

  def chunk(carry, xs):
    total, dxw = carry
    r0, mat, lab_c = xs
    src = jax.lax.dynamic_slice_in_dim(xw, r0, span, axis=0)               # (span,B,W,K)
    up = jnp.einsum("ts,sbwk->tbwk", mat.astype(dt), src)                  # (rows,B,W,K)
    valid = lab_c != IGNORE_INDEX
    hit = jnp.arange(k) == lab_c[..., None]
    mx = jax.lax.stop_gradient(jnp.max(up, axis=-1, keepdims=True))
    e = jnp.exp(up - mx)
    s = jnp.sum(e, axis=-1, keepdims=True)
    nll = mx[..., 0] + jnp.log(s[..., 0]) - jnp.sum(jnp.where(hit, up, 0), axis=-1)
    total = total + jnp.sum(jnp.where(valid, nll, 0))
    if with_grad:
      d = (e / s - hit.astype(dt)) * jnp.where(valid, inv_n, 0.0)[..., None].astype(dt)
      back = jnp.einsum("ts,tbwk->sbwk", mat.astype(dt), d)               # (span,B,W,K)
      old = jax.lax.dynamic_slice_in_dim(dxw, r0, span, axis=0)
      dxw = jax.lax.dynamic_update_slice_in_dim(dxw, old + back, r0, axis=0)
    return (total, dxw), None

  dxw0 = jnp.zeros(xw.shape if with_grad else (0,), dt)
  (total, dxw), _ = jax.lax.scan(chunk, (jnp.zeros((), dt), dxw0), (first, mats, lab))
  if with_grad:
    return total * inv_n, adj_w.apply(dxw.transpose(1, 0, 2, 3), 2)
  return total * inv_n, None


@jax.custom_vjp
def _upsampled_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return _scan_ce(logits, labels, with_grad=False)[0]


def _upsampled_ce_fwd(logits, labels):
  """The gradient is computed with the loss (they share the softmax) and kept, at low res."""
  loss, grad = _scan_ce(logits, labels, with_grad=True)
  return loss, (grad, labels)


def _upsampled_ce_bwd(res, g):
  grad, labels = res
  return grad * g.astype(grad.dtype), np.zeros(labels.shape, jax.dtypes.float0)


_upsampled_ce.defvjp(_upsampled_ce_fwd, _upsampled_ce_bwd)


def _plain_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The same loss written directly (full-resolution scores, autodiff gradient)."""
  up = resize_bilinear(logits, labels.shape[1:])
  valid = labels != IGNORE_INDEX
  logp = jax.nn.log_softmax(up, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0)) / labels.size


def seg_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """mmseg CrossEntropyLoss: logits (B,h,w,K) upsampled bilinearly (align_corners=False) to the
  labels' (B,H,W) size, softmax CE, ignored pixels (255) count 0, averaged over ALL pixels
  (avg_non_ignore=False). Where the backend's policy says (the CPU), the gradient is computed in
  the same row-chunked pass as the loss; elsewhere it is plain autodiff."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  labels = labels.astype(jnp.int32)
  if backend.policy().chunked_loss:
    return _upsampled_ce(logits, labels)
  return _plain_ce(logits, labels)
