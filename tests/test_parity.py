"""Converted mmseg weights give mmseg's outputs (eval mode, same NMF bases)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FP32_ATOL, TorchReference
from segnext_jax import load_checkpoint, random_bases

REPO = Path(__file__).resolve().parents[1]


def convert_cli(pth: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / "convert/from_torch.py"), str(pth), "-o", str(out), *extra],
                        capture_output=True, text=True)


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
