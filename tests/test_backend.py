"""The per-backend table (backend.py) and the GPU/TPU path on the CPU: the library depthwise conv's
custom VJP equals autodiff without a batch_group_count convolution, and the plain-XLA policy
gives the CPU policy's numbers (train step, loss, inference)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, tiny_train_batch, tiny_train_model, train_loss_grads
from segnext_jax import backend
from segnext_jax.depthwise import depthwise_conv2d

# MSCA's depthwise kernels (dw5x5, three strip pairs) and the MLP's 3x3
MSCA_KERNELS = [(5, 5), (1, 7), (7, 1), (1, 11), (11, 1), (1, 21), (21, 1), (3, 3)]
PLAIN = dict(dw_impl="lax", gradient_boundary=False, chunked_loss=False, staged_inference=False)


def _dw_grads(impl: str, x, k, b, g):
  f = lambda x, k, b: depthwise_conv2d(x, k, b, impl=impl)
  y, vjp = jax.vjp(f, x, k, b)
  return (y, *vjp(g.astype(y.dtype)))


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("kh,kw", MSCA_KERNELS)
def test_lax_vjp_equals_autodiff_fp32_and_bf16(kh, kw):
  rng = np.random.default_rng(kh * 100 + kw)
  x = rng.standard_normal((2, 13, 23, 8)).astype(np.float32)
  k = rng.standard_normal((kh, kw, 1, 8)).astype(np.float32)
  b = rng.standard_normal(8).astype(np.float32)
  g = rng.standard_normal((2, 13, 23, 8)).astype(np.float32)
  ours = jax.jit(lambda *a: _dw_grads("lax", *a))(x, k, b, g)
  ref = jax.jit(lambda *a: _dw_grads("lax_autodiff", *a))(x, k, b, g)
  shift = jax.jit(lambda *a: _dw_grads("shift", *a))(x, k, b, g)
  for name, o, r, s in zip(("y", "dx", "dkernel", "dbias"), ours, ref, shift):
    assert o.shape == r.shape and o.dtype == r.dtype, name
    assert _rel(o, r) < 1e-6, (name, _rel(o, r))
    assert _rel(s, r) < 1e-6, (name, _rel(s, r))
  # bf16 inputs: within bf16 rounding of the float32 gradients of the same (rounded) inputs
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  xb, kb, gb = bf(x), bf(k), bf(g)
  ours = jax.jit(lambda *a: _dw_grads("lax", *a))(xb, kb, b, gb)
  exact = jax.jit(lambda *a: _dw_grads("lax_autodiff", *a))(
      *(jnp.asarray(a, jnp.float32) for a in (xb, kb)), b, jnp.asarray(gb, jnp.float32))
  assert ours[1].dtype == jnp.bfloat16 and ours[2].dtype == jnp.bfloat16
  for name, o, e in zip(("y", "dx", "dkernel"), ours, exact):
    assert _rel(o, e) < 2e-2, (name, _rel(o, e))


def _batch_group_counts(impl: str) -> list[int]:
  x = jax.ShapeDtypeStruct((2, 32, 32, 64), jnp.float32)
  k = jax.ShapeDtypeStruct((1, 21, 1, 64), jnp.float32)
  loss = lambda x, k: jnp.sum(depthwise_conv2d(x, k, impl=impl) ** 2)
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, k).as_text()
  return [int(n) for n in re.findall(r"batch_group_count = (\d+)", text)]


def test_lax_gradient_has_no_batch_group_count_convolution():
  assert max(_batch_group_counts("lax_autodiff")) == 64  # what autodiff writes (jax#13800)
  counts = _batch_group_counts("lax")
  assert counts and set(counts) == {1}, counts


def test_policy_table_env_and_override(monkeypatch):
  assert backend.policy("cpu").dw_impl == "shift" and backend.policy("cpu").chunked_loss
  for platform in ("gpu", "tpu", "something_new"):
    p = backend.policy(platform)
    assert (p.dw_impl, p.gradient_boundary, p.chunked_loss, p.staged_inference,
            p.keep_freed_memory) == ("lax", False, False, False, False)
  monkeypatch.setenv(backend.ENV, "dw_impl=lax, gradient_boundary=0")
  p = backend.policy("cpu")
  assert p.dw_impl == "lax" and not p.gradient_boundary and p.chunked_loss
  with backend.override(chunked_loss=False):
    assert not backend.policy("cpu").chunked_loss and backend.policy("cpu").dw_impl == "lax"
  assert backend.policy("cpu").chunked_loss
  monkeypatch.setenv(backend.ENV, "chunked_loss=maybe")
  with pytest.raises(ValueError, match="chunked_loss='maybe'"):
    backend.policy("cpu")
  monkeypatch.setenv(backend.ENV, "dw_impl=fft")
  with pytest.raises(ValueError, match="dw_impl='fft', expected one of"):
    backend.policy("cpu")
  monkeypatch.setenv(backend.ENV, "fast=1")
  with pytest.raises(ValueError, match="'fast=1' is not NAME=VALUE"):
    backend.policy("cpu")
  with pytest.raises(ValueError, match="unknown policy fields"):
    with backend.override(turbo=True):
      pass


def test_expected_platform_reads_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert backend.expected_platform() == "gpu"
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert backend.expected_platform() == "tpu"
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert backend.expected_platform() == "cpu"


def _train_step_outputs(batch):
  """Loss, gradients and BN statistics of one TINY train step, traced under the current policy
  (under the CPU policy: test_precision's fp32 program, shared through the compile cache)."""
  from segnext_jax.model import init_variables, segnext
  variables = init_variables(segnext("t", **TINY, num_classes=6), jax.random.key(0))
  return train_loss_grads(tiny_train_model("fp32")[1], variables, batch,
                          jax.random.fold_in(jax.random.key(1), 0))


def test_plain_policy_gives_the_cpu_policys_train_step():
  batch = tiny_train_batch()  # synthetic scenes, 5 ignored rows
  with backend.override(**{k: v for k, v in backend.POLICIES["cpu"].__dict__.items()
                           if k != "keep_freed_memory"}):
    cpu = _train_step_outputs(batch)
  with backend.override(**PLAIN):
    plain = _train_step_outputs(batch)
  assert abs(float(cpu[0]) - float(plain[0])) <= 1e-6 * abs(float(cpu[0]))
  for a, b in zip(jax.tree.leaves(cpu[1:]), jax.tree.leaves(plain[1:])):
    scale = float(np.abs(np.asarray(b)).max())
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5 * max(scale, 1e-3))


def test_plain_policy_gives_the_cpu_policys_predictions():
  from segnext_jax.eval import InferenceConfig, Segmenter
  from segnext_jax.model import init_variables, segnext
  model = segnext("t", **TINY, num_classes=6)
  v = init_variables(model, jax.random.key(0))
  img = np.random.default_rng(1).integers(0, 255, (70, 100, 3)).astype(np.float32)
  cfg = InferenceConfig(scale=(128, 64))
  with backend.override(staged_inference=True, dw_impl="shift"):
    staged = Segmenter.for_model(model, cfg)
    a = staged.scores(v, img)
  with backend.override(**PLAIN):
    plain = Segmenter.for_model(model, cfg)
    b = plain.scores(v, img)
  from segnext_jax.staged import StagedForward
  assert isinstance(staged.forward.fn, StagedForward) and not isinstance(plain.forward.fn, StagedForward)
  assert a.shape == b.shape == (70, 100, 6)
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.abs(b).max()))
