"""StagedForward: the inference forward as per-part programs equals model.apply, compiles each
stage's blocks once, and is what Segmenter.for_model runs in whole mode."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from conftest import TINY
from segnext_jax import segnext
from segnext_jax.eval import Segmenter
from segnext_jax.model import fixed_bases, init_variables
from segnext_jax.staged import StagedForward


def test_staged_equals_model_apply_with_and_without_padding(tiny_variables):
  model = segnext("t", **TINY, dw_impl="lax")  # the parts are the model's modules: any impl; lax compiles fast
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 96, 128, 3)).astype(np.float32)
  valid = np.array([[96, 96], [64, 128]], np.int32)
  staged = StagedForward(model)
  for v in (None, valid):
    ref = jax.jit(lambda var, x, val: model.apply(var, x, valid=val))(tiny_variables, x, v)
    np.testing.assert_allclose(np.asarray(staged(tiny_variables, x, v)), np.asarray(ref),
                               atol=2e-6, rtol=0)


def test_one_program_per_stage_whatever_the_depth():
  model = segnext("t", depths=(2, 1, 4, 2), embed_dims=(16, 32, 64, 64), head_channels=64,
                  dw_impl="lax")
  variables = {**init_variables(model, jax.random.key(1)), **fixed_bases(model, 0)}
  staged = StagedForward(model)
  images = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
  lowered = staged.lower(variables, images, jax.ShapeDtypeStruct((1, 2), jnp.int32))
  assert len(lowered.parts) == 1 + 3 + 4 + 4 + 1  # stem, embeds, one block per stage, norms, head
  lowered.compile()
  x = np.random.default_rng(2).standard_normal(images.shape).astype(np.float32)
  ref = jax.jit(lambda v, x, val: model.apply(v, x, valid=val))(variables, x, np.array([[64, 96]], np.int32))
  np.testing.assert_allclose(np.asarray(staged(variables, x, np.array([[64, 96]], np.int32))),
                             np.asarray(ref), atol=2e-6, rtol=0)


def test_predictor_for_model_runs_staged():
  model = segnext("t")
  assert isinstance(Segmenter.for_model(model).forward.fn, StagedForward)
