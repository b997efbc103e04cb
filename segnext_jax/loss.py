"""mmseg's decode-head loss: CrossEntropyLoss on logits upsampled to the label size.

Its options are mmseg 1.x's. The sum of the pixels' NLL (pixel j times class_weight[label_j]
when weights are given; ignored pixels 0) is divided by mmseg's avg_factor (+ float32 eps):
every pixel counts 1 by default, or only the non-ignored ones with avg_non_ignore; with weights,
a pixel counts its class's weight. An ignored pixel has no class: with weights and without
avg_non_ignore mmseg 1.2.2 fails on it (IndexError); here it counts 1, so weights of 1 give the
unweighted loss in both settings (docs/training.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from segnext_jax import backend
from segnext_jax.data import IGNORE_INDEX
from segnext_jax.resize import (bilinear_bands, bilinear_matrix, resize_bilinear,
                                support_windows)

# Full-resolution label rows per scan step: a chunk's scores stay in cache, and fewer rows mean
# more steps (benchmarks/loss.py times the loss; docs/performance.md has the value's measurement).
ROWS_PER_CHUNK = 16


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


def _pixel_weights(labels: jax.Array, class_weight: tuple[float, ...] | None) -> jax.Array:
  """Each pixel's weight in the sum: class_weight[label] (1 without weights), 0 where ignored."""
  valid = labels != IGNORE_INDEX
  if class_weight is None:
    return valid.astype(jnp.float32)
  w = jnp.asarray(class_weight, jnp.float32)[jnp.where(valid, labels, 0)]
  return jnp.where(valid, w, 0.0)


def _inv_count(labels: jax.Array, class_weight: tuple[float, ...] | None,
               avg_non_ignore: bool) -> jax.Array:
  """1 / mmseg's avg_factor + eps: the pixels (all, or the non-ignored), each counted by its
  class's weight if weights are given (an ignored pixel: 1, or 0 with avg_non_ignore)."""
  if class_weight is None and not avg_non_ignore:
    return jnp.float32(1.0 / labels.size)  # the eps is below float32's resolution here
  count = jnp.sum(_pixel_weights(labels, class_weight))
  if not avg_non_ignore:
    count = count + jnp.sum(labels == IGNORE_INDEX).astype(jnp.float32)
  return 1.0 / (count + jnp.finfo(jnp.float32).eps)


def _scan_ce(logits: jax.Array, labels: jax.Array, with_grad: bool,
             class_weight: tuple[float, ...] | None, avg_non_ignore: bool):
  """Loss (weighted sum of NLL over valid pixels / N) and, if asked, its gradient w.r.t. the logits.

  Upsampling is separable: along W with 2-tap gathers (a (B,h,W,K) map), along H chunk by chunk
  in a scan, so that the full-resolution scores exist ROWS_PER_CHUNK rows at a time. Each chunk
  takes its softmax once, for the loss and for (softmax - onehot) * pixel weight / N, which goes
  back through the chunk's adjoint into an (h,B,W,K) accumulator."""
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
  inv_n = _inv_count(labels, class_weight, avg_non_ignore)

  def chunk(carry, xs):
    total, dxw = carry
    r0, mat, lab_c = xs
    src = jax.lax.dynamic_slice_in_dim(xw, r0, span, axis=0)               # (span,B,W,K)
    up = jnp.einsum("ts,sbwk->tbwk", mat.astype(dt), src)                  # (rows,B,W,K)
    valid = lab_c != IGNORE_INDEX
    pw_c = _pixel_weights(lab_c, class_weight)
    hit = jnp.arange(k) == lab_c[..., None]
    mx = jax.lax.stop_gradient(jnp.max(up, axis=-1, keepdims=True))
    e = jnp.exp(up - mx)
    s = jnp.sum(e, axis=-1, keepdims=True)
    nll = mx[..., 0] + jnp.log(s[..., 0]) - jnp.sum(jnp.where(hit, up, 0), axis=-1)
    weighted = nll if class_weight is None else nll * pw_c.astype(dt)
    total = total + jnp.sum(jnp.where(valid, weighted, 0))
    if with_grad:
      d = (e / s - hit.astype(dt)) * (pw_c * inv_n)[..., None].astype(dt)
      back = jnp.einsum("ts,tbwk->sbwk", mat.astype(dt), d)               # (span,B,W,K)
      old = jax.lax.dynamic_slice_in_dim(dxw, r0, span, axis=0)
      dxw = jax.lax.dynamic_update_slice_in_dim(dxw, old + back, r0, axis=0)
    return (total, dxw), None

  dxw0 = jnp.zeros(xw.shape if with_grad else (0,), dt)
  (total, dxw), _ = jax.lax.scan(chunk, (jnp.zeros((), dt), dxw0), (first, mats, lab))
  if with_grad:
    return total * inv_n, adj_w.apply(dxw.transpose(1, 0, 2, 3), 2)
  return total * inv_n, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _upsampled_ce(logits: jax.Array, labels: jax.Array, class_weight, avg_non_ignore) -> jax.Array:
  return _scan_ce(logits, labels, False, class_weight, avg_non_ignore)[0]


def _upsampled_ce_fwd(logits, labels, class_weight, avg_non_ignore):
  """The gradient is computed with the loss (they share the softmax) and kept, at low res."""
  loss, grad = _scan_ce(logits, labels, True, class_weight, avg_non_ignore)
  return loss, (grad, labels)


def _upsampled_ce_bwd(class_weight, avg_non_ignore, res, g):
  grad, labels = res
  return grad * g.astype(grad.dtype), np.zeros(labels.shape, jax.dtypes.float0)


_upsampled_ce.defvjp(_upsampled_ce_fwd, _upsampled_ce_bwd)


def _plain_ce(logits: jax.Array, labels: jax.Array, class_weight: tuple[float, ...] | None,
              avg_non_ignore: bool) -> jax.Array:
  """The same loss written directly (full-resolution scores, autodiff gradient)."""
  up = resize_bilinear(logits, labels.shape[1:])
  valid = labels != IGNORE_INDEX
  logp = jax.nn.log_softmax(up, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  weighted = nll if class_weight is None else nll * _pixel_weights(labels, class_weight)
  return jnp.sum(jnp.where(valid, weighted, 0)) * _inv_count(labels, class_weight, avg_non_ignore)


def seg_cross_entropy(logits: jax.Array, labels: jax.Array,
                      class_weight: tuple[float, ...] | None = None,
                      avg_non_ignore: bool = False) -> jax.Array:
  """mmseg CrossEntropyLoss: logits (B,h,w,K) upsampled bilinearly (align_corners=False) to the
  labels' (B,H,W) size, softmax CE, ignored pixels (255) count 0; by default averaged over ALL
  pixels, with mmseg's class_weight and avg_non_ignore as the module docstring says. Where the
  backend's policy says (the CPU), the gradient is computed in the same row-chunked pass as the
  loss; elsewhere it is plain autodiff."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  labels = labels.astype(jnp.int32)
  if class_weight is not None:
    class_weight = tuple(float(w) for w in class_weight)
    if len(class_weight) != logits.shape[-1]:
      raise ValueError(f"class_weight has {len(class_weight)} weights for "
                       f"{logits.shape[-1]} classes")
  if backend.policy().chunked_loss:
    return _upsampled_ce(logits, labels, class_weight, bool(avg_non_ignore))
  return _plain_ce(logits, labels, class_weight, bool(avg_non_ignore))
