"""Depthwise 2-D convolution (stride 1, 'same' torch padding), three implementations.

- 'shift': a sum of shifted, per-channel-scaled slices (one fused loop), with a custom VJP whose
  backward is again a shift-and-scale conv (input grad) plus one reduction per tap (kernel grad).
  XLA:CPU's grouped convolution runs MSCA's strip kernels far slower than torch's
  (benchmarks/depthwise.py measures each implementation and torch; docs/backends.md).
- 'lax': the library grouped conv (cuDNN, TPU) forward, with a custom VJP: input grad as a
  grouped conv with the flipped kernel, kernel grad as per-tap product-sums. Autodiff would write
  the kernel grad as a `batch_group_count` convolution, as slow as a dense one on CUDA
  (jax-ml/jax#13800).
- 'lax_autodiff': the grouped conv differentiated by JAX (for benchmarks to compare).
'auto' takes the backend's choice (backend.py).
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from segnext_jax import backend

Impl = Literal["auto", "shift", "lax", "lax_autodiff"]
IMPLS = backend.DW_IMPLS


def default_impl() -> str:
  """The backend's choice (backend.py: 'shift' on CPU, 'lax' elsewhere)."""
  return backend.policy().dw_impl


def _pads(kh: int, kw: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((kh // 2, kh // 2), (kw // 2, kw // 2))


def _shift_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Cross-correlation of NHWC `x` with per-channel `kernel` (kh, kw, C), zero 'same' padding."""
  kh, kw, _ = kernel.shape
  h, w = x.shape[1], x.shape[2]
  (pt, pb), (pl, pr) = _pads(kh, kw)
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  out = None
  for i in range(kh):
    for j in range(kw):
      term = xp[:, i:i + h, j:j + w, :] * kernel[i, j]
      out = term if out is None else out + term
  return out


@jax.custom_vjp
def _shift_conv_vjp(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _shift_conv(x, kernel)


def _shift_fwd(x, kernel):
  return _shift_conv(x, kernel), (x, kernel)


def _shift_bwd(res, g):
  x, kernel = res
  kh, kw, _ = kernel.shape
  # d/dx of a correlation with odd symmetric padding is the correlation with the flipped kernel.
  gx = _shift_conv(g, kernel[::-1, ::-1]).astype(x.dtype)
  return gx, _kernel_grad(x, g, kh, kw).astype(kernel.dtype)


# Rows per scan step of the strip-wise kernel gradient: the strip and its taps' products stay in
# cache. Kernels of up to STRIPWISE_MAX_TAPS taps (the MLP's 3x3) use it; MSCA's 5x5 and strips
# take one pass per tap, which measured faster for them. benchmarks/depthwise.py times the
# backward at every kernel shape (docs/performance.md has the measurements behind both values).
KERNEL_GRAD_ROWS = 8
STRIPWISE_MAX_TAPS = 9


def _kernel_grad(x: jax.Array, g: jax.Array, kh: int, kw: int) -> jax.Array:
  """d kernel[i, j, c] = sum over (b, y, x) of xpad[b, y + i, x + j, c] * g[b, y, x, c]."""
  if kh * kw <= STRIPWISE_MAX_TAPS:
    return _kernel_grad_stripwise(x, g, kh, kw)
  b, h, w, c = x.shape
  (pt, pb), (pl, pr) = _pads(kh, kw)
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))

  # One reduction per tap, in a loop: unrolled, XLA materialises every shifted slice (one
  # full-size buffer per tap) instead of fusing it into its reduction.
  def tap(_, t):
    xs = lax.dynamic_slice(xp, (0, t // kw, t % kw, 0), (b, h, w, c))
    return None, jnp.sum(xs * g, axis=(0, 1, 2), dtype=jnp.promote_types(x.dtype, jnp.float32))
  _, taps = lax.scan(tap, None, jnp.arange(kh * kw))
  return taps.reshape(kh, kw, c)


def _kernel_grad_stripwise(x: jax.Array, g: jax.Array, kh: int, kw: int) -> jax.Array:
  """The same sums from a scan over strips of KERNEL_GRAD_ROWS rows of one image: each tap's
  product-sum is taken while the strip sits in cache, instead of a pass over the map per tap.
  Rows past the map are zero in g: they add 0."""
  b, h, w, c = x.shape
  rows = min(KERNEL_GRAD_ROWS, h)
  n = -(-h // rows)
  (pt, pb), (pl, pr) = _pads(kh, kw)
  extra = n * rows - h
  xp = jnp.pad(x, ((0, 0), (pt, pb + extra), (pl, pr), (0, 0)))
  gp = jnp.pad(g, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else g
  acc_t = jnp.promote_types(x.dtype, jnp.float32)

  def strip(acc, t):
    bi, y0 = t // n, (t % n) * rows
    xs = lax.dynamic_slice(xp, (bi, y0, 0, 0), (1, rows + kh - 1, w + kw - 1, c))
    gs = lax.dynamic_slice(gp, (bi, y0, 0, 0), (1, rows, w, c))
    taps = [jnp.sum(xs[:, i:i + rows, j:j + w] * gs, axis=(0, 1, 2), dtype=acc_t)
            for i in range(kh) for j in range(kw)]
    return acc + jnp.stack(taps), None

  acc, _ = lax.scan(strip, jnp.zeros((kh * kw, c), acc_t), jnp.arange(b * n))
  return acc.reshape(kh, kw, c)


_shift_conv_vjp.defvjp(_shift_fwd, _shift_bwd)


def _grouped_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The library's depthwise conv: `kernel` (kh, kw, 1, C), feature_group_count = C."""
  kh, kw, _, c = kernel.shape
  return lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=_pads(kh, kw),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


@jax.custom_vjp
def _grouped_conv_vjp(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _grouped_conv(x, kernel)


def _grouped_fwd(x, kernel):
  return _grouped_conv(x, kernel), (x, kernel)


def _grouped_bwd(res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  gx = _grouped_conv(g, kernel[::-1, ::-1]).astype(x.dtype)
  return gx, _kernel_grad_taps(x, g, kh, kw).reshape(kernel.shape).astype(kernel.dtype)


def _kernel_grad_taps(x: jax.Array, g: jax.Array, kh: int, kw: int) -> jax.Array:
  """d kernel[i, j, c] as kh*kw sibling product-sums over (b, y, x), unrolled: on GPU each is a
  fused slice-multiply-reduce (sharing inputs, XLA may merge them); accumulated in float32."""
  h, w = x.shape[1], x.shape[2]
  (pt, pb), (pl, pr) = _pads(kh, kw)
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  acc = jnp.promote_types(x.dtype, jnp.float32)
  taps = [jnp.sum(xp[:, i:i + h, j:j + w] * g, axis=(0, 1, 2), dtype=acc)
          for i in range(kh) for j in range(kw)]
  return jnp.stack(taps).reshape(kh, kw, -1)


_grouped_conv_vjp.defvjp(_grouped_fwd, _grouped_bwd)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                     impl: Impl = "auto") -> jax.Array:
  """Depthwise conv, NHWC input, flax-layout kernel (kh, kw, 1, C), torch 'same' padding (k // 2).

  Kernel sizes must be odd (as all of SegNeXt's are), so output size equals input size.
  """
  kh, kw, one, c = kernel.shape
  if one != 1 or kh % 2 == 0 or kw % 2 == 0 or x.shape[-1] != c:
    raise ValueError(f"depthwise_conv2d: bad kernel {kernel.shape} for input {x.shape}")
  impl = default_impl() if impl == "auto" else impl
  kernel = kernel.astype(x.dtype)
  if impl == "shift":
    y = _shift_conv_vjp(x, kernel[:, :, 0, :])
  elif impl == "lax":
    y = _grouped_conv_vjp(x, kernel)
  elif impl == "lax_autodiff":
    y = _grouped_conv(x, kernel)
  else:
    raise ValueError(f"unknown depthwise impl {impl!r}; expected 'auto' or one of {IMPLS}")
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y
