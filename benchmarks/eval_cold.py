"""Evaluation from a cold start, the time to a result: the whole `eval.py` process (empty compile
cache) against mmseg 1.x's own `Runner.test` on the same images and the same weights, whole-image
and ms+flip TTA. The throughput of an evaluation already compiled is eval_throughput.py's.

  python benchmarks/eval_cold.py [--images 10] [--modes whole tta] [--sides ours mmseg]
  python benchmarks/eval_cold.py --profile [--modes tta]   # where our cold eval's time goes
  python benchmarks/eval_cold.py --no-warm                 # skip the second (warm-cache) process

Images: common.write_ade_eval_tree (the three real ADE20K val JPEGs of tests/data, cut and
resized to 200-700 px: ADE20K's val set has no single size). The model is a random-init
SegNeXt-T built by mmseg from its ADE20K config, saved as an mmseg .pth (what `Runner.test` loads)
and converted with convert/from_torch.py (what `eval.py` loads). Each run is its own process, timed
from start to exit: ours with an empty compile cache, mmseg as its tools/test.py runs a config
(`--tta`: SegTTAModel over the config's tta_pipeline); then ours once more, the compile cache
that the first process filled now warm (what a second evaluation on the machine costs).
`--profile` runs our evaluation in this process (opted in to the malloc policy, as eval.py is)
and sums XLA compile time per jitted function, against the wall time.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # benchmarks/common.py: this script's folder is first on sys.path

ROOT = common.REPO
MMSEG_CONFIG = "segnext/segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512.py"


def mmseg_config(tta: bool, data: Path, pth: Path | None, work_dir: Path):
  """The wheel's SegNeXt-T ADE20K config, pointed at `data` and `pth` (tools/test.py's --tta)."""
  from segnext_jax.mmseg_reference import stub_mmcv_ops
  stub_mmcv_ops()
  import mmseg
  from mmengine.config import Config
  cfg = Config.fromfile(str(Path(mmseg.__file__).parent / ".mim/configs" / MMSEG_CONFIG))
  cfg.model.backbone.init_cfg = None  # no download: the weights come from `pth`
  cfg.work_dir, cfg.load_from = str(work_dir), None if pth is None else str(pth)
  cfg.test_dataloader.dataset.data_root = str(data)
  if tta:
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.tta_model.module = cfg.model
    cfg.model = cfg.tta_model
  return cfg


def write_checkpoint(tmp: Path) -> tuple[Path, Path]:
  """A random-init mmseg SegNeXt-T .pth (mmseg's own init) and its convert/from_torch.py output."""
  cfg = mmseg_config(False, tmp, None, tmp)
  import torch
  from mmseg.registry import MODELS
  from mmseg.utils import register_all_modules
  register_all_modules()
  torch.manual_seed(0)
  with contextlib.redirect_stdout(sys.stderr):  # mmseg's MSCAN prints its init_cfg: not a result
    model = MODELS.build(cfg.model)
  from mmengine.logging import MMLogger
  MMLogger.get_current_instance().setLevel(logging.ERROR)  # init_weights logs every tensor
  model.init_weights()
  pth = tmp / "segnext_t_random.pth"
  torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": model.state_dict()}, pth)
  out = tmp / "segnext_t_random"
  subprocess.run([sys.executable, str(ROOT / "convert" / "from_torch.py"), str(pth), "-o", str(out)],
                 check=True, capture_output=True)
  return pth, out


def mmseg_side(args) -> None:
  """Runner.test in this process (the child that is timed)."""
  from mmengine.runner import Runner
  cfg = mmseg_config(args.mode == "tta", Path(args.data), Path(args.pth), Path(args.work_dir))
  metrics = Runner.from_cfg(cfg).test()
  print(json.dumps({"mIoU": float(metrics["mIoU"])}))


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
  t = time.perf_counter()
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  seconds = time.perf_counter() - t
  if out.returncode:
    sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
  return seconds, out.stdout


def eval_flags(ckpt: Path, data: Path, mode: str, cache: Path, extra: list[str]) -> list[str]:
  return [str(ckpt), f"--data=ade20k:{data}", f"--compile-cache={cache}",
          *(["--tta"] if mode == "tta" else []), *extra]


def ours(ckpt: Path, data: Path, mode: str, cache: Path, extra: list[str]) -> tuple[float, float]:
  """(seconds, mIoU) of one cold eval.py process."""
  cmd = [sys.executable, str(ROOT / "eval.py"), *eval_flags(ckpt, data, mode, cache, extra)]
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  seconds, out = timed(cmd, env)
  return seconds, float(re.search(r"mIoU ([\d.]+)", out).group(1))


def theirs(pth: Path, data: Path, mode: str, work_dir: Path) -> tuple[float, float]:
  """(seconds, mIoU) of one mmseg Runner.test process."""
  seconds, out = timed([sys.executable, __file__, "--mmseg-side", "--mode", mode, "--data",
                        str(data), "--pth", str(pth), "--work-dir", str(work_dir)])
  return seconds, json.loads(out.strip().splitlines()[-1])["mIoU"]


def profile(ckpt: Path, data: Path, mode: str, cache: Path, extra: list[str]) -> None:
  """Our eval in this process: wall time, and XLA compile seconds per jitted function."""
  import jax
  from jax import monitoring
  compiles: dict[str, list[float]] = collections.defaultdict(list)

  def listen(event: str, seconds: float, **kw) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      compiles[kw.get("fun_name", "?")].append(seconds)

  monitoring.register_event_duration_secs_listener(listen)
  from segnext_jax.cli.eval import main as eval_main  # what eval.py runs
  t = time.perf_counter()
  eval_main(eval_flags(ckpt, data, mode, cache, extra))
  wall = time.perf_counter() - t
  total = sum(map(sum, compiles.values()))
  print(f"\n{mode}: wall {wall:.1f} s (after imports), XLA compile {total:.1f} s in "
        f"{sum(map(len, compiles.values()))} programs, jax {jax.__version__}")
  print("| function | programs | compile s |\n|---|---|---|")
  for name, secs in sorted(compiles.items(), key=lambda kv: -sum(kv[1])):
    print(f"| {name} | {len(secs)} | {sum(secs):.1f} |")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=10)
  p.add_argument("--modes", nargs="+", default=["whole", "tta"], choices=["whole", "tta"])
  p.add_argument("--sides", nargs="+", default=["ours", "mmseg"], choices=["ours", "mmseg"])
  p.add_argument("--profile", action="store_true", help="profile our eval in this process instead")
  p.add_argument("--no-warm", dest="warm", action="store_false",
                 help="skip our second process (compile cache warm)")
  p.add_argument("--eval-flags", nargs="*", default=[], metavar="FLAG",
                 help="more eval.py flags, e.g. --eval-flags=--buckets-per-octave=4")
  p.add_argument("--mmseg-side", action="store_true", help=argparse.SUPPRESS)
  for hidden in ("--mode", "--data", "--pth", "--work-dir"):
    p.add_argument(hidden, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.mmseg_side:
    return mmseg_side(args)
  if args.profile:
    common.keep_freed_memory()  # first: before JAX starts
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    sizes = common.write_ade_eval_tree(tmp / "ade", args.images)
    pth, ckpt = write_checkpoint(tmp)
    for mode in args.modes:
      if args.profile:
        profile(ckpt, tmp / "ade", mode, tmp / f"cache-profile-{mode}", args.eval_flags)
        continue
      runs = [s for side in args.sides for s in ([side, "warm"] if side == "ours" and args.warm
                                                  else [side])]
      for side in runs:
        if side == "mmseg":
          s, miou = theirs(pth, tmp / "ade", mode, tmp / f"work-{mode}")
        else:  # "warm": the cache "ours" filled
          s, miou = ours(ckpt, tmp / "ade", mode, tmp / f"cache-{mode}", args.eval_flags)
        rows.append((mode, side, s, miou))
        print(f"{mode} {side}: {s:.1f} s, mIoU {miou:.2f}", file=sys.stderr, flush=True)
  if args.profile:
    return
  print(f"Cold eval, SegNeXt-T (random init), {args.images} ADE20K-format JPEGs of "
        f"{min(map(min, sizes))}-{max(map(max, sizes))} px, {os.cpu_count()} CPU cores; whole "
        "processes, ours with an empty compile cache (and again with it warm)")
  print("| mode | evaluator | seconds | images/s | mIoU |\n|---|---|---|---|---|")
  for mode, side, s, miou in rows:
    name = {"ours": "eval.py", "warm": "eval.py, compile cache warm",
            "mmseg": "mmseg Runner.test"}[side]
    print(f"| {mode} | {name} | {s:.1f} | {args.images / s:.2f} | {miou:.2f} |")


if __name__ == "__main__":
  main()
