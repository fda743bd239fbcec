"""TorchServe 0.12 as the serving benchmark's peer: install, archive, start, stop.

1. :func:`ensure_torchserve` finds TorchServe 0.12 (and torch-model-archiver), or installs
   it into its own venv, ``~/.cache/dynembed/torchserve-venv`` by default::

       pip install torch==2.13.0 torchserve==0.12.0 torch-model-archiver==0.12.0

   A venv of its own keeps TorchServe's dependencies (Pillow, psutil, a newer setuptools)
   out of the project's. ``torch==2.13.0`` is pinned because the CPU build of exactly that
   release lies on this machine's disk (pip's ``find-links``); any other torch would come
   from PyPI as a CUDA build of several GB. A ``pip install --dry-run --report`` runs first
   and refuses a plan with a CUDA torch or ``nvidia-*`` packages, before anything is
   downloaded. (``/etc/xdg/pip`` caps torch at 2.14.1 here; 2.13.0 is below the cap.)
2. :func:`build_archive` writes the model's files (:func:`ctr_model.write_artifacts`) and
   packs them, with the handler and ``ctr_model.py``, into ``<model_name>.mar`` with
   torch-model-archiver.
3. :func:`start_torchserve` starts TorchServe on loopback with a ``config.properties`` of its
   own (inference, management, metrics and gRPC addresses on free 127.0.0.1 ports, token
   authorization off, no per-model pip installs, workers and batching as asked), waits
   for ``GET /ping`` to be healthy and every worker of the model to be ready, and returns
   a :class:`TorchServe` whose :meth:`~TorchServe.stop` (also run at exit) stops it:
   ``torchserve --stop``, then SIGTERM / SIGKILL for anything left in its process group.

Isolation: TorchServe keeps its pid file (``.model_server.pid``) and its workers' Unix
sockets (``.ts.sock.<port>``) in the temporary folder, and its logs under ``./logs``. Each
server here runs with ``TMPDIR``/``TEMP``, ``LOG_LOCATION`` and ``METRICS_LOCATION``
pointing into its own work folder, so it neither sees nor stops another TorchServe on the
machine, and ``torchserve --stop`` stops this one only.

Logging: by default (``quiet_logs``) a log4j2 configuration keeps TorchServe's own log at
INFO (startup, errors) and turns off the per-request lines (access log, frontend debug
lines, model and frontend metrics logs) that TorchServe's stock configuration writes for
every request -- what a production deployment tuned for throughput does, and dynembed's
server writes no per-request log lines either. ``quiet_logs=False`` keeps the stock logging.

Batching: TorchServe's frontend waits up to ``max_batch_delay_ms`` to fill a batch of
``batch_size``, so with ``batch_size`` > 1 a lone request (concurrency 1) waits the whole
delay (batch 8 / 5 ms: p50 ~10 ms at concurrency 1 against ~2 ms with batch 1). Choose the
peer's batching per concurrency, or give it the best of a small sweep.

Smoke test (tiny load; prints what it saw)::

    python -m benchmarks.serving_peer.torchserve_peer --requests 20 --load-s 5
    python -m benchmarks.serving_peer.torchserve_peer --small --load-s 0   # seconds
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from benchmarks._common import default_cache_dir, eprint
from benchmarks.serving_peer import ctr_model

TORCHSERVE_VERSION = "0.12.0"
TORCH_VERSION = "2.13.0"
PACKAGES = (f"torch=={TORCH_VERSION}", f"torchserve=={TORCHSERVE_VERSION}",
            f"torch-model-archiver=={TORCHSERVE_VERSION}",
            # TorchServe 0.12's workers import yaml but the wheel does not require PyYAML;
            # numpy: torch warns at every worker start without it.
            "pyyaml", "numpy")
MODEL_NAME = "ctr"
_HERE = Path(__file__).resolve().parent
HANDLER_FILE = _HERE / "torchserve_handler.py"
CTR_MODEL_FILE = _HERE / "ctr_model.py"


def default_venv() -> Path:
    """Where :func:`ensure_torchserve` installs TorchServe: ``<cache>/torchserve-venv``."""
    return default_cache_dir() / "torchserve-venv"


# ------------------------------------------------------------------------------------------
# Install
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchServeEnv:
    """A Python environment with TorchServe and torch-model-archiver.

    Attributes:
        python: its interpreter (TorchServe's workers run on it).
        torchserve: the ``torchserve`` launcher.
        archiver: the ``torch-model-archiver`` command.
        versions: torchserve, torch-model-archiver and torch versions, as installed.
    """

    python: Path
    torchserve: Path
    archiver: Path
    versions: dict = field(default_factory=dict)


# Imports the worker's entry module too: it fails where a dependency TorchServe does not
# declare (PyYAML) is missing, which the frontend would only show as a worker crash loop.
_PROBE = ("import json, importlib.metadata as m, torch, ts.model_service_worker, "
          "ts.torch_handler.base_handler; "
          "print(json.dumps({'torchserve': m.version('torchserve'), "
          "'torch-model-archiver': m.version('torch-model-archiver'), "
          "'torch': torch.__version__, 'cuda': torch.version.cuda}))")


def _probe(python: Path, timeout_s: float = 120) -> dict | None:
    """Versions of TorchServe, the archiver and torch under ``python``; None if any is
    missing."""
    try:
        r = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True,
                           timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _env_of(python: Path) -> TorchServeEnv | None:
    """The TorchServe environment of ``python`` if it has TorchServe 0.12 and a CPU torch."""
    bindir = python.parent
    ts, mar = bindir / "torchserve", bindir / "torch-model-archiver"
    if not (python.exists() and ts.exists() and mar.exists()):
        return None
    v = _probe(python)
    if not v or not v["torchserve"].startswith("0.12.") or v.get("cuda"):
        return None
    return TorchServeEnv(python, ts, mar, v)


def _check_plan(python: Path, log: Callable[[str], None], timeout_s: float) -> None:
    """Asks pip what it would install and refuses a CUDA torch (several GB of downloads)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        r = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--quiet",
                            "--report", report.name, *PACKAGES],
                           capture_output=True, text=True, timeout=timeout_s, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"pip cannot resolve {' '.join(PACKAGES)}: "
                               f"{(r.stderr or r.stdout).strip()[-2000:]}")
        plan = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                for i in json.loads(Path(report.name).read_text())["install"]}
    cuda = sorted(n for n in plan if n.startswith("nvidia-") or n in ("triton",))
    torch_v = plan.get("torch")
    if cuda or (torch_v and "+cpu" not in torch_v):
        raise RuntimeError(f"pip would install a CUDA build of torch ({torch_v}; {cuda}): the "
                           f"CPU wheel of torch {TORCH_VERSION} is not on this machine's "
                           "find-links. Install TorchServe by hand or pass venv= an "
                           "environment that has it.")
    log(f"pip plan: {', '.join(f'{n}=={v}' for n, v in sorted(plan.items()))}")


def _pip_install(python: Path, log: Callable[[str], None], timeout_s: float) -> None:
    """``pip install`` of :data:`PACKAGES` under ``python``, after :func:`_check_plan`."""
    _check_plan(python, log, timeout_s)
    r = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PACKAGES],
                       capture_output=True, text=True, timeout=timeout_s, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(PACKAGES)} failed: "
                           f"{(r.stderr or r.stdout).strip()[-2000:]}")


def ensure_torchserve(venv: str | os.PathLike | None = None, *,
                      log: Callable[[str], None] = eprint,
                      timeout_s: float = 1800) -> TorchServeEnv:
    """TorchServe 0.12 and torch-model-archiver, installed into ``venv`` if needed.

    Uses, in order: the running interpreter if it has TorchServe 0.12; the venv at
    ``venv`` (default :func:`default_venv`) if it is complete, or once ``pip install``
    completes it; else a new venv there (``python -m venv`` from this interpreter, then
    ``pip install`` of :data:`PACKAGES`: about 1 GB, 20-60 s with the local torch wheel),
    built under a temporary name and renamed into place, so an interrupted install leaves
    no half venv behind.

    Raises:
        RuntimeError: the install failed, or pip would pull a CUDA torch.
    """
    here = _env_of(Path(sys.executable))
    if here:
        return here
    target = Path(venv) if venv is not None else default_venv()
    found = _env_of(target / "bin" / "python")
    if found:
        return found
    t = time.perf_counter()
    if (target / "bin" / "python").exists():
        log(f"{target} has no working TorchServe {TORCHSERVE_VERSION}; completing it ...")
        try:
            _pip_install(target / "bin" / "python", log, timeout_s)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            log(f"could not complete it ({e}); making a new one")
        found = _env_of(target / "bin" / "python")
        if found:
            log(f"TorchServe ready in {time.perf_counter() - t:.0f}s: {found.versions}")
            return found
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    log(f"installing TorchServe {TORCHSERVE_VERSION} into {target} ...")
    try:
        # A venv made from inside another venv uses the base interpreter: it does not see
        # the project's packages.
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True,
                       capture_output=True, text=True, timeout=300)
        _pip_install(staging / "bin" / "python", log, timeout_s)
        # The venv's scripts name their interpreter by absolute path: rename, then fix.
        os.replace(staging, target)
        for script in (target / "bin").iterdir():
            if script.is_file() and not script.is_symlink():
                with contextlib.suppress(UnicodeDecodeError, OSError):
                    text = script.read_text()
                    if str(staging) in text:
                        script.write_text(text.replace(str(staging), str(target)))
        cfg = target / "pyvenv.cfg"
        cfg.write_text(cfg.read_text().replace(str(staging), str(target)))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    found = _env_of(target / "bin" / "python")
    if not found:
        raise RuntimeError(f"TorchServe was installed into {target} but does not import "
                           f"(see `{target}/bin/python -c 'import ts.model_service_worker'`)")
    log(f"TorchServe installed in {time.perf_counter() - t:.0f}s: {found.versions}")
    return found


# ------------------------------------------------------------------------------------------
# Archive
# ------------------------------------------------------------------------------------------


def build_archive(store: str | os.PathLike, env: TorchServeEnv, *,
                  workload: ctr_model.Workload | None = None, model_name: str = MODEL_NAME,
                  torch_threads: int = 1, torchscript: bool = True,
                  archive_format: str = "default", timeout_s: float = 600,
                  log: Callable[[str], None] = eprint) -> Path:
    """Builds the CTR model's archive in the model store ``store``.

    The archive holds the handler, ``ctr_model.py``, the MLP's weights, the workload and
    the tables (keys and rows per feature: :func:`ctr_model.write_artifacts`), and a
    ``model-config.yaml`` whose ``handler`` section carries ``torch_threads`` and
    ``torchscript``. Batching and workers are not in it: :func:`start_torchserve` sets them.

    Args:
        store: the model store folder (created if missing).
        env: from :func:`ensure_torchserve`.
        workload: the tables' sizes and seed (default :class:`ctr_model.Workload`).
        model_name: the archive's (and served model's) name.
        torch_threads: intra-op threads of each worker.
        torchscript: run the MLP as frozen TorchScript (else eager).
        archive_format: "default" (a ``.mar`` zip, unpacked by TorchServe at start) or
            "no-archive" (a folder: faster to build and to load).
        timeout_s: limit of the archiver.

    Returns:
        The ``.mar`` file (or the folder with "no-archive").
    """
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ts-archive-", dir=store) as tmp:
        files = ctr_model.write_artifacts(tmp, workload)
        shutil.copy(CTR_MODEL_FILE, Path(tmp) / CTR_MODEL_FILE.name)
        shutil.copy(HANDLER_FILE, Path(tmp) / HANDLER_FILE.name)
        config = Path(tmp) / "model-config.yaml"
        # Flat YAML written by hand: two scalars, no yaml package needed here.
        config.write_text(f"handler:\n  torch_threads: {int(torch_threads)}\n"
                          f"  torchscript: {'true' if torchscript else 'false'}\n")
        extra = [Path(tmp) / CTR_MODEL_FILE.name, *files]
        cmd = [str(env.archiver), "--model-name", model_name, "--version", "1.0",
               "--handler", str(Path(tmp) / HANDLER_FILE.name),
               "--extra-files", ",".join(str(f) for f in extra),
               "--config-file", str(config), "--export-path", str(store),
               "--archive-format", archive_format, "--force"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                           check=False, cwd=tmp)
        if r.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed: {(r.stderr or r.stdout)[-2000:]}")
    out = store / (model_name if archive_format == "no-archive" else f"{model_name}.mar")
    if not out.exists():
        raise RuntimeError(f"torch-model-archiver wrote no {out}")
    size = out.stat().st_size if out.is_file() else sum(
        f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"archive {out} ({size / 2**20:.0f} MiB) built in {time.perf_counter() - t:.1f}s")
    return out


# ------------------------------------------------------------------------------------------
# Start / stop
# ------------------------------------------------------------------------------------------

_QUIET_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<!-- TorchServe's own log at INFO; the per-request lines (access log, frontend debug lines,
     model and frontend metrics) off. -->
<Configuration>
  <Appenders>
    <File name="ts_log" fileName="${env:LOG_LOCATION:-logs}/ts_log.log">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </File>
    <File name="model_log" fileName="${env:LOG_LOCATION:-logs}/model_log.log">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="MODEL_LOG" level="warn" additivity="false">
      <AppenderRef ref="model_log"/>
    </Logger>
    <Logger name="org.pytorch.serve" level="info" additivity="false">
      <AppenderRef ref="ts_log"/>
    </Logger>
    <Root level="warn">
      <AppenderRef ref="ts_log"/>
    </Root>
  </Loggers>
</Configuration>
"""


# Runs beside TorchServe (in a session of its own, so a kill of the caller's process group
# spares it): once the caller is gone -- killed, or exited without stop() -- it ends
# TorchServe's process group, so no server outlives its benchmark. Exits when the group is
# gone; removes the work folder it is given (a temporary one) if it had to step in.
_WATCHDOG = r"""
import os, shutil, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
def group_alive():
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
while group_alive():
    if os.getppid() != parent:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            t = time.monotonic()
            while group_alive() and time.monotonic() - t < wait:
                time.sleep(0.2)
        if len(sys.argv) > 3:
            shutil.rmtree(sys.argv[3], ignore_errors=True)
        break
    time.sleep(0.5)
"""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` right now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def find_java(java: str | os.PathLike | None = None) -> Path:
    """The ``java`` to run TorchServe's frontend with (``$JAVA_HOME/bin/java``, else the one
    on ``PATH``), checked to be Java 11 or newer (TorchServe 0.12 needs 11; 17 is here).

    Raises:
        RuntimeError: no java, or too old.
    """
    if java is None:
        home = os.environ.get("JAVA_HOME")
        java = Path(home) / "bin" / "java" if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise RuntimeError("java not found: TorchServe's frontend needs Java 11+ "
                           "(apt-get install openjdk-17-jre-headless)")
    java = Path(java).resolve()
    r = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=60,
                       check=False)
    m = re.search(r'version "(\d+)', r.stderr + r.stdout)
    if not m or int(m.group(1)) < 11:
        raise RuntimeError(f"{java} is not Java 11+: {(r.stderr or r.stdout).strip()[:200]}")
    return java


# No proxy: TorchServe is on loopback, whatever http_proxy says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_json(url: str, obj, timeout: float = 30.0) -> tuple[int, bytes]:
    """POSTs ``obj`` as a JSON body; (status, response body)."""
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class TorchServe:
    """A running TorchServe (from :func:`start_torchserve`); a context manager that stops
    it on exit.

    Attributes:
        inference_url, management_url, metrics_url: ``http://127.0.0.1:<port>``.
        model_name: the served model.
        predict_url: ``<inference_url>/predictions/<model_name>``, where requests go.
        workdir: its config, logs, temporary folder (and by default its model store).
        startup_s: seconds from launch to every worker ready.
    """

    def __init__(self, env: TorchServeEnv, proc: subprocess.Popen, environ: dict,
                 workdir: Path, ports: dict, model_name: str, own_workdir: bool,
                 log: Callable[[str], None]):
        self.env, self.proc, self.environ, self.workdir = env, proc, environ, workdir
        self.inference_url = f"http://127.0.0.1:{ports['inference']}"
        self.management_url = f"http://127.0.0.1:{ports['management']}"
        self.metrics_url = f"http://127.0.0.1:{ports['metrics']}"
        self.model_name = model_name
        self.predict_url = f"{self.inference_url}/predictions/{model_name}"
        self.startup_s: float | None = None
        self._own_workdir = own_workdir
        self._log = log
        self._stopped = False
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(proc.pid),
             *([str(workdir)] if own_workdir else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    @property
    def pid(self) -> int:
        """Process id (and process group id) of the ``torchserve`` launcher."""
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of TorchServe's own log and of its stdout/stderr."""
        out = []
        for name in ("logs/ts_log.log", "logs/model_log.log", "stdout.log"):
            p = self.workdir / name
            if p.exists():
                text = p.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(out)

    def model_status(self) -> list[dict]:
        """The management API's description of the model (workers and their states)."""
        status, body = _get(f"{self.management_url}/models/{self.model_name}")
        if status != 200:
            raise RuntimeError(f"GET /models/{self.model_name}: {status} {body[:300]!r}")
        return json.loads(body)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - not ours any more
            return False

    def stop(self, timeout_s: float = 60) -> None:
        """Stops TorchServe: ``torchserve --stop`` (its frontend ends its workers), then
        SIGTERM and SIGKILL for whatever is left in its process group. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([str(self.env.torchserve), "--stop"], env=self.environ,
                               cwd=self.workdir, capture_output=True, text=True,
                               timeout=timeout_s, check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout_s)
        # Leftovers: workers still exiting, or everything if --stop failed.
        deadline = time.monotonic() + 10
        sig = signal.SIGTERM
        while self._group_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            if time.monotonic() > deadline:
                sig = signal.SIGKILL
            time.sleep(0.2)
            if time.monotonic() > deadline + 10:
                self._log(f"WARNING: TorchServe process group {self.proc.pid} survived SIGKILL")
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        try:  # it exits by itself once the group is gone
            self._watchdog.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._watchdog.kill()
            self._watchdog.wait()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._log("TorchServe stopped")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_torchserve(archive: str | os.PathLike, env: TorchServeEnv, *,
                     model_name: str = MODEL_NAME, workers: int = 1, batch_size: int = 1,
                     max_batch_delay_ms: int = 5, torch_threads: int = 1,
                     job_queue_size: int = 1000, netty_threads: int | None = None,
                     quiet_logs: bool = True, java: str | os.PathLike | None = None,
                     workdir: str | os.PathLike | None = None,
                     extra_config: dict | None = None, startup_timeout_s: float = 300,
                     log: Callable[[str], None] = eprint) -> TorchServe:
    """Starts TorchServe on loopback serving ``archive`` and waits until it answers.

    Args:
        archive: the ``.mar`` (or "no-archive" folder) from :func:`build_archive`; it is
            served from its folder (the model store).
        env: from :func:`ensure_torchserve`.
        model_name: name of the model in ``archive``.
        workers: Python worker processes of the model (min = max = ``workers``).
        batch_size: most requests the frontend batches into one handler call.
        max_batch_delay_ms: how long the frontend waits to fill a batch.
        torch_threads: ``OMP_NUM_THREADS`` of the workers (the handler also sets torch's
            threads from the archive's model-config.yaml).
        job_queue_size: requests queued per model before TorchServe answers 503 (the stock
            100 is below what a concurrency of 64 with batching may queue).
        netty_threads: frontend I/O threads (``number_of_netty_threads``; default: as many
            as cores).
        quiet_logs: no per-request log lines (see the module's docstring).
        java: the java binary (default :func:`find_java`).
        workdir: folder for config, logs and temporary files (default: a new temporary
            folder, removed by :meth:`TorchServe.stop`).
        extra_config: more ``config.properties`` entries (they win over these).
        startup_timeout_s: limit for TorchServe to be healthy with every worker ready.

    Returns:
        The running :class:`TorchServe`.

    Raises:
        RuntimeError: it did not come up in time or exited (with its log's tail); it is
            stopped first.
    """
    archive = Path(archive).resolve()
    java_bin = find_java(java)
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="torchserve-")) if own else Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "tmp").mkdir(exist_ok=True)
    (wd / "logs").mkdir(exist_ok=True)
    names = ("inference", "management", "metrics", "grpc_inference", "grpc_management",
             "worker")
    ports = dict(zip(names, free_ports(len(names))))
    mar_name = archive.name
    models = {model_name: {"1.0": {
        "defaultVersion": True, "marName": mar_name, "minWorkers": workers,
        "maxWorkers": workers, "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms,
        "responseTimeout": 120}}}
    props = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": ports["grpc_inference"],
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": ports["grpc_management"],
        # Workers talk to the frontend over Unix sockets named after this port (in TMPDIR):
        # a port of our own keeps them apart from another TorchServe's.
        "initial_worker_port": ports["worker"],
        "model_store": str(archive.parent),
        "load_models": mar_name,
        "models": json.dumps(models, separators=(",", ":")),
        "default_workers_per_model": workers,
        "disable_token_authorization": "true",
        "enable_model_api": "false",
        "install_py_dep_per_model": "false",
        "disable_system_metrics": "true",
        "job_queue_size": job_queue_size,
        "default_response_timeout": 120,
        "async_logging": "true",
    }
    if netty_threads:
        props["number_of_netty_threads"] = netty_threads
    props.update(extra_config or {})
    (wd / "config.properties").write_text(
        "".join(f"{k}={v}\n" for k, v in props.items()))
    cmd = [str(env.torchserve), "--start", "--foreground", "--ncs",
           "--ts-config", str(wd / "config.properties"), "--model-store", str(archive.parent)]
    if quiet_logs:
        (wd / "log4j2.xml").write_text(_QUIET_LOG4J2)
        cmd += ["--log-config", str(wd / "log4j2.xml")]
    environ = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "TS_CONFIG_FILE", "VIRTUAL_ENV", "JAVA_HOME")}
    environ.update({
        "PATH": f"{env.python.parent}{os.pathsep}{environ.get('PATH', '')}",
        "JAVA_HOME": str(java_bin.parent.parent),
        "TMPDIR": str(wd / "tmp"), "TEMP": str(wd / "tmp"),
        "LOG_LOCATION": str(wd / "logs"), "METRICS_LOCATION": str(wd / "logs"),
        "OMP_NUM_THREADS": str(torch_threads),
    })
    t0 = time.perf_counter()
    with open(wd / "stdout.log", "ab") as out:
        # Its own session: stop() can signal the launcher, java and the workers together.
        proc = subprocess.Popen(cmd, cwd=wd, env=environ, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = TorchServe(env, proc, environ, wd, ports, model_name, own, log)
    atexit.register(server.stop)
    log(f"TorchServe starting (pid {proc.pid}, inference {server.inference_url}, "
        f"{workers} worker(s), batch {batch_size}/{max_batch_delay_ms} ms, work dir {wd})")
    try:
        _wait_ready(server, workers, t0 + startup_timeout_s)
    except BaseException:
        server.stop()
        raise
    server.startup_s = time.perf_counter() - t0
    log(f"TorchServe ready in {server.startup_s:.1f}s")
    return server


_WORKER_FAILED = ("WorkerInitializationException", "Backend worker error",
                  "Failed to load model")


def _wait_ready(server: TorchServe, workers: int, deadline: float) -> None:
    """Polls ``/ping`` and the model's description until every worker is READY; fails at
    once when a worker fails to start (TorchServe itself would retry it forever, with
    growing delays)."""
    last = "no answer yet"
    ts_log = server.workdir / "logs" / "ts_log.log"
    while time.perf_counter() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"TorchServe exited with code {server.proc.returncode} while "
                               f"starting:\n{server.log_tail()}")
        text = ts_log.read_text(errors="replace") if ts_log.exists() else ""
        if any(m in text for m in _WORKER_FAILED):
            raise RuntimeError(f"a TorchServe worker failed to start:\n{server.log_tail()}")
        try:
            status, body = _get(f"{server.inference_url}/ping", timeout=2)
            if status == 200 and json.loads(body).get("status") == "Healthy":
                desc = server.model_status()
                ready = sum(w.get("status") == "READY" for d in desc
                            for w in d.get("workers", []))
                if ready >= workers:
                    return
                last = f"{ready}/{workers} workers ready"
            else:
                last = f"/ping {status} {body[:200]!r}"
        except (OSError, ValueError, RuntimeError) as e:
            last = repr(e)
        time.sleep(0.25)
    raise RuntimeError(f"TorchServe not ready in time ({last}):\n{server.log_tail()}")


# ------------------------------------------------------------------------------------------
# Smoke test
# ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.serving_peer.torchserve_peer",
        description="Smoke test of the TorchServe peer: install (if needed), archive, start, "
                    "a few requests checked against the reference, a short load, stop.")
    ap.add_argument("--venv", help=f"TorchServe venv (default {default_venv()})")
    ap.add_argument("--store", help="model store folder (default: a temporary one)")
    ap.add_argument("--small", action="store_true",
                    help="small tables (10k users, 1k items): a fast archive and start")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batch-delay-ms", type=int, default=5)
    ap.add_argument("--requests", type=int, default=20, help="requests checked one by one")
    ap.add_argument("--load-s", type=float, default=5.0,
                    help="seconds of load (benchmarks.loadgen); 0: none")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(argv)

    from benchmarks import loadgen
    workload = (ctr_model.Workload(n_users=10_000, n_items=1_000) if args.small
                else ctr_model.Workload())
    env = ensure_torchserve(args.venv)
    eprint(f"TorchServe env: {env.python} {env.versions}")
    with contextlib.ExitStack() as stack:
        store = Path(args.store) if args.store else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="ts-store-")))
        mar = build_archive(store, env, workload=workload)
        server = stack.enter_context(start_torchserve(
            mar, env, workers=args.workers, batch_size=args.batch_size,
            max_batch_delay_ms=args.max_batch_delay_ms))
        requests = ctr_model.make_requests(max(args.requests, 256), seed=1, workload=workload)
        with tempfile.TemporaryDirectory() as tmp:
            ctr_model.write_artifacts(tmp, workload)
            want = ctr_model.reference_scores(
                requests[:args.requests], ctr_model.PeerTables.load(tmp),
                ctr_model.load_dense(tmp, workload))
        worst = 0.0
        for r, w in zip(requests[:args.requests], want):
            status, body = post_json(server.predict_url, r)
            if status != 200:
                raise RuntimeError(f"request {r} -> {status} {body[:300]!r}")
            worst = max(worst, abs(float(json.loads(body)) - w))
        eprint(f"{args.requests} requests answered; max |answer - reference| = {worst:.2e}")
        result = {"startup_s": server.startup_s, "max_abs_diff": worst}
        if args.load_s > 0:
            res = loadgen.run_load(server.predict_url, ctr_model.request_bodies(requests),
                                   concurrency=args.concurrency, duration_s=args.load_s,
                                   warmup_s=min(2.0, args.load_s))
            eprint(loadgen.format_result(res))
            result["load"] = res
        print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
