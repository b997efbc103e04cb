"""Padded inference (segnext_jax/padding.py): logits inside each image's valid region equal the
unpadded image's, whatever lies in the padding; buckets; the composed view -> original resize."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from segnext_jax import segnext
from segnext_jax.eval import CompiledForward, InferenceConfig, to_original
from segnext_jax.padding import bucket, clamp_to_valid, stage_mask
from conftest import TINY
from test_eval_lib import counting_segmenter

ATOL = 2e-6  # float32 rounding: logits are O(0.5); a leak across the border moves them by 1e-2


def test_bucket_sizes():
  assert [bucket(n, 4) for n in (32, 256, 288, 512, 544, 704, 1056, 1216, 2048)] == \
      [32, 256, 320, 512, 640, 768, 1280, 1280, 2048]
  assert [bucket(n, 1) for n in (96, 160, 544)] == [128, 256, 1024]
  assert [bucket(n, 0) for n in (96, 544)] == [96, 544]
  for per_octave in (1, 2, 4, 8):
    sizes = {bucket(n, per_octave) for n in range(32, 4097, 32)}
    for n in range(32, 4097, 32):
      b = bucket(n, per_octave)
      assert b % 32 == 0 and n <= b < n + max(32, n / per_octave), (n, per_octave)
    assert len(sizes) <= 8 + 7 * per_octave  # few sizes per octave, whatever the spread


def test_masks_and_edge_clamp():
  valid = np.array([[64, 32], [32, 96]], np.int32)
  m = np.asarray(stage_mask(valid, (2, 4, 6, 1), 16))[..., 0]
  rows, cols = np.arange(4)[:, None], np.arange(6)[None, :]
  np.testing.assert_array_equal(m[0], (rows < 4) & (cols < 2))
  np.testing.assert_array_equal(m[1], (rows < 2) & (cols < 6))
  x = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6, 1)
  c = np.asarray(clamp_to_valid(x, valid, 16))
  np.testing.assert_array_equal(c[0, :, :2], x[0, :, :2])
  np.testing.assert_array_equal(c[0, :, 2:], np.repeat(x[0, :, 1:2], 4, axis=1))
  np.testing.assert_array_equal(c[1, 2:], np.repeat(x[1, 1:2], 2, axis=0))


def test_padded_logits_equal_unpadded_ones(tiny_variables):
  """Three images of different sizes in one padded batch, noise in the padding: each image's
  logits match its own unpadded forward (backbone depthwise convs, GroupNorm, NMF, head resize)."""
  model = segnext("t", **TINY, dw_impl="lax")  # masks act before the conv: any impl; lax compiles fastest
  rng = np.random.default_rng(0)
  sizes = [(96, 160), (64, 64), (128, 96)]
  images = [rng.standard_normal((*s, 3)).astype(np.float32) for s in sizes]
  batch = rng.standard_normal((3, 192, 224, 3)).astype(np.float32) * 3  # noise, not zeros
  for i, x in enumerate(images):
    batch[i, :x.shape[0], :x.shape[1]] = x
  out = np.asarray(jax.jit(lambda v, x, val: model.apply(v, x, valid=val))(
      tiny_variables, batch, np.array(sizes, np.int32)))
  unmasked = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(tiny_variables, batch))
  forward = jax.jit(lambda v, x: model.apply(v, x))
  for i, x in enumerate(images):
    ref = np.asarray(forward(tiny_variables, x[None]))[0]
    h, w = ref.shape[:2]
    np.testing.assert_allclose(out[i, :h, :w], ref, atol=ATOL, rtol=0)
    assert np.abs(unmasked[i, :h, :w] - ref).max() > 100 * ATOL  # the masks are what does it


@pytest.mark.parametrize("flip", [False, True])
def test_composed_resize_is_mmseg_two_step(flip):
  """Stride-8 logits -> padded input size -> crop -> (flip back) -> original size, as mmseg's
  head and postprocess_result do it, against torch's own interpolate."""
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 12, 16, 5)).astype(np.float32)  # bucket 96x128 at stride 8
  padded, valid, ori = (64, 96), (57, 90), (41, 77)
  t = torch.from_numpy(logits[1, :8, :12].transpose(2, 0, 1))[None]
  t = torch.nn.functional.interpolate(t, size=padded, mode="bilinear", align_corners=False)
  t = t[..., :valid[0], :valid[1]]
  t = t.flip(-1) if flip else t
  ref = torch.nn.functional.interpolate(t, size=ori, mode="bilinear", align_corners=False)
  ref = ref[0].numpy().transpose(1, 2, 0)
  got = to_original(logits[1], valid, ori, flip, padded=padded)
  np.testing.assert_allclose(got, ref, atol=1e-5)  # torch rounds twice in float32


def test_tta_in_coarse_buckets_equals_exact_shapes(tiny_variables):
  """TTA views padded into coarse buckets (1 per octave) give the scores of exact /32 shapes,
  with fewer programs."""
  model = segnext("t", **TINY, dw_impl="lax")  # masks act before the conv: any impl; lax compiles fastest
  img = (np.random.default_rng(3).random((70, 90, 3)) * 255).astype(np.uint8)
  runs = {}
  for per_octave in (0, 1):
    traced = []
    seg = counting_segmenter(model, InferenceConfig(tta=True, buckets_per_octave=per_octave), traced)
    runs[per_octave] = seg.scores(tiny_variables, img), sorted(set(traced))
  (exact, exact_shapes), (coarse, coarse_shapes) = runs[0], runs[1]
  assert len(coarse_shapes) < len(exact_shapes)
  assert any(s not in exact_shapes for s in coarse_shapes)  # views really ran padded
  np.testing.assert_allclose(coarse, exact, atol=2e-6, rtol=0)


def test_bad_bucket_settings_are_one_line_errors():
  with pytest.raises(ValueError, match="buckets_per_octave must be >= 0"):
    InferenceConfig(buckets_per_octave=-1)
  forward = CompiledForward(jax.jit(lambda v, x, valid: x), InferenceConfig())
  with pytest.raises(ValueError, match=r"view 0 has shape \(40, 64\).*multiples of 32"):
    forward({}, [np.zeros((40, 64, 3), np.float32)], np.array([[40, 64]], np.int32))
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    InferenceConfig(batch_size=0)
