"""Shared fixtures: the mmseg 1.x torch reference and random mmseg-layout checkpoints."""
from __future__ import annotations

import pytest

from mmseg_reference import (TorchReference, mmseg_segmentor_modules,  # noqa: F401 (re-export)
                                 segmentor_state_dict)

FP32_ATOL = 1e-4  # on O(1) activations, float32, whole network


@pytest.fixture(scope="session")
def t_variables():
  """Random SegNeXt-T variables (initialised once per session: XLA:CPU compiles init slowly)."""
  import jax
  from segnext_jax import init_variables, segnext
  return init_variables(segnext("t"), jax.random.key(0))


@pytest.fixture(scope="session")
def torch_ref_t(tmp_path_factory):
  return TorchReference("t", tmp_path_factory.mktemp("ref_t"))


# A tiny SegNeXt (flax _ResNet1 idea): fast to compile, same code paths as T. Passed as
# segnext("t", **TINY) / TrainConfig(model_overrides=TINY) / --model-overrides JSON.
TINY = dict(embed_dims=(8, 16, 32, 32), depths=(1, 1, 1, 1), head_channels=32)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> dict:
  """Share compiled programs between the runs of one session (e.g. train, then resume); the
  returned environment gives a subprocess the same cache (as train.py/eval.py take it from JAX)."""
  import jax
  path = str(tmp_path_factory.mktemp("jax_cache"))
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return {"JAX_COMPILATION_CACHE_DIR": path}
