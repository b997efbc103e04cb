"""MSCAN, the multi-scale convolutional attention backbone of SegNeXt (paper Sec. 3.1, Fig. 2).

Mirrors mmseg 1.x `mmseg/models/backbones/mscan.py` in NHWC; submodule names equal mmseg's
attribute names so the checkpoint key map is almost the identity.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segnext_jax import backend
from segnext_jax.depthwise import Impl, depthwise_conv2d
from segnext_jax.layers import conv
from segnext_jax.padding import NO_PADDING, Padding

BN_EPS = 1e-5
LN_EPS = 1e-5
LAYER_SCALE_INIT = 1e-2
Dtype = Any
ConvDef = Callable[..., nn.Module]  # (kernel_size, name=...) -> a depthwise conv module
DW_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # fan_in = kh*kw for depthwise
# Each stage's map stride in input pixels: the stem downsamples by 4, each later patch embed by 2.
STAGE_STRIDES = (4, 8, 16, 32)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as torch's nn.GELU; flax's default is the tanh approximation."""
  return nn.gelu(x, approximate=False)


@jax.custom_vjp
def gradient_boundary(x: jax.Array) -> jax.Array:
  """Identity whose cotangent is materialised: the backward passes it through a conditional,
  which XLA cannot fuse across. Without it XLA:CPU fuses the residual stream's elementwise
  gradient chain through every block of a stage into each consumer (fusions whose operands grow
  with the stage's depth, docs/backends.md), a cost that grows with the square of the depth.
  Applied where the backend's policy says (backend.py: the CPU)."""
  return x


def _boundary_fwd(x):
  return x, None


def _boundary_bwd(_, g):
  keep = jnp.isfinite(g.reshape(-1)[0])  # a run-time predicate: the conditional stays
  return (jax.lax.cond(keep, lambda t: t, lambda t: t + 0, g),)


gradient_boundary.defvjp(_boundary_fwd, _boundary_bwd)


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d semantics: momentum 0.1, running_var updated with the UNBIASED variance.

  Statistics are computed in float32 (float64 for float64 inputs) over every non-channel axis of
  the (global, under jit) batch.
  """
  momentum: float = 0.1
  epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if train:
      xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if not self.is_initializing():
        n = x.size // c
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        unbiased = var * (n / max(n - 1, 1))
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    return x * mul.astype(x.dtype) + add.astype(x.dtype)


class DepthwiseConv(nn.Module):
  """Depthwise conv with bias; kernel stored as flax (kh, kw, 1, C), see `depthwise.py`. Its
  input is zero past `pad`'s valid region (padded inference, padding.py), as past a border."""
  kernel_size: tuple[int, int]
  impl: Impl = "auto"
  dtype: Dtype = jnp.float32
  pad: Padding = NO_PADDING

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kernel = self.param("kernel", DW_INIT, (*self.kernel_size, 1, c))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return depthwise_conv2d(self.pad.zero(x.astype(self.dtype)), kernel, bias, impl=self.impl)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (rng stream 'dropout')."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class StemConv(nn.Module):
  """Stage-1 stem: conv3x3/2 -> BN -> GELU -> conv3x3/2 -> BN (torch keys proj.0/1/3/4)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = conv(self.features // 2, 3, 2, name="proj_0", dtype=self.dtype)(x)
    x = gelu(BatchNorm(name="proj_1")(x, train=train))
    x = conv(self.features, 3, 2, name="proj_3", dtype=self.dtype)(x)
    return BatchNorm(name="proj_4")(x, train=train)


class OverlapPatchEmbed(nn.Module):
  """Stages 2-4 downsampling: conv3x3/2 -> BN."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = conv(self.features, 3, 2, name="proj", dtype=self.dtype)(x)
    return BatchNorm(name="norm")(x, train=train)


class MSCA(nn.Module):
  """Multi-scale conv attention (mmseg `MSCAAttention`): dw5x5, three strip branches, 1x1 mix, gate.

  No sigmoid: the mixed features multiply the input directly. `dw` makes its depthwise convs.
  """
  dw: ConvDef
  strip_sizes: Sequence[int] = (7, 11, 21)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, u: jax.Array) -> jax.Array:
    attn = self.dw((5, 5), name="conv0")(u)
    total = attn
    for i, k in enumerate(self.strip_sizes):  # 1xk then kx1, named conv{i}_1 / conv{i}_2
      total = total + self.dw((k, 1), name=f"conv{i}_2")(self.dw((1, k), name=f"conv{i}_1")(attn))
    mixed = conv(u.shape[-1], 1, name="conv3", dtype=self.dtype)(total)
    return mixed * u


class MSCASpatialAttention(nn.Module):
  """proj_1 -> GELU -> MSCA -> proj_2, plus an inner residual."""
  dw: ConvDef
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    y = gelu(conv(c, 1, name="proj_1", dtype=self.dtype)(x))
    y = MSCA(self.dw, dtype=self.dtype, name="spatial_gating_unit")(y)
    return conv(c, 1, name="proj_2", dtype=self.dtype)(y) + x


class Mlp(nn.Module):
  """fc1 1x1 -> depthwise 3x3 -> GELU -> fc2 1x1 (dropout is 0 in every SegNeXt config)."""
  hidden: int
  dw: ConvDef
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    y = conv(self.hidden, 1, name="fc1", dtype=self.dtype)(x)
    y = gelu(self.dw((3, 3), name="dwconv")(y))
    return conv(c, 1, name="fc2", dtype=self.dtype)(y)


class MSCABlock(nn.Module):
  """Pre-norm block: x += DropPath(ls1 * Attn(BN1 x)); x += DropPath(ls2 * Mlp(BN2 x)).
  Its depthwise convs (impl, dtype, and `pad`: its stage's padding) are made here."""
  mlp_ratio: float
  drop_path: float = 0.0
  impl: Impl = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, pad: Padding = NO_PADDING) -> jax.Array:
    c = x.shape[-1]
    ls1 = self.param("layer_scale_1", nn.initializers.constant(LAYER_SCALE_INIT), (c,))
    ls2 = self.param("layer_scale_2", nn.initializers.constant(LAYER_SCALE_INIT), (c,))
    dw = functools.partial(DepthwiseConv, impl=self.impl, dtype=self.dtype, pad=pad)
    y = MSCASpatialAttention(dw, self.dtype, name="attn")(BatchNorm(name="norm1")(x, train=train))
    x = x + DropPath(self.drop_path)(ls1.astype(y.dtype) * y, train=train)
    y = BatchNorm(name="norm2")(x, train=train)
    y = Mlp(int(c * self.mlp_ratio), dw, self.dtype, name="mlp")(y)
    return x + DropPath(self.drop_path)(ls2.astype(y.dtype) * y, train=train)


class MSCAN(nn.Module):
  """The MSCAN backbone; returns the four stage maps (STAGE_STRIDES), NHWC; with `pad`
  (padded inference, padding.py) they are exact inside each image's valid region. In inference
  every block has drop path 0 (DropPath is the identity there), no remat and no gradient
  boundary (both act on the backward only): a stage's blocks are one module definition, one
  program of StagedForward."""
  embed_dims: Sequence[int] = (32, 64, 160, 256)
  depths: Sequence[int] = (3, 3, 5, 2)
  mlp_ratios: Sequence[float] = (8, 8, 4, 4)
  drop_path: float = 0.1
  remat: bool = False
  impl: Impl = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, pad: Padding = NO_PADDING) -> list[jax.Array]:
    rates = np.linspace(0.0, self.drop_path if train else 0.0, sum(self.depths)).tolist()
    block_cls = nn.remat(MSCABlock, static_argnums=(2,)) if self.remat and train else MSCABlock
    outs, cur = [], 0
    boundary = gradient_boundary if train and backend.policy().gradient_boundary else (lambda t: t)
    x = x.astype(self.dtype)
    for s, (dim, depth, ratio) in enumerate(zip(self.embed_dims, self.depths, self.mlp_ratios), 1):
      if s == 1:
        x = StemConv(dim, self.dtype, name="patch_embed1")(x, train=train)
      else:
        x = OverlapPatchEmbed(dim, self.dtype, name=f"patch_embed{s}")(x, train=train)
      for i in range(depth):
        x = block_cls(ratio, rates[cur + i], self.impl, self.dtype, name=f"block{s}_{i}")(
            x, train, pad.at(STAGE_STRIDES[s - 1]))
        x = boundary(x)
      cur += depth
      x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name=f"norm{s}")(x)
      self.sow("intermediates", f"stage{s}", x)
      outs.append(x)
    return outs
