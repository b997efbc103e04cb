"""Convolutions shared by the backbone and the head, with torch's layouts and semantics."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Init = Callable[..., jax.Array]
# mmseg MSCAN.init_weights: conv kernels ~ N(0, 2 / fan_out), fan_out = kh*kw*out/groups.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv1x1(nn.Module):
  """A 1x1 conv (kernel stored as flax's (1, 1, Cin, Cout)) computed as a matmul, which XLA:CPU
  runs faster than the equivalent convolution (docs/performance.md; benchmarks/op_profile.py
  shows the 1x1 convs' share of a step)."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Init = CONV_INIT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features))
    y = jnp.einsum("...c,cd->...d", x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


def conv(features: int, kernel: int, stride: int = 1, *, bias: bool = True, name: str,
         dtype: Dtype = jnp.float32) -> nn.Module:
  """A torch-style Conv2d: explicit symmetric padding k // 2 (never 'SAME'); 1x1 as a matmul."""
  if kernel == 1 and stride == 1:
    return Conv1x1(features, bias, dtype, name=name)
  p = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((p, p), (p, p)),
                 use_bias=bias, dtype=dtype, kernel_init=CONV_INIT, name=name)
