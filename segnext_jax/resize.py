"""torch's bilinear resize (F.interpolate, align_corners=False, no antialiasing), in one place.

Three forms of the same arithmetic: `resize_bilinear` (in the graph, the head's feature
alignment), `bilinear_matrix` (a dense (out, in) operator: the loss's upsampling and its
adjoint), and `bilinear_taps` (two source indices and a weight per output: eval's gather resize).
"""
from __future__ import annotations

import jax
import numpy as np

IGNORE_INDEX = 255  # label value that counts neither in the loss nor in the metrics (mmseg)


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
