"""Warm job start: a fork server that has imported torch, Lightning and trainlab once, and forks
one process per job of a sweep, so that a job skips the ~5 s of imports a fresh
`python -m trainlab.train` pays.

Each job is still a process of its own (own pid, crash, W&B run, CUDA context, process tree),
and looks like `python -m <module> <args>` from inside: sys.argv, `__main__` and its
`__spec__` are what `python -m` makes them, so Lightning's DDP launcher re-runs the right
command line in its children. The server never initialises CUDA (checked before it serves).

A sweep's command starts the server first thing (start_early, from trainlab.engine.cli), and the
launcher (hydra_plugins/trainlab_sweeps/process_launcher.py) takes it over (server()); it runs
in a session of its own and talks to the launcher over a socket pair, one JSON line a message:
a job to start (argv, environment, cwd, output files, whether it waits for its turn), answered
with its pid, and later with its exit code (the server is the job's parent, and reaps it). The
server exits when the socket closes, that is when the launcher's process ends however it ends
(or is killed with it); its jobs then get SIGTERM from the kernel (stop_with_parent, with the
server as their parent). A sweep that is itself a warm job (the test suite starts its sweeps
so) forks its server from itself instead: the imports are already done.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

# Imported once in the server, besides every module of the project: what a run of the default
# experiment imports, torch and Lightning first (the project's own modules import little).
PRELOAD = (
    "torch",
    "lightning.pytorch",
    "torchmetrics",
    "sklearn.datasets",  # the digits
    "sklearn.model_selection",
    "rich.syntax",  # the printed config
    "rich.tree",
    "hydra._internal.hydra",
    "hydra._internal.config_loader_impl",
    "hydra.core.override_parser.overrides_parser",
    # W&B, the default logger: its import (about 1 s) and what wandb.init imports on first use
    "wandb",
    "lightning.pytorch.loggers.wandb",
    "wandb.sdk.lib.gitlib",
    "requests",
    "psutil",
    "opentelemetry.sdk.metrics",
    "opentelemetry.sdk._logs",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._log_exporter",
)
_STARTUP_ENV = dict(os.environ)  # the server's environment before its imports changed it
_STARTUP_CWD = os.getcwd()


def available() -> bool:
    """Forking a process that has imported torch is safe on Linux; elsewhere jobs start cold."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


_early: Server | None = None  # started by start_early, handed to the launcher by server()


def start_early() -> None:
    """Start the server now, before Hydra composes the sweep (about 3 s of the launcher's own
    start), so that its imports (about 5 s) run beside it rather than after it."""
    global _early
    if _early is None and available():
        _early = Server()


def server() -> Server:
    """The server start_early started, or a new one."""
    global _early
    found, _early = _early, None
    return found or Server()


# The request this process was forked for, in a job the server started; None in any other.
this_job: dict[str, Any] | None = None
TURN_SIGNAL = signal.SIGUSR2  # a held job's go (blocked in the server, so in a job from birth)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def sweep_job() -> bool:
    """Whether this process is a job of a sweep that the server forked: the launcher built its
    command line from the checked sweep, in a run dir it created (cli skips preparing it)."""
    return bool(this_job and this_job["sweep"])


def wait_for_turn() -> None:
    """Where an entry point's task function starts. A job the launcher started ahead of its
    turn (the next job of a sweep run one job at a time) has had Hydra compose its config and
    set up its run dir meanwhile, while the job before it trained; here it waits for its turn,
    before it prints, reads data or touches a device."""
    if this_job and this_job["held"]:
        signal.sigwait([TURN_SIGNAL])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [TURN_SIGNAL])


# --------------------------------------------------------------------------- launcher side


class Server:
    """The launcher's handle on a fork server: `start()` a job, get a Popen-like WarmJob."""

    def __init__(self) -> None:
        from trainlab.engine.jobs import PARENT_ENV

        ours, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
        env["PYTHONUNBUFFERED"] = "1"  # the jobs' stdout and stderr, as for a cold job
        env[PARENT_ENV] = str(os.getpid())  # it stops when this process dies, imports or not
        if this_job is not None and threading.active_count() == 1:
            # This process is a job a server forked (a sweep started warm, as the test suite
            # starts them): a copy of it has everything imported already.
            for stream in (sys.stdout, sys.stderr):
                stream.flush()  # or the copy would write this process's pending output again
            if os.fork() == 0:
                ours.close()
                _serve_as_fork(theirs, env)
        else:
            subprocess.Popen(
                [sys.executable, "-m", "trainlab.engine.warm", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the jobs through here
            )
        theirs.close()
        self._sock = ours
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._gone = False
        self.info: dict[str, Any] = {}  # the server's ready message
        self._requests: dict[int, WarmJob] = {}
        self._jobs: dict[int, WarmJob] = {}  # by pid
        self._next = 0
        threading.Thread(target=self._read, daemon=True, name="warm-server").start()

    def ready(self, timeout: float = 300) -> bool | None:
        """Whether the server has imported everything and serves (False: it failed; None: it
        is still importing after `timeout` seconds)."""
        if not self._ready.wait(timeout):
            return None
        return self.info.get("ready") is True and not self._gone

    def start(
        self,
        module: str,
        args: list[str],
        env: dict[str, str],
        cwd: str,
        console: str,
        stderr: str | None = None,
        sweep: bool = False,
        held: bool = False,
    ):
        """Fork a job that runs `python -m module *args`, its stdout and stderr appended to the
        file `console` (stderr to its own file if given); its WarmJob, or None if the server
        is gone (the caller then starts the job cold). `sweep`: a job of a sweep, whose command
        line the launcher built (see sweep_job); `held`: it waits at wait_for_turn until
        release() is called."""
        job = WarmJob(self)
        with self._lock:
            if self._gone:
                return None
            self._next += 1
            self._requests[self._next] = job
            request = {"id": self._next, "module": module, "args": args, "env": env}
            request.update(
                cwd=cwd, console=console, stderr=stderr or console, sweep=sweep, held=held
            )
        try:
            with self._send_lock:
                self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError:
            return None
        job.started.wait()
        return job if job.pid is not None else None

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                self._on_message(json.loads(line))
        self._on_server_gone()

    def _on_message(self, message: dict[str, Any]) -> None:
        if "ready" in message:
            self.info = message
            self._ready.set()
            return
        with self._lock:
            if "id" in message:  # a job has started
                job = self._requests.pop(message["id"])
                job.pid = message["pid"]
                self._jobs[job.pid] = job
                job.started.set()
            else:  # a job has ended
                job = self._jobs.pop(message["pid"], None)
                if job is not None:
                    job.returncode = message["exit"]
                    job.ended.set()

    def _on_server_gone(self) -> None:
        """The server died (or failed to start): requests fail over to cold starts, and
        running jobs, which the kernel told to stop, are waited for by their pids."""
        with self._lock:
            self._gone = True
            for job in self._requests.values():
                job.started.set()
            self._requests.clear()
            orphans = list(self._jobs.values())
            self._jobs.clear()
        self._ready.set()
        for job in orphans:
            threading.Thread(target=job.wait_orphaned, daemon=True).start()


class WarmJob:
    """What the launcher needs of subprocess.Popen, for a process the server forked."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.pid: int | None = None
        self.returncode: int | None = None
        self.started = threading.Event()
        self.ended = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"warm job {self.pid}", timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def release(self) -> None:
        """A held job (see wait_for_turn): go on."""
        with contextlib.suppress(ProcessLookupError):  # it ended before its turn came
            self.send_signal(TURN_SIGNAL)

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def wait_orphaned(self) -> None:
        """Its exit code is lost with the server: wait until the process is gone."""
        while _alive(self.pid):
            time.sleep(0.2)
        self.returncode = 1
        self.ended.set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped by its new parent) is gone too
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# --------------------------------------------------------------------------- server side


def serve(sock: socket.socket, made_imports: bool = True) -> dict[str, Any]:
    """The server's loop. Returns only in a forked job: the job to run. `made_imports`: this
    process imported the modules (rather than being forked from a job that had)."""
    _preload()
    shared_dirs = _temporary_directories()
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_r, False)
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)  # SIGCHLD wakes select() up
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, [TURN_SIGNAL])
    import torch

    if torch.cuda.is_initialized():  # forked jobs could not use CUDA: let them start cold
        _send(sock, {"ready": False, "error": "CUDA was initialised by an import"})
        os._exit(1)
    _send(sock, {"ready": True, "pid": os.getpid(), "modules": len(sys.modules)})
    buffer = b""
    while True:
        readable, _, _ = select.select([sock, wakeup_r], [], [])
        if wakeup_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wakeup_r, 4096):
                    pass
            _reap(sock)
        if sock in readable:
            data = sock.recv(65536)
            if not data:  # the launcher has gone: so do we, and the kernel stops our jobs
                if made_imports:  # its own, which os._exit would leave behind
                    for tmp in shared_dirs:
                        shutil.rmtree(tmp.name, ignore_errors=True)
                os._exit(0)  # at once: tearing down torch's modules takes seconds
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                job = {**json.loads(line), "server": os.getpid()}
                # A stop signal sent to the job as it starts waits for its own handlers
                # (_fresh_state), rather than meeting the server's, or none.
                mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for fd in (wakeup_r, wakeup_w):
                        os.close(fd)
                    sock.close()
                    _own_temporary_directories(shared_dirs)
                    return job
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                _send(sock, {"id": job["id"], "pid": pid})


def _temporary_directories() -> list[Any]:
    """The tempfile.TemporaryDirectory objects that imports made (wandb stages media and
    artifacts in two): the first job to end would delete them under the others."""
    import gc
    import tempfile

    return [o for o in gc.get_objects() if isinstance(o, tempfile.TemporaryDirectory)]


def _own_temporary_directories(shared: list[Any]) -> None:
    """In a job: a directory of its own for each, which its exit deletes (the object's cleanup,
    which wandb runs at exit, removes what its `name` says; the server's stays)."""
    import tempfile

    for tmp in shared:
        tmp._finalizer.detach()
        tmp.name = tempfile.mkdtemp(suffix=os.path.basename(tmp.name)[11:])  # e.g. wandb-media


def _preload() -> None:
    """Import what jobs import, as they import it: after Hydra has configured logging (a
    library that finds the root logger bare adds a console handler of its own, which
    Lightning does, and which a job's output would then show twice)."""
    import importlib
    import pkgutil

    import trainlab

    placeholder = logging.NullHandler()
    logging.getLogger().addHandler(placeholder)
    modules = [*PRELOAD, *(m.name for m in pkgutil.walk_packages(trainlab.__path__, "trainlab."))]
    for name in modules:
        if name != __spec__.name:
            # an optional dependency missing: the job that needs it says so
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    # What checking a job's values reads and builds (the constructors' declarations, read from
    # source, and pydantic's validators), once here for every job: about 1 s a job otherwise.
    from trainlab.engine import config

    with contextlib.suppress(Exception):
        config.check_values(config.compose("train", []))
    config.forget_compositions()  # they hold this process's cwd and time: each job composes anew
    _snapshot_installed_packages()
    logging.getLogger().removeHandler(placeholder)


def _snapshot_installed_packages() -> None:
    """wandb.init records the installed packages (the run's requirements.txt) by reading every
    package's metadata: about 0.6 s a job. Jobs run the code this process imported, so the
    packages installed now are the ones they run: read once here, and handed to each job."""
    with contextlib.suppress(Exception):  # W&B missing, or laid out otherwise: each job reads
        import wandb.util

        installed = list(wandb.util.working_set())
        wandb.util.working_set = lambda: iter(installed)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the launcher has gone; the next recv says so
        sock.sendall(json.dumps(message).encode() + b"\n")


def run_job(job: dict[str, Any]) -> None:
    """In the forked child: become `python -m <module> <args>` in a fresh process's state,
    with the job's session, output, directory and environment, and run it. Its SystemExit
    (or exception) ends the process as it would end a cold one, atexit handlers included."""
    import runpy

    from trainlab.engine.jobs import PARENT_ENV

    os.setsid()  # a session of its own, as a cold job has: signals reach it from the launcher
    os.chdir(job["cwd"])
    if sys.path and sys.path[0] == _STARTUP_CWD:  # `python -m` puts its directory first
        sys.path[0] = job["cwd"]
    for fd, path in ((1, job["console"]), (2, job["stderr"])):
        file = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(file, fd)
        os.close(file)
    imported = {k: v for k, v in os.environ.items() if k not in _STARTUP_ENV}
    os.environ.clear()
    os.environ.update({**job["env"], **imported})  # e.g. Lightning's NVML check, set at import
    os.environ[PARENT_ENV] = str(job["server"])  # its jobs' parent: they stop when the server dies
    tempfile.tempdir = None  # read from the job's TMPDIR when first asked, as in a fresh process
    global this_job
    this_job = job
    sys.argv = [job["module"], *job["args"]]
    sys.orig_argv = [sys.executable, "-m", job["module"], *job["args"]]
    sys.modules.pop(job["module"], None)  # run afresh as __main__, as `python -m` does
    try:
        # (a stop sent meanwhile is taken here, see serve; by the handler the project's entry
        # points install on their first line, any other module as a fresh process would)
        _fresh_state(held=job["held"], entry_point=job["module"].startswith("trainlab."))
        runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    _exit(code)


def _exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def _exit(code: int) -> None:
    """End as Python ends a process (threads joined, atexit handlers run, output flushed), less
    the interpreter's teardown of every module, which takes 1.5 to 2 s once torch is loaded."""
    threading._shutdown()  # type: ignore[attr-defined]  # joins the job's non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if code < 0:  # killed by a signal, as Python reports a KeyboardInterrupt
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def _fresh_state(held: bool, entry_point: bool = False) -> None:
    """What a fork shares with the server and its other jobs, and a fresh process would not;
    a job of an entry point handles stop signals from here on, as it would from its first
    line (trainlab.engine.stopping)."""
    import numpy as np
    import torch
    from hydra.core.global_hydra import GlobalHydra

    # Python's `random` reseeds itself in a forked child; numpy's and torch's generators would
    # otherwise start every job from the server's state (a job with a seed sets its own).
    np.random.seed()
    torch.seed()
    GlobalHydra.instance().clear()  # the job's hydra.main initialises it
    for signum in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if entry_point:
        from trainlab.engine import stopping

        stopping.install()
    signal.pthread_sigmask(signal.SIG_SETMASK, [TURN_SIGNAL] if held else [])


def main() -> None:
    from trainlab.engine.jobs import stop_with_parent

    stop_with_parent()
    sock = socket.socket(fileno=int(sys.argv[1]))
    run_job(serve(sock))


def _serve_as_fork(sock: socket.socket, env: dict[str, str]) -> None:
    """In a forked copy of a warm job: become the server `python -m trainlab.engine.warm` would be,
    in the state that process would start in."""
    from trainlab.engine.jobs import stop_with_parent

    global this_job, _STARTUP_ENV, _STARTUP_CWD
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.environ.clear()
    os.environ.update(env)
    this_job, _STARTUP_ENV, _STARTUP_CWD = None, dict(env), os.getcwd()
    _fresh_state(held=False)
    stop_with_parent()
    run_job(serve(sock, made_imports=False))


if __name__ == "__main__":
    from trainlab.engine import warm  # this file as the module jobs import (this_job), not __main__

    warm.main()
