"""Every CPU benchmark in one run, one table each, recorded in docs/benchmarks.md with the date, the
machine and each command: inference (T, L at batch 1 and 8), the train step (T and L, batch 2),
eval throughput once compiled and eval from a cold start (whole and TTA). Needs the dev extra
(mmseg torch).

  python benchmarks/all.py             # about 40 min on 2 cores; rewrites docs/benchmarks.md
  python benchmarks/all.py --quick     # T only, fewer runs and images; prints, writes no file
  python benchmarks/all.py --dry-run   # the machine and the commands; runs nothing
  python benchmarks/all.py --out FILE  # record there instead ('-': print only)
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOC = REPO / "docs" / "benchmarks.md"

# The file's fixed part: what the benchmarks are and how to read them (a run adds the rest).
PREAMBLE = """\
# Benchmarks

Written by `python benchmarks/all.py`: a full run replaces this file (edit `benchmarks/all.py`,
not this file). What the numbers mean, where the time goes and which targets are missed:
[performance.md](performance.md); dated before/after measurements: [CHANGELOG.md](../CHANGELOG.md).

```bash
pip install -e .[dev]                 # the benchmarks run mmseg's own torch modules next to ours
python benchmarks/all.py              # the four below, one table each (about 40 min; --quick: T only)
python benchmarks/inference.py        # T and L at batch 1 and 8, 512x512: ms/img, torch/JAX,
                                      # achieved GFLOP/s next to the machine's matmul GFLOP/s
python benchmarks/train_step.py       # T (or --variant l), batch 2 at 512x512 as TrainLoader gives it
                                      # (uint8): train.py's step, ms and peak RSS, vs mmseg torch
python benchmarks/eval_throughput.py  # eval.py's evaluate on 10 ADE-sized images, whole and TTA:
                                      # images/s once every program is compiled
python benchmarks/eval_cold.py        # the same images from a cold start: whole eval.py processes
                                      # (empty, then warm compile cache) vs mmseg's Runner.test
python benchmarks/op_profile.py       # where a step's time goes, per model part (jax.profiler + HLO)
python benchmarks/depthwise.py        # each depthwise impl against torch (docs/backends.md)
python benchmarks/export_latency.py   # ONNX (onnxruntime) and StableHLO next to JAX (docs/deploy.md)
python benchmarks/loss.py             # the decode-head loss alone, chunked/plain, class weights, vs mmseg
python benchmarks/gpu.py              # on a GPU machine: the one-call GPU table (docs/performance.md)
```

Same weights on both sides; torch is mmseg's own modules, eager. `inference.py` times both in one
process, interleaved run by run; `train_step.py` runs each side in its own process (peak RSS is
its own): JAX opted in to segnext_jax's malloc policy as the commands are, torch with glibc's
default malloc as mmseg users run it, and a third row with torch under the policy.
`eval_throughput.py` times evaluate() passes after a compiling one, in one process;
`eval_cold.py` times whole processes from start to exit. On this project's shared CI-like
machine (2 cores, other jobs running) the same benchmark varies by 10% or more between runs:
compare the rows of one run with each other, not with another run's.
"""


def jobs(quick: bool) -> list[list[str]]:
  """The benchmark commands of a run, as argv after `python benchmarks/`."""
  variants = ["t"] if quick else ["t", "l"]
  runs = "3" if quick else "7"
  out = [["inference.py", "--variants", *variants, "--runs", runs]]
  out += [["train_step.py", "--variant", v, "--runs", "3" if v == "l" else runs] for v in variants]
  images = "3" if quick else "10"
  out += [["eval_throughput.py", "--images", images]]
  out += [["eval_cold.py", "--images", images, *(["--modes", "whole"] if quick else [])]]
  return out


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "unknown")
  except OSError:
    return platform.processor() or "unknown"


def _memory_gib() -> str:
  try:
    with open("/proc/meminfo") as f:
      kib = next(int(l.split()[1]) for l in f if l.startswith("MemTotal:"))
    return f"{kib / 2**20:.0f} GiB"
  except (OSError, StopIteration, ValueError):
    return "unknown"


def _versions() -> str:
  found = []
  for name in ("jax", "jaxlib", "flax", "torch", "mmsegmentation"):
    try:
      found.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      found.append(f"{name} not installed")
  return f"python {platform.python_version()}, " + ", ".join(found)


def _commit() -> str:
  git = ["git", "-C", str(REPO)]
  try:
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown (not a git checkout)"
  return head + (" with uncommitted changes" if dirty else "")


def machine() -> list[str]:
  """What the numbers were measured on: CPUs, memory, load at the start, software, commit."""
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
  return [f"CPU: {_cpu_model()}, {os.cpu_count()} logical CPUs ({usable} usable by this process)",
          f"memory: {_memory_gib()}; load average at the start: {load}",
          f"software: {_versions()}",
          f"commit: {_commit()}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
          f"SEGNEXT_JAX_MALLOC={os.environ.get('SEGNEXT_JAX_MALLOC', '')!r}"]


def as_markdown(output: str) -> list[str]:
  """A script's output as markdown: each table kept whole, every other line its own paragraph."""
  md: list[str] = []
  for line in (l.rstrip() for l in output.splitlines() if l.strip()):
    is_row = line.startswith("|")
    if md and not (is_row and md[-1].startswith("|")):
      md.append("")
    md.append(line)
  return md


def render(started: datetime.datetime, quick: bool, host: list[str],
           results: list[tuple[list[str], float, str]]) -> str:
  """The whole file: the preamble, then this run's machine, commands and outputs."""
  total = sum(s for _, s, _ in results)
  lines = [PREAMBLE, f"## Last recorded run: {started:%Y-%m-%d %H:%M} UTC"
           f"{' (--quick)' if quick else ''}", "",
           f"`python benchmarks/all.py{' --quick' if quick else ''}`: {total:.0f} s in all.", ""]
  lines += [f"- {h}" for h in host]
  for job, seconds, output in results:
    lines += ["", f"### `python benchmarks/{' '.join(job)}` ({seconds:.0f} s)", ""]
    lines += as_markdown(output)
  return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
  """Replace `path` whole or not at all (a temporary file renamed over it)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def run(job: list[str]) -> tuple[float, str, tuple[int, str] | None]:
  """(seconds, stdout, None), or with (exit status, the end of stderr) for a failed benchmark."""
  t0 = time.perf_counter()
  out = subprocess.run([sys.executable, str(HERE / job[0]), *job[1:]], capture_output=True,
                       text=True, cwd=REPO)
  failure = None if out.returncode == 0 else (out.returncode, out.stderr[-2000:])
  return time.perf_counter() - t0, out.stdout, failure


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="T only, fewer runs and images (no file by default)")
  p.add_argument("--dry-run", action="store_true", help="print the machine and the commands, run nothing")
  p.add_argument("--out", help=f"markdown file to write (default: {DOC.relative_to(REPO)} for a full "
                 "run, none for --quick; '-' = print only)")
  args = p.parse_args()
  out = args.out or ("-" if args.quick else str(DOC))
  if out != "-" and not Path(out).parent.is_dir():
    print(f"error: --out {out}: no directory {Path(out).parent}", file=sys.stderr)
    return 2
  started = datetime.datetime.now(datetime.timezone.utc)
  host = machine()
  print(f"# benchmarks/all.py, {started:%Y-%m-%d %H:%M} UTC", *host, sep="\n", flush=True)
  results = []
  for job in jobs(args.quick):
    print(f"\n$ python benchmarks/{' '.join(job)}", flush=True)
    if args.dry_run:
      continue
    seconds, stdout, failure = run(job)
    print("\n".join(l for l in stdout.splitlines() if l.strip()) or "(no output)", flush=True)
    if failure:
      print(failure[1], file=sys.stderr)
      print(f"error: benchmarks/{job[0]} failed (exit {failure[0]}, its stderr above); "
            f"{'nothing written' if out == '-' else out + ' left as it was'}", file=sys.stderr)
      return 2
    results.append((job, seconds, stdout))
  if args.dry_run or out == "-":
    return 0
  write(Path(out), render(started, args.quick, host, results))
  print(f"\nwrote {out}", flush=True)
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except KeyboardInterrupt:
    print("interrupted (Ctrl-C); nothing written", file=sys.stderr)
    sys.exit(130)
