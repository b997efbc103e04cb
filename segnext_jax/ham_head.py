"""LightHamHead: multi-level concat -> squeeze -> Hamburger (NMF2D) -> align -> classifier.

Paper Sec. 3.2 and "Is Attention Better Than Matrix Decomposition?" (Geng et al. 2021); mirrors
mmseg 1.x `mmseg/models/decode_heads/ham_head.py` in NHWC.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segnext_jax.layers import Conv1x1
from segnext_jax.mscan import STAGE_STRIDES
from segnext_jax.padding import NO_PADDING, Padding, zero_outside
from segnext_jax.resize import resize_bilinear

GN_EPS = 1e-5
GN_GROUPS = 32  # mmseg's SegNeXt head: GN(32), so head channels are a multiple of 32
NMF_EPS = 1e-6
Dtype = Any
NMFGrad = Literal["unroll", "one_step"]
FIXED_BASES = "nmf_bases"  # variable collection of the inference bases (C, R)
# mmcv ConvModule: kaiming normal (fan_out, relu); BaseDecodeHead: conv_seg ~ N(0, 0.01).
KAIMING = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
CLS_INIT = nn.initializers.normal(0.01)


def random_bases(key: jax.Array, batch: int, channels: int, rank: int) -> jax.Array:
  """NMF initial bases as mmseg draws them: uniform [0, 1), L2-normalized along D. (B, D, R)."""
  bases = jax.random.uniform(key, (batch, channels, rank), jnp.float32)
  norm = jnp.linalg.norm(bases, axis=1, keepdims=True)
  return bases / jnp.maximum(norm, 1e-12)  # torch F.normalize clamps the norm at 1e-12


def _coef_update(x: jax.Array, bases: jax.Array, coef: jax.Array) -> jax.Array:
  """coef <- coef * (x^T B) / (coef (B^T B) + eps).  x (B,N,D), bases (B,D,R), coef (B,N,R)."""
  num = jnp.einsum("bnd,bdr->bnr", x, bases)                              # (B,N,R)
  den = jnp.einsum("bnr,brs->bns", coef, jnp.einsum("bdr,bds->brs", bases, bases))
  return coef * num / (den + NMF_EPS)


def _bases_update(x: jax.Array, bases: jax.Array, coef: jax.Array) -> jax.Array:
  """bases <- bases * (x coef) / (bases (coef^T coef) + eps)."""
  num = jnp.einsum("bnd,bnr->bdr", x, coef)                               # (B,D,R)
  den = jnp.einsum("bdr,brs->bds", bases, jnp.einsum("bnr,bns->brs", coef, coef))
  return bases * num / (den + NMF_EPS)


def nmf2d(x: jax.Array, bases: jax.Array, steps: int, grad: NMFGrad = "unroll",
          mask: jax.Array | None = None) -> jax.Array:
  """NMF2D with MD_S = 1 on a non-negative NHWC map x (B,H,W,C) and initial bases (B,C,R).

  `steps` multiplicative updates (6 train, 7 eval), a final coef update, then x ~ coef @ bases^T.
  grad='one_step' stops the gradient through the loop (Hamburger's one-step gradient).
  Computed in float32 (float64 for float64 inputs). With a (B,H,W,1) `mask` the positions
  outside it take no part: zero in x and in coef, which every update keeps at zero.
  """
  b, h, w, c = x.shape
  dtype = x.dtype
  ft = jnp.promote_types(x.dtype, jnp.float32)
  xf = zero_outside(x, mask).reshape(b, h * w, c).astype(ft)              # (B,N,D)
  bases = bases.astype(ft)
  coef = jax.nn.softmax(jnp.einsum("bnd,bdr->bnr", xf, bases), axis=-1)   # inv_t = 1 in NMF2D
  if mask is not None:
    coef = zero_outside(coef, mask.reshape(b, h * w, 1))
  x_loop = jax.lax.stop_gradient(xf) if grad == "one_step" else xf
  for _ in range(steps):
    coef = _coef_update(x_loop, bases, coef)
    bases = _bases_update(x_loop, bases, coef)
  if grad == "one_step":
    bases, coef = jax.lax.stop_gradient(bases), jax.lax.stop_gradient(coef)
  coef = _coef_update(xf, bases, coef)
  out = jnp.einsum("bnr,bdr->bnd", coef, bases)                           # (B,N,D)
  return out.reshape(b, h, w, c).astype(dtype)


class ConvGN(nn.Module):
  """mmcv ConvModule(1x1, norm=GN(32)): conv (no bias) -> GroupNorm(32, eps 1e-5) [-> ReLU].
  Its GroupNorm statistics are those of the positions inside `pad`'s valid region."""
  features: int
  relu: bool = True
  dtype: Dtype = jnp.float32
  pad: Padding = NO_PADDING

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv1x1(self.features, False, self.dtype, KAIMING, name="conv")(x)
    mask = self.pad.mask(x)
    mask = None if mask is None else jnp.broadcast_to(mask, x.shape)
    x = nn.GroupNorm(num_groups=GN_GROUPS, epsilon=GN_EPS, dtype=self.dtype, name="gn")(x, mask=mask)
    return nn.relu(x) if self.relu else x


class ConvBias(nn.Module):
  """mmcv ConvModule(1x1, norm=None, act=None): a plain biased 1x1 conv under the key `conv`."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Conv1x1(self.features, True, self.dtype, KAIMING, name="conv")(x)


class Hamburger(nn.Module):
  """ham_in (1x1, bias) -> ReLU -> NMF2D -> ham_out (1x1 + GN) ; ReLU(x + ham_out).

  NMF initial bases, in order of precedence: `bases` (B, C, R) if given; in training, a fresh
  draw per image from the 'nmf' rng (mmseg); in inference, the model's fixed bases (C, R), the
  variable `nmf_bases/bases` drawn once at init and stored with every checkpoint, shared by every
  image: one image, one answer, whatever its batch, position or run. NMF and ham_out's
  GroupNorm see only the positions inside `pad`'s valid region.
  """
  rank: int = 16
  train_steps: int = 6
  eval_steps: int = 7
  nmf_grad: NMFGrad = "unroll"
  dtype: Dtype = jnp.float32
  pad: Padding = NO_PADDING

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, bases: jax.Array | None = None) -> jax.Array:
    b, c = x.shape[0], x.shape[-1]
    enjoy = nn.relu(ConvBias(c, self.dtype, name="ham_in")(x))
    bases = self._initial_bases(b, c, train, bases)
    steps = self.train_steps if train else self.eval_steps
    enjoy = nmf2d(enjoy, bases, steps, self.nmf_grad, self.pad.mask(enjoy))
    enjoy = ConvGN(c, relu=False, dtype=self.dtype, pad=self.pad, name="ham_out")(enjoy)
    return nn.relu(x + enjoy)

  def _initial_bases(self, b: int, c: int, train: bool, bases: jax.Array | None) -> jax.Array:
    if self.is_initializing() or self.has_variable(FIXED_BASES, "bases"):
      fixed = self.variable(FIXED_BASES, "bases",
                            lambda: random_bases(self.make_rng("nmf"), 1, c, self.rank)[0]).value
    else:
      fixed = None
    if bases is not None:
      if bases.shape != (b, c, self.rank):
        raise ValueError(f"nmf_bases has shape {bases.shape}, expected {(b, c, self.rank)}")
      return bases
    if train:
      return random_bases(self.make_rng("nmf"), b, c, self.rank)
    if fixed is not None:
      return jnp.broadcast_to(fixed.astype(jnp.float32), (b, c, self.rank))
    if self.has_rng("nmf"):
      return random_bases(self.make_rng("nmf"), b, c, self.rank)
    raise ValueError(f"inference needs NMF bases: the variables lack '{FIXED_BASES}' (pass "
                     "nmf_bases=, an 'nmf' rng, or variables from load_checkpoint/init_variables)")


class LightHamHead(nn.Module):
  """SegNeXt decode head on stages 2-4; returns logits at stage 2's resolution (stride 8). With `pad`
  (the image's padding, padding.py) they are exact inside each image's valid region."""
  num_classes: int = 150
  channels: int = 256
  ham_channels: int = 256
  nmf_rank: int = 16
  dropout: float = 0.1
  nmf_grad: NMFGrad = "unroll"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], *, train: bool,
               nmf_bases: jax.Array | None = None, pad: Padding = NO_PADDING) -> jax.Array:
    strides = STAGE_STRIDES[1:]  # feats are stages 2-4, resized to stage 2's size
    size = feats[0].shape[1:3]
    feats = [feats[0]] + [pad.at(s).clamp(f) for s, f in zip(strides[1:], feats[1:])]
    pad = pad.at(strides[0])
    x = jnp.concatenate([resize_bilinear(f, size).astype(self.dtype) for f in feats], axis=-1)
    x = ConvGN(self.ham_channels, dtype=self.dtype, pad=pad, name="squeeze")(x)
    x = Hamburger(self.nmf_rank, nmf_grad=self.nmf_grad, dtype=self.dtype, pad=pad,
                  name="hamburger")(x, train=train, bases=nmf_bases)
    x = ConvGN(self.channels, dtype=self.dtype, pad=pad, name="align")(x)
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=not train)  # Dropout2d
    logits_dtype = jnp.promote_types(self.dtype, jnp.float32)  # float32, or float64 in float64
    return Conv1x1(self.num_classes, True, logits_dtype, CLS_INIT, name="conv_seg")(x)
