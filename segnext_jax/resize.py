"""torch's bilinear resize (F.interpolate, align_corners=False, no antialiasing), in one place.

Three forms of the same arithmetic: `resize_bilinear` (in the graph, the head's feature
alignment), `bilinear_matrix` (a dense (out, in) operator: the loss cuts it into row chunks)
and its banded form `Band` (a few source indices and weights per output: the loss's W-axis
upsampling and its adjoint, gathers instead of matmuls that read every source column), and
`bilinear_taps` (two source indices and a weight per output: eval's gather resize).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def bilinear_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """torch's bilinear source taps along one axis: output i reads inputs i0[i] and i1[i] with
  weights 1 - lam[i] and lam[i]."""
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, (src - i0).astype(np.float32)


def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
  """(n_out, n_in) weights of torch's bilinear resize along one axis."""
  i0, i1, lam = bilinear_taps(n_out, n_in)
  m = np.zeros((n_out, n_in), np.float32)
  np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
  np.add.at(m, (np.arange(n_out), i1), lam)
  return m


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of NHWC `x` to `size` (= torch F.interpolate, align_corners=False)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)


@dataclasses.dataclass(frozen=True)
class Band:
  """A linear map along one axis whose output i reads inputs start[i] .. start[i] + width - 1
  with weights[i]: the banded form of a dense (n_out, n_in) matrix with contiguous row support."""
  start: np.ndarray    # (n_out,) int32
  weights: np.ndarray  # (n_out, width) float32

  @classmethod
  def from_matrix(cls, m: np.ndarray, width: int | None = None) -> "Band":
    """The band of `m`, `width` wide (at least its widest row support; default: exactly that)."""
    start, need = support_windows(m != 0)
    if width is not None and width < need:
      raise ValueError(f"a band of width {width} cannot hold rows that use {need} columns")
    width = need if width is None else width
    start = np.minimum(start, m.shape[1] - width)
    cols = start[:, None] + np.arange(width)
    return cls(start.astype(np.int32), np.take_along_axis(m, cols, 1).astype(np.float32))

  def apply(self, x: jax.Array, axis: int) -> jax.Array:
    """y[.., i, ..] = sum_l weights[i, l] * x[.., start[i] + l, ..] along `axis`."""
    shape = [1] * x.ndim
    shape[axis] = -1
    out = None
    for l in range(self.weights.shape[1]):
      term = jnp.take(x, self.start + l, axis=axis) * self.weights[:, l].astype(x.dtype).reshape(shape)
      out = term if out is None else out + term
    return out


def support_windows(used: np.ndarray) -> tuple[np.ndarray, int]:
  """For a boolean (rows, cols) map of the columns each row uses: one window width that covers
  every row's used columns, and each row's window start, kept inside [0, cols)."""
  any_used = used.any(1)
  first = np.where(any_used, used.argmax(1), 0)
  last = np.where(any_used, used.shape[1] - 1 - used[:, ::-1].argmax(1), 0)
  width = int((last - first).max()) + 1
  return np.minimum(first, used.shape[1] - width), width


def bilinear_bands(n_out: int, n_in: int) -> tuple[Band, Band]:
  """torch's bilinear resize along one axis (n_in -> n_out, 2 taps) and its adjoint (n_out ->
  n_in, about 2 n_out / n_in + 2 taps), both banded."""
  m = bilinear_matrix(n_out, n_in)
  return Band.from_matrix(m), Band.from_matrix(np.ascontiguousarray(m.T))
