"""``dynembed train``: torchrun with sane defaults for elastic jobs, and a progress bar.

    dynembed train --nproc-per-node 2 train.py --steps 1000
    dynembed train --nnodes 1:4 --rdzv-endpoint head:29400 --rdzv-id job7 -m my.train

It runs ``python -m torch.distributed.run`` with c10d rendezvous (no etcd), restarts on
failure (``--max-restarts``), each worker's output in ``--log-dir``, and shows the job's
progress from the file rank 0 of a :class:`~dynembed.train.Runtime` writes.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dynembed.train.progress import PROGRESS_ENV, read_progress
from dynembed.train.runtime import REPEAT_GRACE_S

logger = logging.getLogger(__name__)

TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
"""Environment for torchrun. Workers of a restarted group must not share the agent's store
with the group before it: they would read the dead workers' addresses from it and fail to
connect (pytorch/pytorch#135712); with this set, each group's rank 0 hosts a fresh store."""


@dataclass(kw_only=True)
class LaunchConfig:
    """What ``dynembed train`` passes to torchrun."""

    script: str
    """The training script (a path), or a module with ``module=True``."""
    script_args: list[str] = field(default_factory=list)
    """Arguments of the script."""
    module: bool = False
    """Run ``script`` as a module (``python -m``)."""
    nnodes: str = "1"
    """Nodes: N, or MIN:MAX for an elastic job."""
    nproc_per_node: int = 1
    """Worker processes per node."""
    max_restarts: int = 3
    """Restarts of the worker group after failures before the job fails."""
    rdzv_endpoint: str | None = None
    """host:port of the c10d rendezvous; None on one node picks a free local port."""
    rdzv_id: str = "dynembed"
    """Job id shared by the nodes of one job."""
    rdzv_conf: str | None = None
    """More rendezvous settings, e.g. ``join_timeout=600,last_call_timeout=5`` (seconds to
    wait for the minimum nodes, and for more nodes once the minimum is there)."""
    log_dir: str = "runs/logs"
    """Where each worker's stdout/stderr go (one folder per attempt and rank)."""
    tee: bool = False
    """Also copy the workers' output to this terminal."""
    stop_timeout: int | None = None
    """Seconds the workers get to checkpoint and exit after a stop (SIGTERM) before torchrun
    kills them. None: ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` where set (as in the Kubernetes
    manifests), else :data:`DEFAULT_STOP_TIMEOUT` (torchrun's own default, 30, cut large
    tables' saves short)."""

    def __post_init__(self) -> None:
        parts = self.nnodes.split(":")
        if not 1 <= len(parts) <= 2 or not all(p.isdigit() and int(p) >= 1 for p in parts) \
                or int(parts[0]) > int(parts[-1]):
            raise ValueError(f"nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got "
                             f"{self.nnodes!r}")
        for name in ("nproc_per_node", "max_restarts", "stop_timeout"):
            value = getattr(self, name)
            low = 0 if name == "max_restarts" else 1
            if value is None and name == "stop_timeout":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        # checked here: torchrun fails on a bad --rdzv-conf with a traceback, and takes an
        # endpoint without a port as HOST:29400, then waits for it for minutes
        if self.rdzv_endpoint is not None and not _is_endpoint(self.rdzv_endpoint):
            raise ValueError(f"rdzv_endpoint must be HOST:PORT with a port in 1..65535 (e.g. "
                             f"head:29400, or [::1]:29400 for IPv6), got "
                             f"{self.rdzv_endpoint!r}")
        if self.rdzv_conf and not all(key.strip() and value.strip() for key, _, value in
                                      (p.partition("=") for p in self.rdzv_conf.split(","))):
            raise ValueError(f"rdzv_conf must be KEY=VALUE[,KEY=VALUE...] (e.g. "
                             f"join_timeout=600,last_call_timeout=5), got {self.rdzv_conf!r}")
        # torchrun takes an empty --rdzv-id as "none" and draws a random one per node (the
        # nodes of one job then never meet), and an empty --log-dir as a temporary directory
        if not self.rdzv_id.strip():
            raise ValueError(f"rdzv_id must be a job id, the same on every node (e.g. "
                             f"dynembed or job7), got {self.rdzv_id!r}")
        if not self.log_dir.strip():
            raise ValueError("log_dir must be a directory for the workers' logs (e.g. "
                             "runs/logs), got ''")
        if self.rdzv_endpoint is None and parts[-1] != "1":
            raise ValueError("a job over several nodes needs --rdzv-endpoint HOST:PORT (the "
                             "same on every node, e.g. the first node's address)")
        if self.stop_timeout is None:
            _check_shutdown_env()

    def torchrun_argv(self) -> list[str]:
        """The torchrun command line."""
        argv = [sys.executable, "-m", "torch.distributed.run",
                f"--nnodes={self.nnodes}", f"--nproc-per-node={self.nproc_per_node}",
                f"--max-restarts={self.max_restarts}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.rdzv_endpoint or 'localhost:0'}",
                f"--rdzv-id={self.rdzv_id}", f"--log-dir={self.log_dir}", "--redirects=3"]
        if self.stop_timeout is not None or _SHUTDOWN_ENV not in os.environ:
            argv.append(f"--shutdown-timeout={self.stop_timeout or DEFAULT_STOP_TIMEOUT}")
        if self.rdzv_conf:
            argv.append(f"--rdzv-conf={self.rdzv_conf}")
        if self.tee:
            argv.append("--tee=3")
        if self.module:
            argv.append("-m")
        # "--": torchrun's parser would otherwise read the script's options too, and fail on
        # any that abbreviates one of its own (--max, --log, --node, ...)
        return argv + ["--", self.script, *self.script_args]


def _is_endpoint(value: str) -> bool:
    """Whether ``value`` is HOST:PORT (an IPv6 host in brackets) with a port in 1..65535."""
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # an IPv6 address without brackets: its port cannot be told apart
        return False
    return (re.fullmatch(r"[\w.:-]+", host) is not None  # what torchrun accepts
            and re.fullmatch(r"[0-9]{1,5}", port) is not None and 1 <= int(port) <= 65535)


DEFAULT_STOP_TIMEOUT = 120
"""Seconds the workers get to checkpoint after a stop, unless told otherwise."""
_SHUTDOWN_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


def _check_shutdown_env() -> None:
    """Refuses a ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` that torchrun would fail on or misuse.

    Without ``--stop-timeout`` torchrun reads the variable itself, after the launch: an
    empty or non-numeric value (a manifest's ``value: ""``) failed it with a bare
    ``invalid literal for int()``, and a value below 1 killed the workers before they
    could checkpoint.

    Raises:
        ValueError: the variable is set but not a whole number of seconds >= 1 (named).
    """
    raw = os.environ.get(_SHUTDOWN_ENV)
    if raw is None:
        return
    try:
        seconds = int(raw)  # as torchrun parses it
    except ValueError:
        seconds = None
    if seconds is None or seconds < 1:
        raise ValueError(f"environment variable {_SHUTDOWN_ENV} must be a whole number of "
                         f"seconds >= 1 (the time the workers get to checkpoint after a "
                         f"stop), got {raw!r}; fix or unset it, or give --stop-timeout")


_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Run first in torchrun's process, then replaced by torchrun (exec keeps the setting):
# prctl(PR_SET_PDEATHSIG, SIGTERM) asks Linux for a SIGTERM when the launcher dies; a
# launcher already gone by then is checked for. (Not a preexec_fn: unsafe with threads.)
_STOP_WITH_PARENT = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(128 + signal.SIGTERM); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


def _stopping_with_this_process(argv: list[str]) -> list[str]:
    """``argv`` (a ``python ...`` command) made to get SIGTERM when this process dies.

    torchrun runs in a session of its own (see :func:`launch`), so a launcher killed with
    SIGKILL, or by the OOM killer, left the whole job running, and the same command run
    again raced it for the checkpoints. With this, torchrun stops its workers as for any
    SIGTERM: they checkpoint and exit. Linux only; elsewhere ``argv`` as it is.
    """
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-c", _STOP_WITH_PARENT, str(os.getpid()), *argv[1:]]

_FIND_MODULE = "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)"


def _check_script(config: LaunchConfig) -> None:
    """Fails early on a script that cannot start: else every worker fails at start, torchrun
    restarts them all ``max_restarts`` times and shows only an exit code."""
    if config.module:
        # as the workers will: python -m, with the working directory on the path
        found = subprocess.run([sys.executable, "-c", _FIND_MODULE, config.script],
                               capture_output=True, text=True, timeout=120, check=False)
        if found.returncode != 0:
            why = (found.stderr.strip().splitlines() or ["not found"])[-1]
            raise ValueError(f"-m {config.script}: no such module importable from "
                             f"{os.getcwd()} ({why})")
    elif not (os.path.isfile(config.script)
              or os.path.isfile(os.path.join(config.script, "__main__.py"))):  # python runs both
        raise ValueError(f"script {config.script!r} is not a file (or a directory with a "
                         "__main__.py); give the training script's path, or -m for a module")


def launch(config: LaunchConfig, *, show_progress: bool = True,
           poll_seconds: float = 0.5) -> int:
    """Runs the job to its end and returns torchrun's exit code (128 + N when signal N
    stopped it, as a shell reports).

    torchrun runs in a session of its own, so a Ctrl-C in the terminal reaches only this
    launcher: SIGINT, SIGTERM and SIGHUP are passed on to torchrun as SIGTERM, which it
    passes to the workers; a :class:`~dynembed.train.Runtime` then checkpoints at the next
    step boundary and stops. (A Ctrl-C used to reach the workers directly as SIGINT, and
    they died before checkpointing.)

    Raises:
        ValueError: the script is not a file, ``-m``'s module cannot be found, or
            ``log_dir`` is a file or cannot be made.
    """
    _check_script(config)
    if Path(config.log_dir).exists() and not Path(config.log_dir).is_dir():
        raise ValueError(f"--log-dir {config.log_dir}: is a file; give a directory")
    try:
        Path(config.log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--log-dir {config.log_dir}: cannot be made ({e.strerror}); give "
                         "a directory this user may write") from None
    progress_path = Path(config.log_dir) / "progress.json"
    progress_path.unlink(missing_ok=True)
    env = dict(os.environ, **{PROGRESS_ENV: str(progress_path.resolve())}, **TORCHRUN_ENV)
    proc = subprocess.Popen(_stopping_with_this_process(config.torchrun_argv()), env=env,
                            start_new_session=True)
    stopped_by: list[int] = []
    first = [0.0]

    def forward(signum, frame):
        now = time.monotonic()
        if stopped_by and now - first[0] < REPEAT_GRACE_S:
            # a second Ctrl-C, or a scheduler signalling every process: passed on, it made
            # the workers stop at once, before their checkpoint
            logger.warning("%s again: already stopping (a checkpoint is being written); "
                           "repeat it %d s or more after the first to stop at once",
                           signal.Signals(signum).name, REPEAT_GRACE_S)
            return
        if not stopped_by:  # said once, before torchrun's own report of the signal
            first[0] = now
            logger.warning("%s: asking the workers to stop (SIGTERM); a Runtime checkpoints "
                           "its current step first, and the same command resumes from it",
                           signal.Signals(signum).name)
        stopped_by.append(signum)
        proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in _FORWARDED}
    bar = None
    try:
        while proc.poll() is None:
            time.sleep(poll_seconds)
            if show_progress:
                bar = _show(progress_path, bar)
        if show_progress:
            bar = _show(progress_path, bar)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if bar is not None:
            bar.close()
        if proc.poll() is None:  # this launcher failed: do not leave the job running
            proc.terminate()
            proc.wait()
    if stopped_by and proc.returncode != 0:  # torchrun exits 1 after passing a signal on
        return 128 + stopped_by[0]
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def last_failure(log_dir: str | os.PathLike, since: float = 0.0,
                 lines: int = 20) -> tuple[Path, str] | None:
    """The newest worker log under ``log_dir`` written since ``since`` (a ``time.time()``)
    that holds a traceback, and its last ``lines`` lines: after a failed job, the cause
    (torchrun itself reports only the exit code and ``error_file: <N/A>``; the worker's
    error is in its log).

    Returns:
        (the log file, its last lines), or None if no worker log holds a traceback.
    """
    logs = []
    for log in Path(log_dir).rglob("stderr.log"):
        try:
            written = log.stat().st_mtime
        except OSError:  # removed meanwhile
            continue
        if written >= since:  # not an earlier job's
            logs.append((written, log))
    for _, log in sorted(logs, reverse=True):
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        if "Traceback (most recent call last)" in text:
            return log, "\n".join(text.rstrip().splitlines()[-lines:])
    return None


def _show(path: Path, bar):
    """Updates the progress bar from the progress file; returns it (made on first data)."""
    from tqdm import tqdm

    state = read_progress(path)
    if state is None:
        return bar
    if bar is None:  # it starts where a resumed job starts
        bar = tqdm(total=state.get("total"), initial=state["step"], unit="step",
                   dynamic_ncols=True)
    elif bar.n == state["step"] and state["state"] != "running":
        return bar  # finished: leave the final rate alone
    if state.get("total") and bar.total != state["total"]:
        bar.total = state["total"]
    bar.n = state["step"]
    bar.set_description(f"{state['state']} ranks={state['world_size']} "
                        f"restarts={state['restart_count']}", refresh=False)
    bar.set_postfix({k: f"{v:.4g}" for k, v in state.get("metrics", {}).items()},
                    refresh=False)
    bar.refresh()
    return bar
