"""Exact inference on padded inputs: a view padded beyond its valid region gives, inside that
region, the logits of the unpadded view, so views of many sizes share a few compiled programs.

`valid` is a (B, 2) int array of each image's (height, width) before the extra padding, a
multiple of 32 (the model's total stride): every stage map then has an exact valid size. What
would otherwise leak across the valid border, and what this module provides to stop it:
  * stride-1 spatial convs (the depthwise ones) read zeros past the border: `stage_mask` zeros
    their inputs there. Stride-2 convs on even valid sizes never read past it.
  * GroupNorm and NMF statistics sum over the valid positions only (the same masks).
  * the head's bilinear resize clamps its source index at the valid edge: `clamp_to_valid`
    replicates the edge row and column into the padding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

STRIDE = 32  # valid sizes must be multiples of the model's total stride


def stage_mask(valid: jax.Array, shape: tuple[int, ...], stride: int) -> jax.Array:
  """(B, h, w, 1) bool: True inside each image's valid region of a stride-`stride` NHWC map."""
  h, w = shape[1], shape[2]
  rows = jnp.arange(h)[None, :] < (valid[:, 0] // stride)[:, None]   # (B, h)
  cols = jnp.arange(w)[None, :] < (valid[:, 1] // stride)[:, None]   # (B, w)
  return (rows[:, :, None] & cols[:, None, :])[..., None]


def zero_outside(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """x with zeros outside `mask` (identity for mask None): a conv's zero padding at the border."""
  return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


def clamp_to_valid(x: jax.Array, valid: jax.Array, stride: int) -> jax.Array:
  """NHWC x with each image's rows and columns past its valid region replaced by the last valid
  row and column: what torch's bilinear resize reads when its source index clamps at the edge."""
  b, h, w, _ = x.shape
  rows = jnp.minimum(jnp.arange(h)[None, :], (valid[:, 0] // stride - 1)[:, None])  # (B, h)
  cols = jnp.minimum(jnp.arange(w)[None, :], (valid[:, 1] // stride - 1)[:, None])  # (B, w)
  x = jnp.take_along_axis(x, rows[:, :, None, None], axis=1)
  return jnp.take_along_axis(x, cols[:, None, :, None], axis=2)


def bucket(n: int, per_octave: int) -> int:
  """The padded length for a valid length n (a multiple of STRIDE): the next of `per_octave`
  evenly spaced sizes per octave (n itself for per_octave 0). 4 per octave: 512, 640, 768, 896,
  1024, 1280, ...: views of any size share a few programs for at most 25% (about 12%) more
  pixels per side."""
  if per_octave <= 0 or n <= STRIDE:
    return n
  step = max(STRIDE, (1 << ((n - 1).bit_length() - 1)) // per_octave)
  return -(-n // step) * step
