"""`.venv/bin/python tools/uv_install.py <uv pip install arguments>`: install into the
environment of the Python that runs this, with uv, as pip would install here.

uv is the one on PATH, else the environment's own, else installed into the environment with
pip. uv does not read pip's configuration, so the index settings pip has here (its config files
and PIP_* variables, as `pip config list` shows them: index-url, extra-index-url, find-links,
no-index, constraint, cert) are passed on: a machine whose pip takes torch from a local wheel
directory or mirror must not have uv download several GB instead. Exits non-zero when uv
cannot be had or fails; `make setup` then installs with pip.

`--print-command` prints the uv command instead of running it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

# pip's option -> uv pip install's; each takes one or more values (pip separates them by
# whitespace), but for no-index, a flag.
OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_settings() -> dict[str, str]:
    """pip's effective settings for `pip install`: an environment variable over the install
    section of a config file over its global section (the files merged by pip, the user's over
    the machine's)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    rank = {":env:": 0, "install": 1, "global": 2}
    found: dict[str, tuple[int, str]] = {}
    for line in listed.stdout.splitlines():
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if sep and section in rank and rank[section] < found.get(name, (3, ""))[0]:
            try:
                found[name] = (rank[section], str(ast.literal_eval(value)))
            except (ValueError, SyntaxError):
                continue
    return {name: value for name, (_, value) in found.items()}


def uv_arguments(settings: dict[str, str]) -> list[str]:
    args = []
    for name, flag in OPTIONS.items():
        for value in settings.get(name, "").split():
            args += [flag, value]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    # pip takes the best version from all its indexes together; uv by default takes a package
    # from the first index that has it, which would fail on a mirror holding other versions.
    return [*args, "--index-strategy", "unsafe-best-match"]


def find_uv() -> str | None:
    """uv on PATH, else this environment's, else installed into it with pip."""
    own = Path(sys.executable).with_name("uv")
    found = shutil.which("uv") or (str(own) if own.exists() else None)
    if found:
        return found
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--progress-bar", "off", "uv"],
        capture_output=True,
        text=True,
    )
    if installed.returncode or not own.exists():
        print(f"uv could not be installed with pip:\n{installed.stderr[-2000:]}", file=sys.stderr)
        return None
    return str(own)


def main() -> int:
    args = sys.argv[1:]
    show = "--print-command" in args
    args = [a for a in args if a != "--print-command"]
    settings = pip_settings()
    uv = "uv" if show else find_uv()
    if uv is None:
        return 3
    command = [uv, "pip", "install", "--quiet", "--python", sys.executable]
    command += [*uv_arguments(settings), *args]
    env = dict(os.environ)
    if settings.get("cert"):  # pip's CA bundle, e.g. a proxy's
        env.setdefault("SSL_CERT_FILE", settings["cert"])
    if show:
        print(" ".join(command))
        return 0
    return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
