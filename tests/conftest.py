"""Shared fixtures: the mmseg 1.x torch reference and random mmseg-layout checkpoints."""
from __future__ import annotations

import pytest

from segnext_jax.testing import (TorchReference, mmseg_segmentor_modules,  # noqa: F401 (re-export)
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
