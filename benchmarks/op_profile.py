"""Where the time goes: one jitted SegNeXt train step or forward, traced with jax.profiler on the
CPU, each executed XLA op mapped through the compiled HLO's metadata to the model part it comes
from, and summed per part (and per kind of op).

  python benchmarks/op_profile.py [--what train|infer] [--variant t] [--batch 2] [--size 512]

Parts: forward/backward of the MSCA depthwise convs (dw5x5 + strips), the MLP's dw3x3, the 1x1
convs and stem/patch convs, BN/GELU/LayerNorm/residual elementwise work, the head (Hamburger's
NMF, its GN convs), the loss and the optimizer. Op time is summed over XLA's worker threads, so
it can exceed wall time when ops run side by side.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"

import jax  # noqa: E402  (after XLA_FLAGS)

import common  # noqa: E402  benchmarks/common.py: this script's folder is first on sys.path

# (part, regex on the op's metadata op_name): first match wins, so specific rows come first.
PARTS: list[tuple[str, str]] = [
    ("MSCA depthwise 5x5 + strips", r"spatial_gating_unit/conv\d_\d|spatial_gating_unit/conv0/"),
    ("MLP depthwise 3x3", r"mlp/dwconv"),
    ("1x1 convs (matmuls)", r"/(proj_1|proj_2|fc1|fc2|conv3)/"),
    ("MSCA gate + GELU + residual", r"spatial_gating_unit|/attn/|/mlp/"),
    ("BN + layer scale + DropPath", r"norm1|norm2|block\d_\d+/(mul|add|DropPath)|block\d_\d+$"),
    ("stem / patch-embed convs + BN", r"patch_embed"),
    ("stage LayerNorm", r"backbone/norm\d"),
    ("head: NMF", r"hamburger/(?!ham_in|ham_out)"),
    ("head: 1x1 conv + GN + resize", r"decode_head"),
]


# Outside the model and not differentiated: the AdamW update, BN stats and the input's
# normalisation (train_step's device_normalize), which the name stack cannot tell apart.
LOSS, OPTIMIZER = "loss (upsampled CE)", "optimizer (AdamW) + BN stats + input normalisation"


def part_of(op_name: str) -> str:
  """The model part an op's name stack points to; outside the model, the loss (differentiated,
  so under jvp) or OPTIMIZER."""
  if "SegNeXt" not in op_name:
    return LOSS if "jvp(" in op_name else OPTIMIZER
  for part, pattern in PARTS:
    if re.search(pattern, op_name):
      return part
  return "other"


def op_names(hlo_text: str) -> dict[str, str]:
  """Top-level instruction name -> its metadata op_name (the jax name stack)."""
  out = {}
  for m in re.finditer(r"^\s*%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"", hlo_text, re.M):
    out.setdefault(m.group(1), m.group(2))
  return out


def trace_ops(fn, outdir: str) -> dict[str, tuple[float, int]]:
  """Run fn under the profiler; per executed XLA op name: (total ms over threads, calls)."""
  from jax.profiler import ProfileData
  with jax.profiler.trace(outdir):
    fn()
  pd = ProfileData.from_file(glob.glob(f"{outdir}/**/*.xplane.pb", recursive=True)[0])
  agg: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  for plane in pd.planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name:
        continue
      for ev in line.events:
        if ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "while", "conditional", "call")):
          continue  # containers: their bodies' ops are counted themselves
        agg[ev.name][0] += ev.duration_ns / 1e6
        agg[ev.name][1] += 1
  return {k: (v[0], v[1]) for k, v in agg.items()}


def build(args):
  """(jitted fn, its args, a call that runs it once and blocks); train: train.py's step on the
  batch TrainLoader gives it (benchmarks/train_step.py's JAX side)."""
  from segnext_jax.config import TrainConfig
  from segnext_jax.model import init_variables
  from segnext_jax.train_lib import build_model, create_train_state, jit_train_step, make_mesh, shard_batch
  from jax.sharding import NamedSharding, PartitionSpec as P
  cfg = TrainConfig(variant=args.variant, batch_size=args.batch, crop_size=args.size)
  model = build_model(cfg, common.NUM_CLASSES)
  variables = init_variables(model, jax.random.key(cfg.seed))
  if args.what == "infer":
    image = common.images(args.batch, args.size)
    fwd = jax.jit(lambda v, x: model.apply(v, x))
    return fwd, (variables, image), lambda: jax.block_until_ready(fwd(variables, image))
  mesh = make_mesh()
  state = jax.device_put(create_train_state(cfg, model, variables), NamedSharding(mesh, P()))
  batch = shard_batch(common.train_batch(cfg), mesh)
  step, key, holder = jit_train_step(cfg, mesh), jax.random.key(cfg.seed + 1), {"s": state}

  def once():
    holder["s"], m = step(holder["s"], batch, key)
    jax.block_until_ready(m)
  return step, (state, batch, key), once


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--what", default="train", choices=["train", "infer"])
  p.add_argument("--variant", default="t", choices=["t", "s", "b", "l"])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--top", type=int, default=12, help="also list the N costliest single ops")
  args = p.parse_args()
  common.keep_freed_memory()  # first: before JAX starts
  fn, fn_args, once = build(args)
  compiled = fn.lower(*fn_args).compile()
  names = op_names(compiled.as_text())
  once(), once()  # compile and warm up
  t = time.perf_counter()
  once()
  wall = (time.perf_counter() - t) * 1e3
  with tempfile.TemporaryDirectory() as tmp:
    ops = trace_ops(once, tmp)
  total = sum(ms for ms, _ in ops.values())
  parts: dict[tuple[str, str], float] = collections.Counter()
  for op, (ms, _) in ops.items():
    meta = names.get(op, "")
    direction = "bwd" if "transpose(" in meta or part_of(meta) == OPTIMIZER else "fwd"
    part = part_of(meta) if args.what == "train" or "SegNeXt" in meta else "other"
    parts[(part, direction if args.what == "train" else "fwd")] += ms
  mem = compiled.memory_analysis()
  print(f"SegNeXt-{args.variant.upper()} {args.what}, batch {args.batch}x{args.size}x{args.size}: "
        f"wall {wall:.0f} ms (unprofiled), op time {total:.0f} ms summed over XLA threads, "
        f"XLA temp buffer {mem.temp_size_in_bytes / 2**30:.2f} GiB")
  print("| part | fwd ms | bwd ms | share |")
  print("|---|---|---|---|")
  for part in [p for p, _ in PARTS] + [LOSS, OPTIMIZER, "other"]:
    f, b = parts.get((part, "fwd"), 0.0), parts.get((part, "bwd"), 0.0)
    if f + b > 0:
      print(f"| {part} | {f:.0f} | {b:.0f} | {100 * (f + b) / total:.1f}% |")
  kinds: dict[str, float] = collections.Counter()
  for op, (ms, _) in ops.items():
    kinds[re.sub(r"\.\d+$", "", op)] += ms
  print("\nby XLA op kind: " + ", ".join(f"{k} {ms:.0f} ms" for k, ms in kinds.most_common(8)))
  print(f"\ncostliest ops (of {len(ops)}):")
  for op, (ms, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:args.top]:
    print(f"  {ms:7.1f} ms x{n:<4d} {op:32s} {names.get(op, '?')[:110]}")


if __name__ == "__main__":
  main()
