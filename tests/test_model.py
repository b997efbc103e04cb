"""Model unit tests on small inputs: shapes, sizes, depthwise backends, NMF determinism, modes."""
from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from segnext_jax import nmf2d, random_bases, segnext
from segnext_jax.depthwise import depthwise_conv2d
from segnext_jax.model import LOGIT_STRIDE, TOTAL_STRIDE, abstract_variables
from segnext_jax.mscan import STAGE_STRIDES

PAPER_PARAMS_M = {"t": 4.3, "s": 13.9, "b": 27.6, "l": 48.9}


@pytest.fixture(scope="module")
def tiny(tiny_variables):
  from conftest import TINY
  return segnext("t", **TINY), tiny_variables


@pytest.mark.parametrize("variant", ["t", "s", "b", "l"])
def test_param_count_matches_paper(variant):
  params = abstract_variables(segnext(variant))["params"]
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) / 1e6
  assert abs(n - PAPER_PARAMS_M[variant]) <= 0.05 * PAPER_PARAMS_M[variant], n


@pytest.mark.parametrize("kernel", [(5, 5), (1, 7), (21, 1), (3, 3)])
def test_depthwise_backends_agree_forward_and_backward(kernel):
  kx, kk, kb, kg = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (2, 13, 17, 6))
  k = jax.random.normal(kk, (*kernel, 1, 6))
  b = jax.random.normal(kb, (6,))
  g = jax.random.normal(kg, (2, 13, 17, 6))
  outs = {}
  for impl in ("shift", "lax"):
    f = lambda x, k, b: jnp.sum(depthwise_conv2d(x, k, b, impl=impl) * g)
    outs[impl] = (depthwise_conv2d(x, k, b, impl=impl), jax.grad(f, argnums=(0, 1, 2))(x, k, b))
  np.testing.assert_allclose(outs["shift"][0], outs["lax"][0], atol=1e-5)
  for a, c in zip(outs["shift"][1], outs["lax"][1]):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-4)


def test_depthwise_rejects_even_kernels():
  with pytest.raises(ValueError, match="bad kernel"):
    depthwise_conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((2, 2, 1, 2)))


@pytest.mark.parametrize("hw", [(64, 64), (33, 47), (17, 9)])
def test_logits_are_stride_8_ceil(tiny, hw):
  model, v = tiny
  y = jax.jit(lambda v, x: model.apply(v, x, rngs={"nmf": jax.random.key(0)}))(v, jnp.zeros((2, *hw, 3)))
  assert y.shape == (2, -(-hw[0] // 8), -(-hw[1] // 8), 150) and y.dtype == jnp.float32


def test_stride_constants_are_the_models_shapes(tiny):
  """STAGE_STRIDES, TOTAL_STRIDE and LOGIT_STRIDE (what padding and evaluation rely on) are the
  strides of the stage maps and the logits the model gives."""
  model, v = tiny
  y, out = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
      v, jnp.zeros((1, 64, 96, 3)))
  stages = [out["intermediates"]["backbone"][f"stage{s}"][0] for s in range(1, 5)]
  assert [x.shape[1:3] for x in stages] == [(64 // s, 96 // s) for s in STAGE_STRIDES]
  assert (STAGE_STRIDES, TOTAL_STRIDE, LOGIT_STRIDE) == ((4, 8, 16, 32), 32, 8)
  assert y.shape[1:3] == (64 // LOGIT_STRIDE, 96 // LOGIT_STRIDE)


def test_inference_uses_the_fixed_bases_training_draws_per_image(tiny):
  """One image, one answer: in inference the stored bases are shared by every image whatever the
  rng, batch or position; in training the 'nmf' key draws fresh per-image bases (mmseg)."""
  model, v = tiny
  x = jax.random.normal(jax.random.key(1), (3, 64, 64, 3))
  f = jax.jit(lambda x, k: model.apply(v, x, rngs={"nmf": k}))
  a, b = f(x, jax.random.key(7)), f(x, jax.random.key(8))
  assert np.array_equal(np.asarray(a), np.asarray(b))                       # rng ignored
  fixed = np.asarray(v["nmf_bases"]["decode_head"]["hamburger"]["bases"])
  given = jnp.broadcast_to(fixed, (3, *fixed.shape))
  with_given = jax.jit(lambda x, g: model.apply(v, x, nmf_bases=g))(x, given)
  np.testing.assert_array_equal(np.asarray(with_given), np.asarray(a))     # = the stored bases
  single = jax.jit(lambda x: model.apply(v, x))(x[2:][::-1])                  # other batch size
  np.testing.assert_allclose(np.asarray(single[0]), np.asarray(a[2]), atol=1e-5)
  no_bases = {k: w for k, w in v.items() if k != "nmf_bases"}
  with pytest.raises(ValueError, match="inference needs NMF bases"):  # traced only: raised in the head
    jax.eval_shape(lambda: model.apply(no_bases, x))
  train = jax.jit(lambda k: model.apply(v, x, train=True, mutable=["batch_stats"],
                                        rngs={"nmf": k, "dropout": jax.random.key(0)})[0])
  t7, t7b, t8 = train(jax.random.key(7)), train(jax.random.key(7)), train(jax.random.key(8))
  assert np.array_equal(np.asarray(t7), np.asarray(t7b))
  assert not np.array_equal(np.asarray(t7), np.asarray(t8))
  bases = random_bases(jax.random.key(7), 1, model.head_channels, model.nmf_rank)
  np.testing.assert_allclose(np.linalg.norm(bases, axis=1), 1.0, rtol=1e-6)


def test_nmf_reconstructs_a_low_rank_nonnegative_matrix():
  kx, kc, kb = jax.random.split(jax.random.key(0), 3)
  w = jax.random.uniform(kx, (1, 40, 4))          # (N, r) coefficients, D=32 bases of rank 4
  h = jax.random.uniform(kc, (1, 4, 32))
  x = (w @ h).reshape(1, 5, 8, 32)
  bases = random_bases(kb, 1, 32, 8)
  err0 = float(jnp.linalg.norm(nmf2d(x, bases, steps=0) - x))
  err = float(jnp.linalg.norm(nmf2d(x, bases, steps=50) - x))
  assert err < 0.1 * err0 and err < 0.05 * float(jnp.linalg.norm(x))


def test_one_step_gradient_same_forward_different_grad():
  x = jax.random.uniform(jax.random.key(0), (1, 4, 4, 32))
  bases = random_bases(jax.random.key(1), 1, 32, 8)
  f = lambda mode: (lambda x: jnp.sum(nmf2d(x, bases, 6, mode) ** 2))
  np.testing.assert_allclose(f("unroll")(x), f("one_step")(x), rtol=1e-6)
  g1, g2 = jax.grad(f("unroll"))(x), jax.grad(f("one_step"))(x)
  assert np.all(np.isfinite(g2)) and not np.allclose(g1, g2)


def test_train_mode_needs_dropout_rng_and_updates_batch_stats(tiny):
  model, v = tiny
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  y, new = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"],
      rngs={"nmf": jax.random.key(0), "dropout": jax.random.key(1)}))(v, x)
  assert y.shape == (2, 4, 4, 150)
  old_mean = v["batch_stats"]["backbone"]["patch_embed2"]["norm"]["mean"]
  assert not np.allclose(new["batch_stats"]["backbone"]["patch_embed2"]["norm"]["mean"], old_mean)


# bf16 logits against fp32's, max |diff| / max |fp32|, on TINY at random init: measured 1.2e-2 to
# 3.0e-2 over 3 inits x 3 input shapes (1x32x32, 1x64x64, 2x64x96), this test's case 1.64e-2: about
# 4 bf16 ulps (2^-8) of the largest logit; stage maps rounded to fp8 instead give 6.7e-2. Below
# BF16_MIN_ERR the model did not compute in bf16 (fp32 against itself differs by ~1e-7).
BF16_MAX_ERR, BF16_MIN_ERR = 3e-2, 1e-3


def primitives(jaxpr) -> set[str]:
  """The names of the primitives in a jaxpr and the jaxprs nested in it."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= primitives(sub)
  return names


def test_remat_in_training_same_loss_and_gradients(tiny):
  """remat (train_lib's model.clone(remat=True)) recomputes the blocks in the backward: the
  step's program checkpoints them, its loss and gradients are those without it."""
  model, v = tiny
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  rngs = {"nmf": jax.random.key(0), "dropout": jax.random.key(1)}  # same DropPath masks in both

  def step(m):
    def loss(params):
      y, _ = m.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"], rngs=rngs)
      return jnp.mean(y ** 2)
    return jax.value_and_grad(loss)

  remat = lambda m: "remat2" in primitives(jax.make_jaxpr(step(m))(v["params"]).jaxpr)  # checkpoint
  assert remat(model.clone(remat=True)) and not remat(model)
  (l0, g0), (l1, g1) = (jax.jit(step(m))(v["params"]) for m in (model, model.clone(remat=True)))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g0))  # pre-BN biases' are ~1e-11
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


def test_bf16_logits_within_bf16_rounding_of_fp32(tiny):
  model, v = tiny
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  run = lambda m: jax.jit(lambda v, x: m.apply(v, x, rngs={"nmf": jax.random.key(0)}))(v, x)
  ref = run(model)
  bf16 = run(model.clone(dtype=jnp.bfloat16))
  assert bf16.dtype == jnp.float32  # logits (and NMF) in fp32 whatever the compute dtype
  err = float(jnp.max(jnp.abs(bf16 - ref)) / jnp.max(jnp.abs(ref)))
  assert BF16_MIN_ERR < err < BF16_MAX_ERR, err


def test_bad_inputs_raise_clear_errors(tiny):
  model, v = tiny
  with pytest.raises(ValueError, match=r"images must be \(B, H, W, 3\)"):
    model.apply(v, jnp.zeros((1, 3, 32, 32)), rngs={"nmf": jax.random.key(0)})
  with pytest.raises(ValueError, match="nmf_bases has shape"):
    model.apply(v, jnp.zeros((1, 32, 32, 3)), nmf_bases=jnp.zeros((1, 256, 4)))
  with pytest.raises(ValueError, match="unknown variant"):
    segnext("xl")
