"""The accelerator table in one call: what backend.py's GPU/TPU row should be, measured.

Sections (each printed as soon as it is measured, so a run cut short keeps what it has):
  depthwise  forward and forward+backward at MSCA's shapes (T, batch 16), each impl and torch's
  train      T and L train steps at batch 16: fp32, bf16, fp32 under the CPU row's measures
             (gradient boundary, chunked loss); peak memory (XLA's memory analysis; torch's
             max_memory_allocated); mmseg torch fp32 in a subprocess
  inference  T and L at batch 1 and 16, fp32 and bf16, against mmseg torch on the same device, with
             the error against torch fp32; whole-network vs staged compile time
  input      the train input pipeline with all host cores (benchmarks/input_pipeline.py)
then the policy row the numbers imply. On a bare GPU machine with mmseg's wheels carried in
(`pip download -d wheels mmsegmentation==1.2.2 mmengine==0.10.7 mmcv-lite==2.1.0 ftfy regex
tensorboardX grain==0.2.18` on a machine with internet):
  pip install --no-index --find-links wheels mmsegmentation==1.2.2 mmengine==0.10.7 \
      mmcv-lite==2.1.0 ftfy regex tensorboardX grain==0.2.18 && pip install --no-deps -e .
  python benchmarks/gpu.py                      # all sections (sized for < 8 min on one H200)
  python benchmarks/gpu.py --only train         # one section again
  python benchmarks/gpu.py --dry-run            # the same code paths at toy sizes, any backend
mmseg's published figures (A100): T/S/B/L 52.4/42.3/35.2/22.9 images/s inference; training
memory 17.9/21.5/31.0/43.3 GB at batch 16.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import jax
import jax.numpy as jnp
import numpy as np

import common  # benchmarks/common.py: this script's folder is first on sys.path

HERE = Path(__file__).resolve().parent

SECTIONS = ("depthwise", "train", "inference", "input")
CPU_MEASURES = dict(gradient_boundary=True, chunked_loss=True)  # the CPU row's training measures


@dataclasses.dataclass(frozen=True)
class Sizes:
  variants: tuple[str, ...]
  batches: tuple[int, ...]
  size: int
  train_batch: int
  runs: int


FULL = Sizes(("t", "l"), (1, 16), 512, 16, 10)
DRY = Sizes(("t",), (2,), 64, 2, 1)


def table(title: str, header: list[str], rows: list[list]) -> None:
  print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
  for r in rows:
    print("| " + " | ".join(str(c) for c in r) + " |", flush=True)


def depthwise_section(sz: Sizes, device: str) -> dict[str, float]:
  """Summed ms over every depthwise conv of T at (train batch, size); returns {impl: fwd+bwd}."""
  import torch
  from depthwise import jax_fns, shapes
  from segnext_jax.backend import DW_IMPLS
  totals = {c: np.zeros(2) for c in (*DW_IMPLS, "torch")}
  for _, shape, k in shapes("t", sz.train_batch, sz.size):
    fns = [jax_fns(impl, shape, k) for impl in DW_IMPLS]
    b, h, w, c = shape
    conv = torch.nn.Conv2d(c, c, k, padding=(k[0] // 2, k[1] // 2), groups=c).to(device)
    x = torch.randn(b, c, h, w, device=device, requires_grad=True)

    def sync():
      if device == "cuda":
        torch.cuda.synchronize()

    def t_fwd():
      with torch.no_grad():
        conv(x)
      sync()

    def t_both():
      (conv(x) ** 2).sum().backward()
      sync()
    fns.append((t_fwd, t_both))
    fwd = common.interleaved_ms([f for f, _ in fns], sz.runs)
    both = common.interleaved_ms([g for _, g in fns], sz.runs)
    for col, a, bb in zip(totals, fwd, both):
      totals[col] += (a, bb)
  table(f"depthwise: T's {len(shapes('t', 1, sz.size))} depthwise convs at batch {sz.train_batch}, "
        f"{sz.size}^2, summed median ms", ["impl", "forward", "forward+backward"],
        [[c, f"{t[0]:.2f}", f"{t[1]:.2f}"] for c, t in totals.items()])
  return {c: float(t[1]) for c, t in totals.items() if c != "torch"}


def jax_train_step(variant: str, batch: int, size: int, runs: int, precision: str,
                   policy: dict) -> dict:
  """ms/step and XLA's peak memory estimate of one train step program, built under `policy`."""
  from segnext_jax import backend
  from segnext_jax.config import TrainConfig
  from segnext_jax.train_lib import build_model, jit_train_step, make_mesh, shard_batch
  from segnext_jax.trainer import initial_state
  cfg = TrainConfig(variant=variant, batch_size=batch, crop_size=size, precision=precision)
  with backend.override(**policy):  # train_step.py's JAX side, under `policy`
    model = build_model(cfg, common.NUM_CLASSES)
    mesh = make_mesh()
    state = initial_state(cfg, model, mesh)
    data = shard_batch(common.train_batch(cfg), mesh)  # as TrainLoader gives it
    key = jax.random.key(cfg.seed + 1)
    t0 = time.perf_counter()
    step = jit_train_step(cfg, mesh).lower(state, data, key).compile()
  compile_s = time.perf_counter() - t0
  mem = step.memory_analysis()
  peak = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes +
                                   mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**30
  holder = {"s": state}

  def one():
    holder["s"], metrics = step(holder["s"], data, key)
    jax.block_until_ready(metrics)
  return {"ms": common.median_ms(one, runs, warmup=1), "peak_gb": peak, "compile_s": compile_s}


def torch_train_steps(variants, batch: int, size: int, runs: int) -> dict:
  """mmseg torch fp32 train steps, one subprocess (train_step.py's torch row) per variant."""
  out = {}
  for v in variants:
    res = subprocess.run([sys.executable, str(HERE / "train_step.py"), "--variant", v, "--batch",
                          str(batch), "--size", str(size), "--runs", str(runs), "--side", "torch"],
                         capture_output=True, text=True, env={**os.environ, "SEGNEXT_JAX_MALLOC": "system"})
    if res.returncode:
      sys.exit(f"torch train step {v} failed:\n{res.stderr[-3000:]}")
    out[v] = json.loads(res.stdout.strip().splitlines()[-1])
  return out


def train_section(sz: Sizes) -> dict[str, float]:
  rows, ms = [], {}
  configs = [("fp32", {}, "plain")] + [("bf16", {}, "plain")] + [("fp32", CPU_MEASURES, "CPU measures")]
  for v in sz.variants:
    for precision, policy, label in configs if v == "t" else configs[:2]:
      r = jax_train_step(v, sz.train_batch, sz.size, sz.runs, precision, policy)
      ms[v, precision, label] = r["ms"]
      peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
      rows.append([v.upper(), "JAX", precision, label, f"{r['ms']:.1f}",
                   f"{1e3 * sz.train_batch / r['ms']:.1f}", peak, f"{r['compile_s']:.0f}"])
  for v, r in torch_train_steps(sz.variants, sz.train_batch, sz.size, sz.runs).items():
    rows.append([v.upper(), "mmseg torch", "fp32", "eager", f"{r['ms']:.1f}",
                 f"{1e3 * sz.train_batch / r['ms']:.1f}", f"{r['peak_gb']:.1f}", "-"])
  table(f"train step at batch {sz.train_batch}, {sz.size}^2", ["variant", "framework", "dtype",
        "policy", "ms/step", "img/s", "peak GB", "compile s"], rows)
  return {"plain": ms["t", "fp32", "plain"], "cpu_measures": ms["t", "fp32", "CPU measures"]}


def inference_section(sz: Sizes, device: str, tmp: Path) -> dict[str, float]:
  import torch
  from segnext_jax import segnext, torch_io
  from segnext_jax.mmseg_reference import TorchReference, fix_nmf_bases
  from segnext_jax.staged import StagedForward
  rows, compile_s = [], {}
  for v in sz.variants:
    (tmp / v).mkdir()
    ref = TorchReference(v, tmp / v)
    variables, _, _ = torch_io.convert_file(ref.path)
    ref.backbone.to(device)
    ref.head.to(device)
    bases = np.asarray(variables["nmf_bases"]["decode_head"]["hamburger"]["bases"])  # (C, R)
    fix_nmf_bases(ref.head, torch.from_numpy(bases).to(device))
    for batch in sz.batches:
      x = common.images(batch, sz.size)
      xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
      xj = jax.device_put(x)
      want = torch_forward(ref, xt, device, False).float().cpu().numpy().transpose(0, 2, 3, 1)
      for dtype in ("fp32", "bf16"):
        model = segnext(v, dtype=jnp.bfloat16 if dtype == "bf16" else jnp.float32)
        fwd = jax.jit(lambda p, x: model.apply(p, x))
        t0 = time.perf_counter()
        out = np.asarray(jax.block_until_ready(fwd(variables, xj)), np.float32)
        if v == "t" and dtype == "fp32" and batch == sz.batches[-1]:
          compile_s["whole"] = time.perf_counter() - t0
          staged = StagedForward(model)
          t0 = time.perf_counter()
          jax.block_until_ready(staged(variables, xj))
          compile_s["staged"] = time.perf_counter() - t0
        jms, tms = common.interleaved_ms([lambda: jax.block_until_ready(fwd(variables, xj)),
                                          lambda: torch_forward(ref, xt, device, dtype == "bf16")], sz.runs)
        rows.append([v.upper(), batch, dtype, f"{1e3 * batch / jms:.1f}", f"{1e3 * batch / tms:.1f}",
                     f"{tms / jms:.2f}x", f"{np.abs(out - want).max() / np.abs(want).max():.1e}"])
  table(f"inference at {sz.size}^2 (img/s; error: max abs vs torch fp32 / its max abs)",
        ["variant", "batch", "dtype", "JAX", "mmseg torch", "JAX/torch", "rel. error"], rows)
  table("whole-mode compile, T fp32 (first call, s)", ["one program", "staged parts"],
        [[f"{compile_s['whole']:.1f}", f"{compile_s['staged']:.1f}"]])
  return compile_s


def torch_forward(ref, xt, device: str, bf16: bool):
  import torch
  with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=bf16):
    out = ref.head(ref.backbone(xt))
  if device == "cuda":
    torch.cuda.synchronize()
  return out


def input_section(dry: bool, tmp: Path) -> None:
  """benchmarks/input_pipeline.py on a generated ADE-sized tree, with every host core."""
  script = HERE / "input_pipeline.py"
  cores = os.cpu_count() or 1
  workers = ["1", "2"] if dry else sorted({"1", str(max(1, cores // 2)), str(cores)}, key=int)
  common.write_ade_train_tree(tmp / "ade")
  res = subprocess.run([sys.executable, str(script), "--data", f"ade20k:{tmp / 'ade'}", "--workers",
                        *workers, *(["--batches", "1", "--mmseg-samples", "8", "--profile-samples", "8"] if dry else [])], capture_output=True, text=True)
  if res.returncode:
    sys.exit(f"input pipeline failed:\n{res.stderr[-3000:]}")
  print(f"\ninput pipeline ({cores} host cores)\n{res.stdout.strip()}", flush=True)


def implied(dw: dict | None, train: dict | None, compile_s: dict | None) -> None:
  """The GPU/TPU row of backend.POLICIES these numbers support."""
  from segnext_jax import backend
  row = dataclasses.asdict(backend.policy())
  if dw:
    row["dw_impl"] = min(dw, key=dw.get)
  if train:
    faster = train["cpu_measures"] < 0.95 * train["plain"]
    row["gradient_boundary"] = row["chunked_loss"] = faster
  if compile_s:
    row["staged_inference"] = compile_s["staged"] < 0.8 * compile_s["whole"]
  print(f"\nimplied policy for {jax.default_backend()}: " +
        ", ".join(f"{k}={v}" for k, v in row.items()) + " (keep_freed_memory is a CPU measure)")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dry-run", action="store_true", help="toy sizes (T only, 64 px, batch 2)")
  p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
  p.add_argument("--runs", type=int, default=None, help="timed runs per measure (default 10)")
  args = p.parse_args()
  common.keep_freed_memory()  # first: before JAX starts (a CPU dry run; a GPU host keeps glibc's)
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sz = DRY if args.dry_run else FULL
  sz = dataclasses.replace(sz, runs=args.runs or sz.runs)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on "
        f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; median of {sz.runs}",
        flush=True)
  t0 = time.perf_counter()
  dw = train = compile_s = None
  with tempfile.TemporaryDirectory() as tmp:
    if "depthwise" in args.only:
      dw = depthwise_section(sz, device)
    if "train" in args.only:
      train = train_section(sz)
    if "inference" in args.only:
      compile_s = inference_section(sz, device, Path(tmp))
    if "input" in args.only:
      input_section(args.dry_run, Path(tmp))
  implied(dw, train, compile_s)
  print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
