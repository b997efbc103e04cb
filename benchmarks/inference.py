"""Inference speed: jitted JAX SegNeXt vs mmseg's torch SegNeXt (eager), same weights, one run.

  python benchmarks/inference.py [--variants t l] [--size 512] [--runs 7]
Weights: a random mmseg checkpoint (non-trivial BN stats) converted with convert/from_torch's
mapping; both sides compute the stride-8 logits of a 1x3xSxS image with the same NMF bases.
"""
from __future__ import annotations

import argparse
import sys
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # mmseg_reference


def interleaved_ms(fns, runs: int, warmup: int = 2) -> list[float]:
  """Median ms of each fn, timed alternately run by run so that both see the same machine load."""
  for _ in range(warmup):
    for fn in fns:
      fn()
  times = [[] for _ in fns]
  for _ in range(runs):
    for fn, ts in zip(fns, times):
      t = time.perf_counter()
      fn()
      ts.append((time.perf_counter() - t) * 1e3)
  return [statistics.median(ts) for ts in times]


def median_ms(fn, runs: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t) * 1e3)
  return statistics.median(times)


def bench_variant(variant: str, size: int, runs: int, tmp: Path) -> dict:
  import torch
  from mmseg_reference import TorchReference
  from segnext_jax import random_bases, segnext, torch_io
  ref = TorchReference(variant, tmp)
  variables, _, _ = torch_io.convert_file(ref.path)
  model = segnext(variant)
  x = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
  bases = np.asarray(random_bases(jax.random.key(0), 1, model.head_channels, model.nmf_rank))
  fwd = jax.jit(lambda v, x, b: model.apply(v, x, nmf_bases=b))
  t0 = time.perf_counter()
  out = jax.block_until_ready(fwd(variables, x, bases))
  compile_s = time.perf_counter() - t0
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  bt = torch.from_numpy(bases.copy())
  ref.head.hamburger.ham._build_bases = lambda *a, **k: bt.clone()
  with torch.inference_mode():
    torch_fn = lambda: ref.head(ref.backbone(xt))
    out_t = torch_fn().numpy().transpose(0, 2, 3, 1)
    jax_ms, torch_ms = interleaved_ms([lambda: jax.block_until_ready(fwd(variables, x, bases)), torch_fn], runs)
  return dict(variant=variant.upper(), jax_ms=jax_ms, torch_ms=torch_ms, ratio=torch_ms / jax_ms,
              compile_s=compile_s, max_abs_diff=float(np.abs(np.asarray(out) - out_t).max()))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variants", nargs="+", default=["t", "l"], choices=["t", "s", "b", "l"])
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--runs", type=int, default=7)
  args = p.parse_args()
  import torch
  print(f"device: jax {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"torch threads {torch.get_num_threads()}; input 1x3x{args.size}x{args.size}, "
        f"median of {args.runs} interleaved runs after warm-up")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for v in args.variants:
      rows.append(bench_variant(v, args.size, args.runs, Path(tmp)))
  print("| variant | JAX ms/img | torch ms/img | torch/JAX | JAX compile s | max abs diff |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['jax_ms']:.1f} | {r['torch_ms']:.1f} | {r['ratio']:.2f}x | "
          f"{r['compile_s']:.1f} | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
  main()
