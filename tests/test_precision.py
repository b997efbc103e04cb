"""bf16 (compute dtype) against fp32 on the same weights: a train step (loss, gradients, BN
statistics; BN statistics, NMF, softmax/CE and the optimizer stay fp32), inference on the parity
checkpoint against mmseg torch fp32, and (slow) a short synthetic run's mIoU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import TINY, tiny_train_batch, tiny_train_model, train_loss_grads
from segnext_jax import ham_head
from segnext_jax.config import make_config
from segnext_jax.recipes import RECIPES
from segnext_jax.train_lib import create_train_state, jit_train_step, make_mesh, shard_batch

# Measured on conftest's tiny_train_model / tiny_train_batch (2026-12-07, CPU): loss 1.1e-5
# relative; gradient leaves' relative error norm up to 0.22 (the backbone's first block; median
# 0.09), cosine of the whole gradient 0.99995; BN statistics 2.9e-3 (means in running-std units).
# Bounds leave about 2x (1 - cos: 20x).
LOSS_RTOL, GRAD_TOL, GRAD_MEDIAN, GRAD_COS, STATS_TOL = 1e-4, 0.4, 0.2, 0.999, 1e-2


def test_bf16_train_step_matches_fp32():
  from segnext_jax.model import init_variables, segnext
  variables = init_variables(segnext("t", **TINY, num_classes=6), jax.random.key(0))
  batch = tiny_train_batch()
  key = jax.random.fold_in(jax.random.key(1), 0)  # train_step's stream at step 0
  loss32, g32, stats32 = train_loss_grads(tiny_train_model("fp32")[1], variables, batch, key)
  cfg, model = tiny_train_model("bf16")
  loss16, g16, stats16 = train_loss_grads(model, variables, batch, key)

  # The real bf16 train step, traced (its types need no compile): NMF is handed bf16 features
  # (and computes in fp32, see nmf2d); everything the state and metrics hold stays fp32.
  seen, real_nmf = [], ham_head.nmf2d
  ham_head.nmf2d = lambda x, *a, **k: seen.append(x.dtype) or real_nmf(x, *a, **k)
  try:
    mesh = make_mesh()
    state, metrics = jax.eval_shape(jit_train_step(cfg, mesh), create_train_state(cfg, model, variables),
                                    shard_batch(batch, mesh), jax.random.key(1))
  finally:
    ham_head.nmf2d = real_nmf
  assert seen and all(d == jnp.bfloat16 for d in seen), seen
  for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state, metrics)):
    assert leaf.dtype in (jnp.float32, jnp.int32, jnp.bool_), leaf.dtype  # bool: the finite flag

  assert abs(loss16 - loss32) <= LOSS_RTOL * loss32, (loss16, loss32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))
  # compared in float64 numpy: eager jnp ops here would each compile a small program
  g32, g16, stats32, stats16 = (traverse_util.flatten_dict(jax.tree.map(
      lambda x: np.asarray(x, np.float64), t)) for t in (g32, g16, stats32, stats16))
  flat = lambda g: np.concatenate([np.ravel(x) for x in g.values()])
  errs, total = {}, float(np.linalg.norm(flat(g32)))
  for path, b in g32.items():
    a = g16[path]
    if float(np.linalg.norm(b)) < 1e-6 * total:
      continue  # a bias before a train-mode BN or GN: true gradient 0, both rounding noise
    errs["/".join(path)] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
  cos = float(flat(g16) @ flat(g32) / (np.linalg.norm(flat(g16)) * np.linalg.norm(flat(g32))))
  # BN statistics: the error of a running mean in units of the running std, of a variance relative
  stats = []
  for path, b in stats32.items():
    a = stats16[path]
    ref = stats32[(*path[:-1], "var")]
    unit = np.sqrt(ref) if path[-1] == "mean" else ref
    stats.append(float(np.max(np.abs(a - b) / unit)))
  errs, worst = list(errs.values()), max(errs, key=errs.get)
  print(f"bf16 vs fp32: loss rel err {abs(loss16 - loss32) / loss32:.2e}; gradients max rel err "
        f"{max(errs):.2e} at {worst} (median {np.median(errs):.2e}), cosine {cos:.5f}; BN stats max "
        f"{max(stats):.2e}")
  assert max(errs) <= GRAD_TOL and np.median(errs) <= GRAD_MEDIAN, (worst, max(errs))
  assert cos >= GRAD_COS, cos
  assert max(stats) <= STATS_TOL, max(stats)


def test_bf16_inference_on_the_parity_checkpoint(torch_ref_t, tmp_path):
  """Documented in docs: bf16 logits against mmseg torch fp32 on the converted T checkpoint."""
  from segnext_jax import random_bases, segnext, torch_io
  variables, _, _ = torch_io.convert_file(torch_ref_t.path)
  images = np.random.default_rng(0).standard_normal((1, 96, 128, 3)).astype(np.float32)
  bases = np.asarray(random_bases(jax.random.key(3), 1, 256, 16))
  _, logits_t = torch_ref_t.forward(images, bases)
  model = segnext("t", dtype=jnp.bfloat16)
  out = jax.jit(lambda v, x: model.apply(v, x, nmf_bases=bases))(variables, images)
  assert out.dtype == jnp.float32
  err = float(np.abs(np.asarray(out) - logits_t).max()) / float(np.abs(logits_t).max())
  agree = float(np.mean(np.argmax(np.asarray(out), -1) == np.argmax(logits_t, -1)))
  print(f"bf16 vs torch fp32: max err {err:.2e} of the largest logit, argmax agreement {agree:.4f}")
  assert err <= 2e-2 and agree >= 0.95, (err, agree)


@pytest.mark.slow
def test_bf16_synthetic_run_within_a_few_miou_of_fp32(tmp_path):
  from segnext_jax.trainer import train_and_evaluate
  miou = {}
  for precision in ("fp32", "bf16"):
    cfg = make_config(RECIPES["synthetic"], dict(precision=precision, workdir=str(tmp_path / precision)))
    miou[precision] = 100 * train_and_evaluate(cfg, progress=False)["history"]["eval"][-1][1]
  print(miou)
  assert miou["fp32"] > 70 and abs(miou["bf16"] - miou["fp32"]) <= 3.0, miou
