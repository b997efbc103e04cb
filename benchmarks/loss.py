"""The decode-head loss alone (upsample to the label size + CrossEntropyLoss, value and gradient
w.r.t. the logits): JAX's row-chunked CPU loss and the plain one, without and with mmseg's
class_weight / avg_non_ignore, next to mmseg's torch loss on the same arrays, one run.

  python benchmarks/loss.py [--batch 2] [--size 512] [--classes 150] [--runs 10]

Labels hold no ignored pixel (mmseg 1.2.2 cannot weigh one), so every row computes the same kind
of loss; logits are at 1/8 of the label size, as SegNeXt's head gives them.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import common  # benchmarks/common.py: this script's folder is first on sys.path


def jax_rows(logits, labels, weights, runs: int) -> list[tuple[str, float]]:
  import jax
  from segnext_jax import backend
  from segnext_jax.loss import seg_cross_entropy
  rows = []
  for chunked in (True, False):
    for name, cw, avg in (("unweighted", None, False), ("class_weight", weights, False),
                          ("class_weight + avg_non_ignore", weights, True)):
      with backend.override(chunked_loss=chunked):
        f = jax.jit(jax.value_and_grad(lambda x, y: seg_cross_entropy(x, y, cw, avg)))
        jax.block_until_ready(f(logits, labels))
        ms = common.median_ms(lambda: jax.block_until_ready(f(logits, labels)), runs)
      rows.append((f"JAX {'chunked' if chunked else 'plain'}, {name}", ms))
  return rows


def torch_rows(logits, labels, weights, runs: int) -> list[tuple[str, float]]:
  import torch
  from segnext_jax.mmseg_reference import stub_mmcv_ops
  stub_mmcv_ops()
  from mmseg.models.losses import CrossEntropyLoss
  from segnext_jax.data import IGNORE_INDEX
  from mmseg.models.utils import resize
  y = torch.from_numpy(labels.astype(np.int64))
  rows = []
  for name, cw, avg in (("unweighted", None, False), ("class_weight", list(weights), False),
                        ("class_weight + avg_non_ignore", list(weights), True)):
    loss_fn = CrossEntropyLoss(use_sigmoid=False, loss_weight=1.0, class_weight=cw,
                               avg_non_ignore=avg)

    def step():
      x = torch.from_numpy(np.ascontiguousarray(logits.transpose(0, 3, 1, 2))).requires_grad_()
      up = resize(x, size=labels.shape[1:], mode="bilinear", align_corners=False)
      loss_fn(up, y, weight=None, ignore_index=IGNORE_INDEX).backward()
    step()
    rows.append((f"mmseg torch, {name}", common.median_ms(step, runs)))
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--classes", type=int, default=150)
  p.add_argument("--runs", type=int, default=10)
  args = p.parse_args()
  common.keep_freed_memory()  # first: before JAX starts
  rng = np.random.default_rng(0)
  low = args.size // 8
  logits = rng.standard_normal((args.batch, low, low, args.classes)).astype(np.float32)
  labels = rng.integers(0, args.classes, (args.batch, args.size, args.size)).astype(np.int32)
  weights = tuple(float(w) for w in rng.uniform(0.5, 2.0, args.classes))
  t0 = time.perf_counter()
  rows = jax_rows(logits, labels, weights, args.runs) + torch_rows(logits, labels, weights, args.runs)
  print(f"loss value + gradient, logits {args.batch}x{low}x{low}x{args.classes} -> labels "
        f"{args.batch}x{args.size}x{args.size}, median of {args.runs} ({time.perf_counter() - t0:.0f} s)")
  print("| loss | ms |\n|---|---|")
  for name, ms in rows:
    print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
  main()
