"""`python bench/setup_time.py [--rounds 1]`: how long `make setup` takes on a fresh clone, with
empty caches (cold) and again with the caches the first one filled (warm).

Each round clones this repository's committed HEAD into a temporary directory and runs
`make setup` there with a fresh, empty HOME (so no pip or uv cache), then deletes .venv and
runs it again with that HOME (warm caches). pip's configuration stays the machine's: the
user's config directory is passed on as XDG_CONFIG_HOME, since a fresh HOME would hide
~/.config/pip/pip.conf and with it the machine's index settings. Everything is deleted at the
end. Targets: 120 s cold, 30 s warm. The last column is what every fresh process of the
environment then pays to import torch and Lightning (with PYTHONDONTWRITEBYTECODE set, as on
these machines, a set-up that wrote no bytecode would pay compiling them each time).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def make_setup(clone: Path, home: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of make and all it ran)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_CACHE_DIR")}
    env["XDG_CONFIG_HOME"] = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    env["HOME"] = str(home)
    env.pop("XDG_CACHE_HOME", None)  # caches go under the fresh HOME
    started, cpu_before = time.perf_counter(), cpu()
    done = subprocess.run(["make", "setup"], cwd=clone, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started, cpu() - cpu_before
    if done.returncode:
        raise RuntimeError(f"make setup failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    if "uv failed: installing with pip instead" in done.stdout.splitlines():
        raise RuntimeError(f"uv failed, pip installed instead:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    rounds = parser.parse_args().rounds
    # CPU seconds tell what wall time would be on an idle machine of this kind, roughly: on a
    # loaded one the wall time grows with the load and says little.
    print("| round | cold s (CPU s) | warm s (CPU s) | import torch+Lightning s | load average |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in range(1, rounds + 1):
        work = Path(tempfile.mkdtemp(prefix="setup-time-"))
        try:
            clone, home = work / "clone", work / "home"
            home.mkdir()
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            cold = make_setup(clone, home)
            shutil.rmtree(clone / ".venv")
            warm = make_setup(clone, home)
            started = time.perf_counter()
            code = "import torch, lightning.pytorch"
            subprocess.run([clone / ".venv" / "bin" / "python", "-c", code], check=True)
            imports = time.perf_counter() - started
        finally:
            shutil.rmtree(work, ignore_errors=True)
        cells = " | ".join(f"{wall:.1f} ({used:.1f})" for wall, used in (cold, warm))
        print(f"| {r} | {cells} | {imports:.1f} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
