"""Training-step speed and peak memory: JAX on train.py's own path against mmseg torch (same model
size, same batch, AdamW), one run; each side in its own subprocess so peak RSS is its own.

  python benchmarks/train_step.py [--variant t] [--batch 2] [--size 512] [--runs 5]

JAX: the trainer's step (build_model, create_train_state, jit_train_step, shard_batch) on the
batch TrainLoader gives it (common.train_batch: uint8 image and label, valid size 'hw'), so the
step normalises and pads on the device: forward, mmseg CE, backward, AdamW, BN stats. torch: the
same host batch, normalised and padded in its step as mmseg's SegDataPreProcessor does, then
forward, upsampled CE, backward, AdamW. The JAX side opts in to segnext_jax's malloc policy
(cpu_memory.py) as the commands do; the torch side runs as mmseg's users run it, with glibc's
default malloc, and a third row runs torch under the policy too: the policy is not JAX-specific,
and that row shows what it is worth to torch. GFLOP/s is XLA's FLOP count of the step over its
time, next to the rate of a large jitted matmul (the machine's practical limit). On a GPU, peak
memory is the device's.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import common  # benchmarks/common.py: this script's folder is first on sys.path

SIDES = ("jax", "torch", "torch_policy")  # torch_policy: torch under segnext_jax's malloc policy


def config(args):
  from segnext_jax.config import TrainConfig
  return TrainConfig(variant=args.variant, batch_size=args.batch, crop_size=args.size,
                     precision=args.precision, remat=args.remat, nmf_grad=args.nmf_grad)


def run_jax(args) -> dict:
  import jax
  from segnext_jax.trainer import initial_state
  from segnext_jax.train_lib import build_model, jit_train_step, make_mesh, shard_batch
  cfg = config(args)
  model = build_model(cfg, common.NUM_CLASSES)
  mesh = make_mesh()
  state = initial_state(cfg, model, mesh)
  batch = shard_batch(common.train_batch(cfg), mesh)
  key = jax.random.key(cfg.seed + 1)
  t0 = time.perf_counter()  # compiled once: the FLOP count and every step use this program
  step = jit_train_step(cfg, mesh).lower(state, batch, key).compile()
  gflop = common.program_gflop(step)
  state, m = step(state, batch, key)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  holder = {"s": state}

  def one():
    holder["s"], metrics = step(holder["s"], batch, key)
    jax.block_until_ready(metrics)
  ms = common.median_ms(one, args.runs, warmup=1)
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform == "gpu" else None
  peak = stats["peak_bytes_in_use"] / 2**30 if stats else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return {"ms": ms, "compile_s": compile_s, "peak_gb": peak, "device": dev.device_kind,
          "gflop": gflop, "matmul_gflops": common.matmul_gflops()}


def run_torch(args) -> dict:
  import torch
  from segnext_jax.data import IGNORE_INDEX
  from segnext_jax.data.transforms import MEAN, STD
  from segnext_jax.mmseg_reference import mmseg_segmentor_modules
  backbone, head = mmseg_segmentor_modules(args.variant, common.NUM_CLASSES)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  backbone, head = backbone.to(dev).train(), head.to(dev).train()
  params = list(backbone.parameters()) + list(head.parameters())
  opt = torch.optim.AdamW(params, lr=6e-5, weight_decay=0.01)
  batch = common.train_batch(config(args))
  image = torch.from_numpy(batch["image"]).to(dev)
  y = torch.from_numpy(batch["label"].astype("int64")).to(dev)  # PackSegInputs' int64
  hw = torch.from_numpy(batch["hw"]).to(dev)
  mean, std = (torch.from_numpy(v).to(dev).view(1, 3, 1, 1) for v in (MEAN, STD))

  def one():
    opt.zero_grad()
    rows = torch.arange(image.shape[1], device=dev)[None, :] < hw[:, :1]
    cols = torch.arange(image.shape[2], device=dev)[None, :] < hw[:, 1:]
    valid = (rows[:, :, None] & cols[:, None, :])[:, None]
    x = torch.where(valid, (image.permute(0, 3, 1, 2).float() - mean) / std, 0.0)
    logits = head(backbone(x))
    logits = torch.nn.functional.interpolate(logits, size=y.shape[1:], mode="bilinear", align_corners=False)
    loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
    loss.backward()
    opt.step()
    if dev == "cuda":
      torch.cuda.synchronize()
  ms = common.median_ms(one, args.runs, warmup=1)
  peak = (torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda"
          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
  return {"ms": ms, "peak_gb": peak, "threads": torch.get_num_threads()}


def run_side(args) -> dict:
  """One side in this process; the JAX side and torch_policy opt in to the malloc policy first."""
  if args.side in ("jax", "torch_policy"):
    common.keep_freed_memory()
  res = run_jax(args) if args.side == "jax" else run_torch(args)
  from segnext_jax import cpu_memory
  return {**res, "malloc_policy": cpu_memory.applied}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="t", choices=["t", "s", "b", "l"])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
  p.add_argument("--remat", action="store_true")
  p.add_argument("--nmf-grad", default="unroll", choices=["unroll", "one_step"])
  p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.side:
    print(json.dumps(run_side(args)))
    return
  res = {}
  for side in SIDES:
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side],
                         capture_output=True, text=True)  # run_side: whether it opts in
    if out.returncode:
      sys.exit(f"{side} side failed:\n{out.stderr[-3000:]}")
    res[side] = json.loads(out.stdout.strip().splitlines()[-1])
  j, t, tp = res["jax"], res["torch"], res["torch_policy"]
  print(f"SegNeXt-{args.variant.upper()} train step, batch {args.batch}x3x{args.size}x{args.size} "
        f"(uint8, as TrainLoader gives it), {args.precision}{', remat' if args.remat else ''}, "
        f"nmf grad {args.nmf_grad}; device {j['device']}; median of {args.runs}")
  rate = j["gflop"] / (j["ms"] * 1e-3)
  print(f"machine limit: jitted 2048^2 float32 matmul {j['matmul_gflops']:.0f} GFLOP/s; "
        f"the step is {j['gflop']:.1f} GFLOP (XLA cost analysis)")
  on = lambda r: "on" if r["malloc_policy"] else "off"
  print("| framework | malloc policy | ms/step | images/s | torch/this | GFLOP/s (of matmul's) | "
        "peak memory GB | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  print(f"| JAX (jit), train.py's step | {on(j)} | {j['ms']:.0f} | {1e3 * args.batch / j['ms']:.2f} | "
        f"{t['ms'] / j['ms']:.2f}x | {rate:.0f} ({100 * rate / j['matmul_gflops']:.0f}%) | "
        f"{j['peak_gb']:.2f} | {j['compile_s']:.0f} |")
  print(f"| mmseg torch | {on(t)} | {t['ms']:.0f} | {1e3 * args.batch / t['ms']:.2f} | 1.00x | - | "
        f"{t['peak_gb']:.2f} | - |")
  print(f"| mmseg torch | {on(tp)} | {tp['ms']:.0f} | {1e3 * args.batch / tp['ms']:.2f} | "
        f"{t['ms'] / tp['ms']:.2f}x | - | {tp['peak_gb']:.2f} | - |")


if __name__ == "__main__":
  main()
