"""Commands the project builds or prints, quoted so that any value survives both readers.

A value reaches a job through two parsers: the shell (when a person copies a printed command)
and Hydra's override grammar (always). Paths with spaces, quotes, non-ASCII letters or `${` must
pass both unchanged.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence


def override(key: str, value: object) -> str:
    """`key='value'` in Hydra's override grammar: quoted, with quotes, the backslashes before
    them and `${` (which OmegaConf would resolve) escaped."""
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, str(value))
    text = text.replace("'", "\\'").replace("${", "\\${")
    return f"{key}='{text}'"


def shell(args: Sequence[str]) -> str:
    """One line a POSIX shell reads back as exactly `args`."""
    return shlex.join(args)


def train_command(*overrides: str) -> str:
    """The shell line that runs `python -m trainlab.train` with these overrides."""
    return shell(["python", "-m", "trainlab.train", *overrides])
