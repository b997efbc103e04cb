"""Exact inference on padded inputs: a view padded beyond its valid region gives, inside that
region, the logits of the unpadded view, so views of many sizes share a few compiled programs.

`valid` is a (B, 2) int array of each image's (height, width) before the extra padding, a
multiple of the network's total stride (model.TOTAL_STRIDE): every stage map then has an exact
valid size. What would otherwise leak across the valid border, and what stops it:
  * stride-1 spatial convs (the depthwise ones) read zeros past the border: `Padding.zero`.
    Stride-2 convs on even valid sizes never read past it.
  * GroupNorm and NMF statistics sum over the valid positions only: `Padding.mask`.
  * the head's bilinear resize clamps its source index at the valid edge: `Padding.clamp`
    replicates the edge row and column into the padding.

The seam: `valid` enters the network once, as the `Padding` SegNeXt makes of it, and reaches
the layers only as that object. The two kinds of part that hold such layers take it as a call
argument (a backbone block gets its stage's `pad.at(stride)`, the head the image's); inside
them it is a construction field `pad` of the three layers that read other positions
(DepthwiseConv, ConvGN, Hamburger), set by whoever builds them: MSCA and Mlp never see it, they
are handed the block's depthwise conv. An empty `Padding` (no `valid`: training, unpadded
inference) makes all three methods the identity. It is a pytree (`valid` the data, the stride
static), so it passes through jit, remat and StagedForward's per-part programs as an argument.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

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


@flax.struct.dataclass
class Padding:
  """Each image's valid (h, w) (None: no padding), seen from maps of stride `stride`."""
  valid: jax.Array | None = None
  stride: int = flax.struct.field(pytree_node=False, default=1)

  def at(self, stride: int) -> Padding:
    """The same padding, for maps of stride `stride` (in input pixels)."""
    return self.replace(stride=stride)

  def mask(self, x: jax.Array) -> jax.Array | None:
    """(B, h, w, 1) bool of NHWC map x's valid positions; None without padding."""
    return None if self.valid is None else stage_mask(self.valid, x.shape, self.stride)

  def zero(self, x: jax.Array) -> jax.Array:
    """x with zeros past the valid region: what a stride-1 conv reads past a border."""
    return zero_outside(x, self.mask(x))

  def clamp(self, x: jax.Array) -> jax.Array:
    """x with its last valid row and column repeated into the padding (see clamp_to_valid)."""
    return x if self.valid is None else clamp_to_valid(x, self.valid, self.stride)


NO_PADDING = Padding()


def bucket(n: int, per_octave: int) -> int:
  """The padded length for a valid length n (a multiple of the total stride): the next of
  `per_octave` evenly spaced sizes per octave (n itself for per_octave 0). 4 per octave: 512,
  640, 768, 896, 1024, 1280, ...: views of any size share a few programs for at most 25% (about
  12%) more pixels per side."""
  from segnext_jax.model import TOTAL_STRIDE  # not at the top: model imports this module
  if per_octave <= 0 or n <= TOTAL_STRIDE:
    return n
  step = max(TOTAL_STRIDE, (1 << ((n - 1).bit_length() - 1)) // per_octave)
  return -(-n // step) * step
