"""Converted mmseg weights give mmseg's outputs (eval mode, same NMF bases)."""
from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import FP32_ATOL, TorchReference, command

GRAD_RTOL = 1e-3
from segnext_jax import load_checkpoint, random_bases



def convert_cli(pth: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
  """convert/from_torch.py PTH -o OUT, run in this process: exit status, stdout, stderr."""
  argv = [str(pth), "-o", str(out), *extra]
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    code = command("from_torch").main(argv)
  return subprocess.CompletedProcess(["convert/from_torch.py", *argv], code, stdout.getvalue(),
                                     stderr.getvalue())


def check_parity(ref: TorchReference, tmp_path: Path, batch: int, hw: tuple[int, int]) -> None:
  out = tmp_path / "converted"
  res = convert_cli(ref.path, out)
  assert res.returncode == 0, res.stderr
  model, variables = load_checkpoint(out)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, *hw, 3)).astype(np.float32)
  bases = np.asarray(random_bases(jax.random.key(3), batch, model.head_channels, model.nmf_rank))
  feats_t, logits_t = ref.forward(images, bases)
  logits, state = jax.jit(lambda v, x, b: model.apply(v, x, train=False, nmf_bases=b,
                                                      mutable=["intermediates"]))(variables, images, bases)
  stages = [state["intermediates"]["backbone"][f"stage{s}"][0] for s in range(1, 5)]
  for s, (a, b) in enumerate(zip(stages, feats_t), 1):
    assert a.shape == b.shape, (s, a.shape, b.shape)
    err = float(np.max(np.abs(np.asarray(a) - b)))
    assert err <= FP32_ATOL, f"stage {s}: max abs err {err:.2e} (scale {np.abs(b).max():.2f})"
  assert logits.shape == logits_t.shape == (batch, -(-hw[0] // 8), -(-hw[1] // 8), 150)
  err = float(np.max(np.abs(np.asarray(logits) - logits_t)))
  assert err <= FP32_ATOL, f"logits: max abs err {err:.2e} (scale {np.abs(logits_t).max():.2f})"


def test_parity_t_odd_size_batch2(torch_ref_t, tmp_path):
  check_parity(torch_ref_t, tmp_path, batch=2, hw=(93, 127))


def test_parity_t_square(torch_ref_t, tmp_path):
  check_parity(torch_ref_t, tmp_path, batch=1, hw=(64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["t", "s", "b", "l"])
def test_parity_all_variants_333x479(variant, tmp_path):
  check_parity(TorchReference(variant, tmp_path, seed=7), tmp_path, batch=1, hw=(333, 479))


def torch_train_step(ref: TorchReference, images: np.ndarray, labels: np.ndarray, bases: np.ndarray):
  """mmseg training forward (BN batch stats, 6 NMF steps, no dropout) -> loss, grads, BN stats."""
  import torch
  from segnext_jax.mmseg_reference import fix_nmf_bases, train_mode_copies
  backbone, head = train_mode_copies(ref.backbone, ref.head)
  fix_nmf_bases(head, bases.copy())
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  logits = head(backbone(x))
  from mmseg.structures import SegDataSample
  from mmengine.structures import PixelData
  samples = [SegDataSample(gt_sem_seg=PixelData(data=torch.from_numpy(l[None].astype(np.int64))))
             for l in labels]
  loss = head.loss_by_feat(logits, samples)["loss_ce"]
  loss.backward()
  grads = {f"backbone.{k}": p.grad.numpy() for k, p in backbone.named_parameters()}
  grads.update({f"decode_head.{k}": p.grad.numpy() for k, p in head.named_parameters()})
  stats = {f"backbone.{k}": v.numpy() for k, v in backbone.state_dict().items()}
  return float(loss), grads, stats


def test_train_mode_loss_and_grads_t(torch_ref_t, tmp_path):
  from segnext_jax import convert_map
  from segnext_jax.loss import seg_cross_entropy
  out = tmp_path / "converted"
  assert convert_cli(torch_ref_t.path, out).returncode == 0
  model, variables = load_checkpoint(out, dropout=0.0, drop_path=0.0)
  rng = np.random.default_rng(1)
  images = rng.standard_normal((2, 61, 75, 3)).astype(np.float32)
  labels = rng.integers(0, 150, (2, 61, 75)).astype(np.int32)
  labels[:, :9] = 255  # some ignored pixels
  bases = np.asarray(random_bases(jax.random.key(5), 2, model.head_channels, model.nmf_rank))
  loss_t, grads_t, stats_t = torch_train_step(torch_ref_t, images, labels, bases)

  def loss_fn(params):
    logits, new = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                              train=True, nmf_bases=bases, mutable=["batch_stats"])
    return seg_cross_entropy(logits, labels), new["batch_stats"]

  (loss, new_stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  assert abs(float(loss) - loss_t) <= 1e-5 * max(1.0, abs(loss_t)), (float(loss), loss_t)
  target = {"params": variables["params"]}
  grads_t_tree, _ = convert_map.convert_state_dict(grads_t, target)  # every param must get a grad
  flat_j = traverse_util.flatten_dict(dict(grads))
  flat_t = traverse_util.flatten_dict(grads_t_tree["params"])
  assert flat_j.keys() == flat_t.keys()
  # Conv biases right before a train-mode BN have an exactly-zero true gradient (BN removes the
  # batch mean), so both sides are rounding noise there: check them against the global scale.
  scale = max(float(np.abs(v).max()) for v in flat_t.values())
  pre_bn = [k for k in flat_j if k[-1] == "bias" and k[2] in ("proj_0", "proj_3", "proj")]
  assert len(pre_bn) == 5
  for k in pre_bn:
    assert float(np.abs(np.asarray(flat_j.pop(k))).max()) <= 1e-5 * scale, k
  errs = {k: float(np.abs(np.asarray(flat_j[k]) - flat_t[k]).max()) / float(np.abs(flat_t[k]).max())
          for k in flat_j}
  worst = max(errs, key=errs.get)
  print("worst relative gradient error %.2e at %s" % (errs[worst], "/".join(worst)))
  assert errs[worst] <= GRAD_RTOL, f"gradient of {'/'.join(worst)}: relative max err {errs[worst]:.2e}"
  stats_tree, _ = convert_map.convert_state_dict(
      {k: v for k, v in stats_t.items() if "running" in k or "num_batches" in k},
      {"batch_stats": variables["batch_stats"]})
  for k, v in traverse_util.flatten_dict(stats_tree["batch_stats"]).items():
    got = np.asarray(traverse_util.flatten_dict(dict(new_stats))[k])
    np.testing.assert_allclose(got, v, rtol=1e-4, atol=1e-5, err_msg="/".join(k))
