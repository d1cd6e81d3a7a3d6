"""Errors that are the user's to fix: printed as one paragraph, never as a traceback."""

import contextlib
import os
import sys
from collections.abc import Iterator


class UserError(Exception):
    """A problem with the command, the config or the files that the user can fix.

    The message says what is wrong and what to do; the entry points print it and exit 2.
    `discard=True` says the run's steps are no use (it trained, but not as the command meant,
    e.g. toward a metric the model never logs): its directory goes unless it holds a checkpoint.
    """

    def __init__(self, message: str, discard: bool = False):
        super().__init__(message)
        self.discard = discard


# The last UserError exit_with printed: the command line (engine.cli) reads whether its run's
# directory is to be discarded once Hydra has returned.
printed: UserError | None = None


def exit_with(error: UserError) -> None:
    """Print a UserError as one paragraph and exit 2 (or re-raise it under HYDRA_FULL_ERROR=1)."""
    global printed
    printed = error
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    message = str(error)
    if "Original Traceback" in message:  # raised in a DataLoader worker: keep its own words
        message = message.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError behind `error`, if any: Hydra's instantiate wraps whatever a constructor
    raises (a net refusing its input shape, say) in an InstantiationException."""
    while error is not None and not isinstance(error, UserError):
        error = error.__cause__
    return error


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For the entry points: a UserError raised inside, wrapped or not, ends the process as one
    paragraph with exit code 2; any other error goes on up."""
    try:
        yield
    except Exception as e:
        error = user_error_in(e)
        if error is None:
            raise
        exit_with(error)


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; `signum` says which."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
