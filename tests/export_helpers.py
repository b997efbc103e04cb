"""Helpers of test_export.py: the JAX reference, a real padded JPEG, mmseg built from a .pth."""
from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def jax_reference(model, variables: dict):
  """x -> `model.apply(variables, x, train=False)`, the numbers every export must reproduce
  (jitted, with the grouped-conv depthwise backend: same numbers, XLA:CPU compiles it ~4x faster)."""
  import jax
  fn = jax.jit(lambda v, x: model.clone(dw_impl="lax").apply(v, x, train=False))
  return lambda x: np.asarray(fn(variables, x))


def random_variables(model, seed: int = 0) -> dict:
  """Non-trivial variables for `model` without compiling its init: N(0, 0.3) tensors, BN
  variances and NMF bases in [0.5, 1.5)."""
  import jax
  from segnext_jax.model import abstract_variables
  rng = np.random.default_rng(seed)
  def draw(path, s):
    positive = path[0].key == "nmf_bases" or path[-1].key == "var"
    return (rng.uniform(0.5, 1.5, s.shape) if positive else 0.3 * rng.standard_normal(s.shape)
            ).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract_variables(model))


def padded_jpeg(path: Path) -> np.ndarray:
  """RGB, (x - mean) / std, zero-padded bottom/right to multiples of 32: (1, H', W', 3)."""
  from segnext_jax.data.files import read_image
  from segnext_jax.data.transforms import normalize
  x = normalize(read_image(path))
  h, w = x.shape[:2]
  x = np.pad(x, ((0, -h % 32), (0, -w % 32), (0, 0)))
  return x[None]


def assert_same_classes(got: np.ndarray, want: np.ndarray, tol: float) -> None:
  """Equal argmax class maps, except where the reference's top-2 margin is within the tolerance."""
  top2 = np.sort(want, axis=-1)[..., -2:]
  decided = top2[..., 1] - top2[..., 0] > 2 * tol
  same = got.argmax(-1) == want.argmax(-1)
  assert decided.mean() > 0.99 and same[decided].all(), (decided.mean(), (~same[decided]).sum())


def mmseg_from_pth(pth: Path):
  """(mmseg EncoderDecoder built from the file's meta['cfg'], loaded with strict=True, the file)."""
  import torch
  from mmengine.config import Config
  from segnext_jax.mmseg_reference import stub_mmcv_ops
  stub_mmcv_ops()
  from mmseg.registry import MODELS
  from mmseg.utils import register_all_modules
  register_all_modules()
  obj = torch.load(pth, map_location="cpu", weights_only=True)
  segmentor = MODELS.build(Config.fromstring(obj["meta"]["cfg"], ".py").model)
  segmentor.load_state_dict(obj["state_dict"], strict=True)
  return segmentor.eval(), obj


def mmseg_logits(segmentor, obj: dict, x: np.ndarray) -> np.ndarray:
  """Stride-8 logits (NHWC) of mmseg's segmentor, NMF started from the file's stored bases."""
  import torch
  from segnext_jax.mmseg_reference import fix_nmf_bases
  fix_nmf_bases(segmentor.decode_head, obj["meta"]["segnext_jax"]["nmf_bases"])  # (C, R)
  with torch.no_grad():
    feats = segmentor.extract_feat(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    return segmentor.decode_head(feats).numpy().transpose(0, 2, 3, 1)
