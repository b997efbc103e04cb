"""StagedForward: the inference forward as per-part programs equals model.apply, lowers each
distinct part once, compiling ahead leaves the call nothing to compile, and it is what
Segmenter.for_model runs in whole mode."""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, xla_programs
from segnext_jax import segnext
from segnext_jax.eval import InferenceConfig, Segmenter
from segnext_jax.model import fixed_bases, init_variables
from segnext_jax.staged import StagedForward

PARTS = ("StemConv", "OverlapPatchEmbed", "MSCABlock", "LayerNorm", "LightHamHead")


@pytest.fixture(autouse=True)
def no_programs_in_memory():
  """Each test counts the programs it builds: none traced or compiled before it in this process
  (StagedForward's part programs are the process's; jax.clear_caches empties them)."""
  jax.clear_caches()


def parts_built(names: list[str]) -> collections.Counter:
  """How many programs of each kind of part among `names` (jit(MSCABlock), ...)."""
  return collections.Counter(p for n in names for p in PARTS if n == f"jit({p})")


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


def test_each_distinct_part_lowered_once_and_compiling_ahead_leaves_the_call_nothing():
  """Whatever the depths, one program per stage's blocks; after lower(...).compile() the call
  at those shapes builds no program (what Segmenter's background warm-up relies on; committed
  variables: the next test)."""
  model = segnext("t", depths=(2, 1, 4, 2), embed_dims=(16, 32, 64, 64), head_channels=64,
                  dw_impl="lax")
  variables = {**init_variables(model, jax.random.key(1)), **fixed_bases(model, 0)}
  staged = StagedForward(model)
  images = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
  lowered = staged.lower(variables, images, jax.ShapeDtypeStruct((1, 2), jnp.int32))
  assert len(lowered.parts) == 1 + 3 + 4 + 4 + 1  # stem, embeds, one block per stage, norms, head
  with xla_programs() as built:
    lowered.compile()
  assert parts_built(built) == {"StemConv": 1, "OverlapPatchEmbed": 3, "MSCABlock": 4,
                                "LayerNorm": 4, "LightHamHead": 1}
  x = np.random.default_rng(2).standard_normal(images.shape).astype(np.float32)
  valid = np.array([[64, 96]], np.int32)
  with xla_programs() as built:
    got = staged(variables, x, valid)
  assert built == []
  ref = jax.jit(lambda v, x, val: model.apply(v, x, valid=val))(variables, x, valid)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6, rtol=0)


def test_segmenter_for_model_runs_the_staged_parts(tiny_variables):
  """On the CPU (backend policy staged_inference) whole-mode evaluation compiles the parts, one
  program per kind and shape, not the network as one program."""
  model = segnext("t", **TINY, dw_impl="lax")
  img = (np.random.default_rng(3).random((70, 90, 3)) * 255).astype(np.uint8)
  with xla_programs() as built:
    segmenter = Segmenter.for_model(model, InferenceConfig(scale=(128, 64)))
    scores = segmenter.scores(tiny_variables, img)
  assert scores.shape == (70, 90, 150)
  assert parts_built(built) == {"StemConv": 1, "OverlapPatchEmbed": 3, "MSCABlock": 4,
                                "LayerNorm": 4, "LightHamHead": 1}
  # another Segmenter of the same model (eval.py's main run again in this process): every part
  # program is found compiled, and the scores are the same
  with xla_programs() as built:
    again = Segmenter.for_model(model, InferenceConfig(scale=(128, 64))).scores(tiny_variables, img)
  assert parts_built(built) == {}
  np.testing.assert_array_equal(again, scores)


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "jit"])
def test_compiled_forward_warms_without_running_and_the_call_builds_nothing(staged):
  """CompiledForward.warm compiles a canvas from abstract inputs (no forward is run); the call
  then finds every program, with committed variables (checkpoint.load's)."""
  from segnext_jax.eval.compiled import CompiledForward
  from segnext_jax.eval.scores import model_apply
  model = segnext("t", depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 64), head_channels=64,
                  dw_impl="lax")
  variables = jax.device_put({**init_variables(model, jax.random.key(1)), **fixed_bases(model, 0)},
                             jax.devices()[0])
  inner = StagedForward(model) if staged else jax.jit(model_apply(model))
  runs = []

  class Counted:  # the forward, counting calls; lower() passes through
    def __call__(self, *args):
      runs.append(1)
      return inner(*args)

    def lower(self, *args):
      return inner.lower(*args)

  forward = CompiledForward(Counted(), InferenceConfig(batch_size=2))
  with xla_programs() as built:
    forward.warm(variables, (2, 64, 96)).result()
  assert runs == [] and len(built) == (13 if staged else 1)
  x = np.random.default_rng(0).standard_normal((64, 96, 3)).astype(np.float32)
  with xla_programs() as built:
    got = forward(variables, [x], np.array([[64, 96]], np.int32), batch=2)
  assert built == [] and runs == [1]
  ref = jax.jit(lambda v, x, hw: model.apply(v, x, valid=hw))(variables, x[None],
                                                                np.array([[64, 96]], np.int32))
  np.testing.assert_allclose(np.asarray(got[:1]), np.asarray(ref), atol=2e-6, rtol=0)
