"""Training gradients checked against arithmetic: float64 central differences, no torch.

A tiny SegNeXt in float64 on CPU, train mode (BN batch statistics, 6 unrolled NMF steps), through
the real loss (seg_cross_entropy and its custom VJP), with the CPU depthwise backend 'shift' (a
hand-written VJP); both backends are also checked alone on strips wider than the map. For a few
parameters of every module kind, the autodiff directional derivative g.v must equal
(L(p + h v) - L(p - h v)) / 2h.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from conftest import TINY

from segnext_jax import segnext
from segnext_jax.depthwise import depthwise_conv2d
from segnext_jax.model import abstract_variables
from segnext_jax.loss import seg_cross_entropy

STEP = 1e-5    # central-difference step along a unit-norm direction
RTOL = 1e-6    # |g.v - fd| / |g|: measured <= 2e-8; a broken VJP (tried: shift, loss) >= 1e-3
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# One or more leaves per module kind; stage 4 is a 2x2 map, so its 1x21 strips overhang it.
CHECKED = {
    "stem conv 3x3/2": "backbone/patch_embed1/proj_0/kernel",
    "downsampling conv": "backbone/patch_embed4/proj/kernel",
    "BatchNorm": "backbone/patch_embed1/proj_1/scale",
    "BatchNorm (pre-norm)": "backbone/block4_0/norm1/bias",
    "conv 1x1": "backbone/block2_0/attn/proj_1/kernel",
    "MSCA mix 1x1": "backbone/block3_0/attn/spatial_gating_unit/conv3/kernel",
    "depthwise 5x5": "backbone/block1_0/attn/spatial_gating_unit/conv0/kernel",
    "depthwise 1x21": "backbone/block4_0/attn/spatial_gating_unit/conv2_1/kernel",
    "depthwise 21x1 bias": "backbone/block3_0/attn/spatial_gating_unit/conv2_2/bias",
    "MLP depthwise 3x3": "backbone/block2_0/mlp/dwconv/kernel",
    "MLP fc2": "backbone/block4_0/mlp/fc2/kernel",
    "layer scale": "backbone/block3_0/layer_scale_1",
    "LayerNorm": "backbone/norm4/scale",
    "head squeeze conv": "decode_head/squeeze/conv/kernel",
    "GroupNorm": "decode_head/squeeze/gn/scale",
    "ham_in (before NMF)": "decode_head/hamburger/ham_in/conv/kernel",
    "ham_out GroupNorm": "decode_head/hamburger/ham_out/gn/bias",
    "align conv": "decode_head/align/conv/kernel",
    "classifier": "decode_head/conv_seg/bias",
}


def tiny_model(impl: str = "shift"):
  """Depth 1 per stage, 32 head channels (GroupNorm 32 = one channel per group), 5 classes."""
  return segnext("t", **TINY, num_classes=5, dropout=0.0, drop_path=0.0, dw_impl=impl,
                 dtype=jnp.float64)


def random_variables(model, seed: int) -> tuple[dict, dict]:
  """float64 (params, batch_stats) drawn as mmseg_reference.randomize_ draws them: fan-in scaled
  kernels, non-trivial norm scales, biases and layer scales. No init compile (eval_shape only)."""
  rng = np.random.default_rng(seed)
  shapes = abstract_variables(model)
  params = {}
  for path, s in flatten_dict(shapes["params"]).items():
    if path[-1].startswith("layer_scale"):
      p = rng.uniform(0.1, 0.4, s.shape)
    elif path[-1] == "scale":
      p = rng.uniform(0.6, 1.4, s.shape)
    elif path[-1] == "bias":
      p = 0.1 * rng.standard_normal(s.shape)
    else:  # HWIO kernels; depthwise (kh, kw, 1, C) has fan-in kh * kw
      p = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    params[path] = p
  stats = jax.tree.map(lambda s: np.ones(s.shape), shapes["batch_stats"])  # unused in train mode
  return unflatten_dict(params), stats


def batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Images (2,40,56,3), labels with 10% ignored, NMF bases (2,32,16) as mmseg draws them."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((2, 40, 56, 3))
  labels = rng.integers(0, 5, (2, 40, 56)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.1] = 255
  bases = rng.random((2, 32, 16))
  return images, labels, bases / np.linalg.norm(bases, axis=1, keepdims=True)


def directions(params: dict, seed: int) -> dict[str, dict[tuple, np.ndarray]]:
  """Per checked kind, a unit-norm random direction on its leaf; plus one over all leaves."""
  rng = np.random.default_rng(seed)
  flat = flatten_dict(params)
  whole = {k: rng.standard_normal(v.shape) for k, v in flat.items()}
  norm = np.sqrt(sum(np.sum(v ** 2) for v in whole.values()))
  out = {"all parameters": {k: v / norm for k, v in whole.items()}}
  for kind, name in CHECKED.items():
    key = tuple(name.split("/"))
    assert key in flat, name
    v = rng.standard_normal(flat[key].shape)
    out[kind] = {key: v / np.linalg.norm(v)}
  return out


def shifted(params: dict, direction: dict[tuple, np.ndarray], step: float) -> dict:
  flat = flatten_dict(params)
  return unflatten_dict({k: p + step * direction[k] if k in direction else p for k, p in flat.items()})


def test_train_gradients_match_central_differences():
  with jax.enable_x64(True):
    model = tiny_model("shift")  # the CPU backend, with its hand-written VJP
    params, stats = random_variables(model, seed=1)
    images, labels, bases = batch(seed=2)

    def loss(p):
      logits, _ = model.apply({"params": p, "batch_stats": stats}, images, train=True,
                              nmf_bases=bases, mutable=["batch_stats"])
      return seg_cross_entropy(logits, labels)

    # One compile serves the gradient and the loss values; no backend optimisation (faster compile).
    value_and_grad = jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)
    value, grads = value_and_grad(params)
    assert value.dtype == jnp.float64 and np.isfinite(float(value))
    grads = {k: np.asarray(g) for k, g in flatten_dict(grads).items()}
    errs = {}
    for kind, v in directions(params, seed=3).items():
      ad = sum(float(np.vdot(grads[k], d)) for k, d in v.items())
      fd = (float(value_and_grad(shifted(params, v, STEP))[0])
            - float(value_and_grad(shifted(params, v, -STEP))[0])) / (2 * STEP)
      gnorm = np.sqrt(sum(float(np.vdot(grads[k], grads[k])) for k in v))
      assert gnorm > 0, kind
      errs[kind] = abs(ad - fd) / gnorm
    worst = max(errs, key=errs.get)
    print(f"worst |g.v - fd| / |g| = {errs[worst]:.1e} ({worst})")
    bad = {k: f"{e:.1e}" for k, e in errs.items() if e > RTOL}
    assert not bad, f"gradients disagree with central differences: {bad}"


@pytest.mark.parametrize("impl", ["shift", "lax"])
@pytest.mark.parametrize("shape", [(1, 21), (21, 1), (5, 5)])
def test_depthwise_gradients_match_central_differences(impl, shape):
  """Strips wider than the (3, 4) map: most taps read only padding and get an exactly-zero grad."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 6))
    kernel = rng.standard_normal((*shape, 1, 6))
    bias = rng.standard_normal(6)
    w = rng.standard_normal((2, 3, 4, 6))
    f = jax.jit(lambda x, k, b: jnp.sum(w * jnp.tanh(depthwise_conv2d(x, k, b, impl))))
    grads = jax.grad(f, argnums=(0, 1, 2))(x, kernel, bias)
    for i, (arg, g) in enumerate(zip((x, kernel, bias), grads)):
      v = rng.standard_normal(arg.shape)
      v /= np.linalg.norm(v)
      args = [x, kernel, bias]
      plus = f(*[a + STEP * v if j == i else a for j, a in enumerate(args)])
      minus = f(*[a - STEP * v if j == i else a for j, a in enumerate(args)])
      err = abs(float(np.vdot(g, v)) - float(plus - minus) / (2 * STEP)) / np.linalg.norm(g)
      assert err <= RTOL, (i, err)
    kh, kw = shape  # taps more than the map size away from the centre see only zero padding
    dead = np.ones(shape, bool)
    dead[max(kh // 2 - 2, 0):kh // 2 + 3, max(kw // 2 - 3, 0):kw // 2 + 4] = False
    assert np.all(np.asarray(grads[1])[dead] == 0.0)
