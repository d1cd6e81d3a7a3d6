"""`python bench/sweep_overhead.py [--rounds 2]`: what a sweep spends outside training, with
each job started cold (a fresh `python -m trainlab.train`) and warm (forked from a process
that has imported torch and Lightning: `hydra.launcher.warm`, the default).

The sweep is the default experiment over four learning rates, CSV logger. Cold and warm run
in alternating order, round after round, in fresh directories. Per-job overhead = (the
sweep's wall time - the sum of its jobs' duration_s, from their metrics.json) / jobs.
Then the time from the command to the first training step of a single cold run
(bench/probe.py hooks it), best of three.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["-m", "optimizer.lr=1e-3,2e-3,3e-3,5e-3", "logger=csv"]


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_SERVICE")}


def sweep(warm: bool) -> tuple[float, float, int, float]:
    """(wall seconds, sum of the jobs' duration_s, jobs, mean start-and-end of a job after the
    first) of one sweep. A job's start and end is the launcher's time for it (from starting it
    to its exit) less its own duration_s: what each further job of a longer sweep costs."""
    command = [sys.executable, "-m", "trainlab.train", *SWEEP, f"hydra.launcher.warm={warm}"]
    with tempfile.TemporaryDirectory() as cwd:
        started = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode:
            raise RuntimeError(f"the sweep failed:\n{done.stderr[-2000:]}")
        (record,) = Path(cwd).glob("logs/train/sweeps/*/sweep.json")
        jobs = json.loads(record.read_text())["jobs"].values()
        assert {job["start"] for job in jobs} == {"warm" if warm else "cold"}
        own = [json.loads(Path(cwd, j["dir"], "metrics.json").read_text()) for j in jobs]
        rest = [
            j["duration_s"] - m["duration_s"]
            for j, m in zip(jobs, own, strict=True)
            if j["num"] > 0
        ]
    return wall, sum(m["duration_s"] for m in own), len(own), sum(rest) / len(rest)


def first_step() -> float:
    """Seconds from the command to the first optimizer step of a one-step cold run."""
    command = [sys.executable, str(ROOT / "bench" / "probe.py"), "logger=csv"]
    command += ["+trainer.max_steps=1", "test=false"]
    with tempfile.TemporaryDirectory() as cwd:
        started = time.time()
        done = subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the run failed:\n{done.stderr[-2000:]}")
        return float(re.findall(r" at (\d+\.\d+)$", done.stdout, re.MULTILINE)[0]) - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="cold and warm sweeps each")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores, load average at start {load:.2f}\n")
    print("| round | start | sweep wall s | sum of duration_s | overhead a job s | later job s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    overhead: dict[str, list[float]] = {"cold": [], "warm": []}
    for n in range(args.rounds):
        order = (False, True) if n % 2 == 0 else (True, False)
        for warm in order:
            wall, trained, jobs, later = sweep(warm)
            name = "warm" if warm else "cold"
            overhead[name].append((wall - trained) / jobs)
            row = f"| {n + 1} | {name} | {wall:.1f} | {trained:.1f} | {overhead[name][-1]:.2f} |"
            print(f"{row} {later:.2f} |", flush=True)
    print()
    for name, values in overhead.items():
        print(f"{name}: overhead per job {min(values):.2f} to {max(values):.2f} s")
    steps = [first_step() for _ in range(3)]
    print(
        f"command to first training step, one cold run (logger=csv): {min(steps):.2f} s "
        f"(best of 3; {', '.join(f'{s:.2f}' for s in steps)})"
    )


if __name__ == "__main__":
    main()
