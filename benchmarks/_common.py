"""Shared helpers for the benchmarks: workload generation, timing, memory, machine info,
and the harness that runs each system in its own child process and writes the report.

Nothing here imports dynembed or fbgemm; the phases in :mod:`benchmarks.core` and
:mod:`benchmarks.tiers` do that lazily.
"""

from __future__ import annotations

import argparse
import collections
import gc
import glob
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of ``x + golden``: a bijection uint64 -> uint64, returned as int64.

    Used to turn a dense row index 0..N-1 into an id spread over the whole int64 range, so
    distinct rows always get distinct ids.
    """
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return z.view(np.int64)


def zipf_ranks(rng: np.random.Generator, a: float, n_max: int, size: int) -> np.ndarray:
    """``size`` Zipf(a) ranks in 1..n_max: numpy's Zipf sampler, truncated by rejection."""
    out: list[np.ndarray] = []
    have = 0
    while have < size:
        z = rng.zipf(a, size=max(1024, int((size - have) * 1.5)))
        z = z[z <= n_max]
        out.append(z)
        have += z.size
    return np.concatenate(out)[:size].astype(np.int64)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _pass_source(batches) -> Callable[[int], Sequence[object]]:
    return batches if callable(batches) else (lambda _rep: batches)


def _warm_up(fn, get, warmup: int, min_warmup_s: float, max_warmup: int) -> int:
    """Untimed passes: at least ``warmup``, and more (up to ``max_warmup``) until
    ``min_warmup_s`` seconds have gone by. Returns the passes run."""
    t_warm = time.perf_counter()
    w = 0
    while w < warmup or (w < max_warmup and time.perf_counter() - t_warm < min_warmup_s):
        for b in get(-1 - w):
            fn(b)
        w += 1
    return w


def _timed_pass(fn, bs: Sequence[object]) -> float:
    """Seconds of one pass of ``fn`` over ``bs``, with the garbage collector off (as in
    timeit) after a collection."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for b in bs:
            fn(b)
        return time.perf_counter() - t0
    finally:
        if was_enabled:
            gc.enable()


def time_batches(fn: Callable[[object], object], batches: Sequence[object] | Callable[[int], Sequence[object]],
                 *, keys_per_batch: int, repeats: int, warmup: int,
                 min_warmup_s: float = 0.0, max_warmup: int = 50) -> dict:
    """Runs ``fn`` over every batch, untimed warm-up passes then ``repeats`` timed passes.

    Warm-up runs at least ``warmup`` passes and keeps going (up to ``max_warmup`` passes)
    until ``min_warmup_s`` seconds have gone by, so fast operations also reach a steady state
    (allocator, page faults, thread pools) before they are timed.

    ``batches`` is a sequence, or a callable ``rep -> sequence`` called (untimed) before each
    pass, for workloads whose inputs must be fresh every pass (warm-up passes get rep -1, -2,
    ...). The garbage collector is off while a pass is timed (as in timeit).

    Returns a dict with the per-pass seconds, the keys per pass, and median/min/max keys/s.
    """
    return time_interleaved({"": (fn, batches)}, keys_per_batch=keys_per_batch,
                            repeats=repeats, warmup=warmup, min_warmup_s=min_warmup_s,
                            max_warmup=max_warmup)[""]


def time_interleaved(entries: dict[str, tuple[Callable[[object], object], object]], *,
                     keys_per_batch: int, repeats: int, warmup: int,
                     min_warmup_s: float = 0.0, max_warmup: int = 50) -> dict[str, dict]:
    """Times several systems on the same batches with their timed passes interleaved.

    Each entry ``name: (fn, batches)`` is warmed up as in :func:`time_batches`; then every
    repeat times one pass of each system, one after the other, in the orders of
    :func:`balanced_orders`: every system takes every place, and follows every other
    system equally often (a pass leaves the machine to the next: warm caches, spinning
    OpenMP threads, or an idle core that is slow to wake after a single-threaded pass). A
    cloud VM's speed drifts by tens of percent over minutes (neighbours, memory placement),
    so systems timed minutes apart can differ by more than the effect measured; systems
    timed in the same repeat see the same machine, and the ratio of their i-th passes
    cancels the drift.

    Returns:
        name -> the dict :func:`time_batches` returns, ``samples_s[i]`` of every system
        from the same repeat ``i``.
    """
    sources = {name: _pass_source(batches) for name, (_, batches) in entries.items()}
    warm = {name: _warm_up(fn, sources[name], warmup, min_warmup_s, max_warmup)
            for name, (fn, _) in entries.items()}
    samples: dict[str, list[float]] = {name: [] for name in entries}
    keys_per_pass: dict[str, int] = {}
    names = list(entries)
    orders = balanced_orders(len(names))
    for rep in range(repeats):
        for name in (names[i] for i in orders[rep % len(orders)]):
            bs = sources[name](rep)
            keys_per_pass[name] = len(bs) * keys_per_batch
            samples[name].append(_timed_pass(entries[name][0], bs))
    out = {}
    for name in names:
        out[name] = summarize(samples[name], keys_per_pass[name])
        out[name]["warmup_passes"] = warm[name]
    return out


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` systems, one per repeat, balanced for what comes just before.

    A Williams design (the crossover trials' answer to carry-over): over its rows every
    system takes every place, and within rows it directly follows each other system
    equally often (once for even ``n``, twice in the 2n rows for odd ``n``). Rotating one
    order instead kept every system behind the same neighbour for the whole run: the
    lookup phase timed dynembed's read right after the Python dict's single-threaded pass
    every time, when the idle second core was slow to wake.

    Returns:
        Rows of a permutation of ``range(n)`` each (``[[0, 1], [1, 0]]`` for 2 systems).
    """
    base, low, high = [0], 1, n - 1
    while low <= high:  # 0, 1, n-1, 2, n-2, ...
        base.append(low)
        low += 1
        if low <= high:
            base.append(high)
            high -= 1
    rows = [[(i + r) % n for i in base] for r in range(n)]
    if n % 2 and n > 1:  # odd: the mirror rows even out who follows whom
        rows += [row[::-1] for row in rows]
    return rows


def summarize(samples: list[float], keys_per_pass: int) -> dict:
    med = statistics.median(samples)
    return {
        "keys_per_s": keys_per_pass / med,
        "keys_per_s_min": keys_per_pass / max(samples),
        "keys_per_s_max": keys_per_pass / min(samples),
        "keys_per_s_mean_time": keys_per_pass * len(samples) / sum(samples),
        "samples_s": samples,
        "keys_per_pass": keys_per_pass,
    }


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def cpu_busy_seconds() -> float:
    """Machine-wide non-idle CPU seconds since boot, from /proc/stat (all processes)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    busy = sum(vals[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process plus its reaped children."""
    import resource
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def settle() -> None:
    """Collects garbage and asks glibc to hand free heap back, so RSS reflects live data."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # pragma: no cover - non-glibc  # noqa: BLE001, S110
        pass


# --------------------------------------------------------------------------------------------
# Machine / provenance
# --------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    import torch
    try:
        import numba
        numba_version = numba.__version__
        numba_threads = numba.config.NUMBA_NUM_THREADS
    except Exception:  # pragma: no cover  # noqa: BLE001
        numba_version, numba_threads = None, None
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": ram,
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba": numba_version,
        "numba_threads": numba_threads,
        "numpy": np.__version__,
        "fbgemm_gpu_cpu": _version("fbgemm-gpu-cpu") or _version("fbgemm-gpu"),
    }


def git_commit(repo: Path) -> tuple[str, bool | None]:
    """(HEAD commit or "uncommitted", whether the tree has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=30, check=False)
        commit = head.stdout.strip() if head.returncode == 0 and head.stdout.strip() else "uncommitted"
        st = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                            text=True, timeout=30, check=False)
        dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "uncommitted", None


# --------------------------------------------------------------------------------------------
# English word list (string keys)
# --------------------------------------------------------------------------------------------

WORDS_PACKAGE = "wamerican-insane"
WORDS_MEMBER = "usr/share/dict/american-english-insane"
WORDS_EXPECTED = 663_473


def small_result(metrics: dict, ratios: dict, config: dict, json_path: str | None) -> dict:
    """A small benchmark's result ({"metrics", "ratios"} plus machine, commit and config),
    written to ``json_path`` when given."""
    commit, dirty = git_commit(Path(__file__).resolve().parents[1])
    result = {"metrics": metrics, "ratios": ratios, "machine": machine_info(),
              "commit": commit, "dirty": dirty, "config": config}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1))
    return result


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dynembed"


def fetch_words(cache_dir: Path, log: Callable[[str], None]) -> tuple[Path | None, str]:
    """The cached word list, downloading it with apt-get if needed: (path or None, message)."""
    target = cache_dir / "american-english-insane"
    if target.is_file() and target.stat().st_size > 0:
        return target, f"cached at {target}"
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        return None, "apt-get/dpkg-deb not available; cannot fetch the wamerican-insane word list"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        def download() -> subprocess.CompletedProcess:
            return subprocess.run(["apt-get", "download", WORDS_PACKAGE], cwd=tmp,
                                  capture_output=True, text=True, timeout=300, check=False)
        try:
            log(f"downloading {WORDS_PACKAGE} with apt-get into {cache_dir} ...")
            r = download()
            if r.returncode != 0 or not glob.glob(os.path.join(tmp, "*.deb")):
                log("apt-get download failed; running apt-get update and retrying ...")
                subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600,
                               check=False)
                r = download()
            debs = glob.glob(os.path.join(tmp, "*.deb"))
            if r.returncode != 0 or not debs:
                msg = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no .deb produced"]
                return None, f"apt-get download {WORDS_PACKAGE} failed: {msg[0]}"
            shutil.copy(debs[0], cache_dir / os.path.basename(debs[0]))
            x = os.path.join(tmp, "x")
            subprocess.run(["dpkg-deb", "-x", debs[0], x], check=True, capture_output=True,
                           timeout=300)
            src = Path(x) / WORDS_MEMBER
            if not src.is_file():
                return None, f"{WORDS_MEMBER} not found in {os.path.basename(debs[0])}"
            shutil.copy(src, target.with_suffix(".tmp"))
            os.replace(target.with_suffix(".tmp"), target)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"fetching {WORDS_PACKAGE} failed: {e!r}"
    return target, f"downloaded to {target}"


def read_words(path: Path) -> list[str]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read().splitlines()


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def fmt_rate(x) -> str:
    if not isinstance(x, (int, float)):
        return str(x) if x is not None else "-"
    if x >= 1e9:
        return f"{x / 1e9:7.2f} G/s"
    if x >= 1e6:
        return f"{x / 1e6:7.2f} M/s"
    if x >= 1e3:
        return f"{x / 1e3:7.2f} k/s"
    return f"{x:7.2f} /s"


def fmt_num(x, digits: int = 3) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x) if x is not None else "-"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Child-process harness: one child per system, disturbance measurement
# --------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository root: children run there, with it first on ``PYTHONPATH``."""

FOREIGN_WARN = 0.05
"""Warn (and retry, with ``--retries``) when other processes used more than this share of
all cores while a system ran."""


class Phase:
    """One system measured in a child process: collects its metrics, their spread, the
    seconds of every timed pass and free-form info, which :func:`run_phase` writes out.

    ``cfg`` is the run's configuration and ``data`` the workload arrays the parent generated.
    """

    def __init__(self, name: str, cfg: dict, data: dict):
        self.name, self.cfg, self.data = name, cfg, data
        self.metrics: dict = {}
        self.spread: dict = {}
        self.samples: dict = {}
        self.info: dict = {}

    def log(self, msg: str) -> None:
        """Prints ``msg`` to stderr, tagged with the phase's name."""
        eprint(f"  [{self.name}] {msg}")

    def time(self, metric: str, fn, batches, *, keys_per_batch: int | None = None,
             repeats: int | None = None, warmup: int | None = None) -> dict:
        """Times ``fn`` over ``batches`` with :func:`time_batches` and records the median
        keys/s as ``metric`` (with its spread and per-pass seconds); returns the timing.

        ``keys_per_batch`` and ``repeats`` default to ``cfg["batch"]`` and ``cfg["repeats"]``.
        Without ``warmup`` the warm-up is ``cfg["warmup"]`` passes and at least
        ``cfg["min_warmup_s"]`` seconds; an explicit ``warmup`` is that many passes and no
        minimum time (for inputs each pass consumes, such as inserts of new keys).
        """
        return self.time_together({metric: (fn, batches)}, keys_per_batch=keys_per_batch,
                                  repeats=repeats, warmup=warmup)[metric]

    def time_together(self, entries: dict[str, tuple], *, keys_per_batch: int | None = None,
                      repeats: int | None = None, warmup: int | None = None) -> dict:
        """Like :meth:`time` for several ``metric: (fn, batches)`` entries whose timed
        passes interleave (:func:`time_interleaved`); records the metrics as one group in
        ``info["timed_together"]``, so their ratios can be taken pass by pass."""
        fixed = warmup is not None  # a fixed warm-up (inserts: each pass consumes new keys)
        res = time_interleaved(entries, keys_per_batch=keys_per_batch or self.cfg["batch"],
                               repeats=repeats or self.cfg["repeats"],
                               warmup=warmup if fixed else self.cfg["warmup"],
                               min_warmup_s=0.0 if fixed else self.cfg["min_warmup_s"])
        if len(entries) > 1:
            self.info.setdefault("timed_together", []).append(list(entries))
        for metric, r in res.items():
            self.metrics[metric] = r["keys_per_s"]
            self.spread[metric] = (r["keys_per_s_max"] - r["keys_per_s_min"]) / r["keys_per_s"]
            self.samples[metric] = r["samples_s"]
            self.log(f"{metric:<44s} {fmt_rate(r['keys_per_s'])}  "
                     f"(min {fmt_rate(r['keys_per_s_min']).strip()}, max {fmt_rate(r['keys_per_s_max']).strip()})")
        return res

    def record_dynembed(self, de) -> None:
        """Records the version and kernel thread count of the imported dynembed ``de``."""
        self.info["dynembed_version"] = getattr(de, "__version__", None)
        get_threads = getattr(de, "get_num_threads", None)
        self.info["dynembed_num_threads"] = get_threads() if callable(get_threads) else None

    def result(self) -> dict:
        """The phase's results as the child writes them (peak RSS added to ``info``)."""
        self.info["peak_rss_gib"] = round(peak_rss_bytes() / 2**30, 2)
        return {"metrics": self.metrics, "spread": self.spread, "samples_s": self.samples,
                "info": self.info}


def json_default(o):
    """``default`` for :func:`json.dumps`: numpy scalars as numbers, NaN as null, anything
    else as its ``str``."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def run_phase(name: str, workdir: Path, run: Callable[[Phase], None]) -> int:
    """Child side: loads ``config.json`` and ``data.npz`` from ``workdir``, calls
    ``run(Phase(name, cfg, data))`` and writes the phase's results to ``<name>.json`` there.

    A failure is logged with its traceback and recorded as ``info["error"]`` (the results
    are still written); returns the exit code, 0 or 1.
    """
    cfg = json.loads((workdir / "config.json").read_text())
    with np.load(workdir / "data.npz") as z:
        data = {k: z[k] for k in z.files}
    p = Phase(name, cfg, data)
    try:
        run(p)
        rc = 0
    except Exception as e:  # noqa: BLE001 - any failure is reported, the run goes on
        p.log("FAILED:\n" + traceback.format_exc())
        p.info["error"] = f"{type(e).__name__}: {e}"
        rc = 1
    (workdir / f"{name}.json").write_text(json.dumps(p.result(), default=json_default))
    return rc


def child_env(extra: dict | None = None) -> dict:
    """This process's environment plus ``extra``, with the repository root first on
    ``PYTHONPATH`` so a child process imports ``benchmarks`` and ``dynembed`` from here."""
    env = dict(os.environ, **(extra or {}))
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"]
                                          if env.get("PYTHONPATH") else "")
    return env


def spawn_phase(module: str, name: str, workdir: Path, timeout: float) -> dict:
    """Parent side: runs ``python -m <module> --_phase <name> --_workdir <workdir>`` in the
    repository root, echoes its output to stderr, and returns the results it wrote.

    ``info`` gains ``wall_s``, and the CPU time other processes used meanwhile (the machine
    is shared): ``foreign_cpu_s`` and ``foreign_cpu_share`` (of all cores), with a warning
    above :data:`FOREIGN_WARN`. Processes the child starts and reaps (a ``redis-server``)
    count as its own. A child that timed out (it is killed) or exited non-zero without
    recording an error gets ``info["error"]``, with the last lines of its output.
    """
    env = child_env()
    cmd = [sys.executable, "-m", module, "--_phase", name, "--_workdir", str(workdir)]
    t = time.perf_counter()
    busy0, own0 = cpu_busy_seconds(), own_cpu_seconds()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: collections.deque[str] = collections.deque(maxlen=30)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    th.join(timeout=10)
    wall = time.perf_counter() - t
    if not th.is_alive():  # the pump has read the pipe to its end (else it still reads it)
        proc.stdout.close()
    foreign = max(0.0, (cpu_busy_seconds() - busy0) - (own_cpu_seconds() - own0))
    share = foreign / (wall * (os.cpu_count() or 1))
    path = workdir / f"{name}.json"
    res = json.loads(path.read_text()) if path.exists() else {"metrics": {}, "spread": {},
                                                               "samples_s": {}, "info": {}}
    res["info"]["wall_s"] = round(wall, 1)
    res["info"]["foreign_cpu_s"] = round(foreign, 1)
    res["info"]["foreign_cpu_share"] = round(share, 3)
    if share > FOREIGN_WARN:
        eprint(f"WARNING: other processes used {foreign:.1f} CPU-s ({100 * share:.0f}% of the "
               f"machine) while '{name}' ran; its timings are contaminated")
    if rc is None:
        res["info"]["error"] = f"timed out after {timeout:.0f}s"
    elif rc != 0 and "error" not in res["info"]:
        res["info"]["error"] = f"exit code {rc} (killed? out of memory?): " + " | ".join(list(tail)[-5:])
    return res


def foreign_share(window_s: float) -> float:
    """Share of all cores that other processes used during a ``window_s`` sleep."""
    b0, o0, t0 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    time.sleep(window_s)
    return max(0.0, (cpu_busy_seconds() - b0) - (own_cpu_seconds() - o0)) / (
        (time.perf_counter() - t0) * (os.cpu_count() or 1))


def wait_quiet(limit_s: float, window_s: float = 2.0) -> bool:
    """Waits (up to ``limit_s``) for a ``window_s`` window in which other processes use less
    than FOREIGN_WARN of the machine; True if one came."""
    t_end = time.perf_counter() + limit_s
    first = True
    while True:
        share = foreign_share(window_s)
        if share <= FOREIGN_WARN:
            return True
        if time.perf_counter() >= t_end:
            eprint(f"machine still busy ({100 * share:.0f}% used by others) after waiting "
                   f"{limit_s:.0f}s; going on")
            return False
        if first:
            eprint(f"machine busy ({100 * share:.0f}% used by other processes); waiting up to "
                   f"{limit_s:.0f}s for it to go quiet ...")
            first = False


# --------------------------------------------------------------------------------------------
# Parent: command line, orchestration, report
# --------------------------------------------------------------------------------------------


def add_harness_args(ap: argparse.ArgumentParser, *, timeout_s: int, quick_timeout_s: int) -> None:
    """Adds the flags every benchmark shares after its own: ``--phase-timeout``,
    ``--wait-quiet``, ``--retries``, and the hidden ``--_phase`` / ``--_workdir`` of a child."""
    ap.add_argument("--phase-timeout", type=float,
                    help=f"seconds per system (default {timeout_s}, quick {quick_timeout_s})")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each system, wait up to S seconds for other processes to "
                         "stop using the CPU (default 0: don't wait)")
    ap.add_argument("--retries", type=int, default=0, metavar="N",
                    help="re-run a system up to N times if other processes used more than "
                         f"{100 * FOREIGN_WARN:.0f}%% of the CPU while it ran; keep the "
                         "least-disturbed run (default 0)")
    ap.add_argument("--_phase", help=argparse.SUPPRESS)
    ap.add_argument("--_workdir", help=argparse.SUPPRESS)


def parse_phases(ap: argparse.ArgumentParser, spec: str, known: Sequence[str]) -> list[str]:
    """The phases of a comma-separated ``--phases`` value; an unknown one is a usage error."""
    phases = [x.strip() for x in spec.split(",") if x.strip()]
    bad = [x for x in phases if x not in known]
    if bad:
        ap.error(f"unknown phases {bad}; choose from {list(known)}")
    return phases


def run_sizes(args: argparse.Namespace, full: dict, quick: dict, flags: dict[str, str]) -> dict:
    """The sizes of a run: ``quick`` with ``--quick``, else ``full``, each overridden by its
    flag where given (``flags`` maps an ``args`` attribute to a size key). A result is a
    median of at least 5 passes, so ``repeats`` < 5 exits with a message."""
    base = dict(quick if args.quick else full)
    for attr, key in flags.items():
        if getattr(args, attr) is not None:
            base[key] = getattr(args, attr)
    if base["repeats"] < 5:
        raise SystemExit("--repeats must be >= 5 (the result is a median of at least 5)")
    return base


def record_run_options(cfg: dict, phases: list[str], args: argparse.Namespace) -> None:
    """Records the phases and the disturbance settings (``--wait-quiet``, ``--retries``) in
    ``cfg``."""
    cfg["phases"] = list(phases)
    cfg["wait_quiet_s"] = args.wait_quiet
    cfg["retries"] = args.retries


def check_quiet_at_start(cfg: dict, wait_quiet_s: float) -> None:
    """Unless the run waits for quiet before each system: measures for a second how much of
    the machine other processes use, records it as ``cfg["foreign_cpu_share_at_start"]``
    and warns above FOREIGN_WARN."""
    if wait_quiet_s <= 0:
        busy = foreign_share(1.0)
        cfg["foreign_cpu_share_at_start"] = round(busy, 3)
        if busy > FOREIGN_WARN:
            eprint(f"WARNING: other processes are using {100 * busy:.0f}% of the CPU; timings "
                   "will be unreliable (see --wait-quiet / --retries)")


class PhaseResults(NamedTuple):
    """What :func:`run_phases` collected: metrics, spreads and per-pass seconds merged over
    the phases; info and errors per phase."""

    metrics: dict
    spread: dict
    samples_s: dict
    info: dict
    errors: dict


def run_phases(module: str, cfg: dict, data: dict, phases: Sequence[str], *, prefix: str,
               timeout: float, wait_quiet_s: float = 0.0, retries: int = 0,
               scratch: bool = False) -> PhaseResults:
    """Saves ``cfg`` and the workload ``data`` in a new temporary directory (named with
    ``prefix``), runs every phase there in its own child (:func:`spawn_phase`), in order,
    and removes the directory.

    ``data`` is emptied once saved, so the parent does not hold the workload while the
    children run. With ``scratch``, ``cfg["scratch"]`` names the directory while the phases
    run (they keep their stores there). With ``wait_quiet_s`` > 0 each phase first waits
    for the machine to go quiet (:func:`wait_quiet`); a phase that other processes disturbed
    (more than FOREIGN_WARN of the cores) runs again, up to ``retries`` times, and the least
    disturbed run that did not fail is kept.
    """
    out = PhaseResults({}, {}, {}, {}, {})
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    if scratch:
        cfg["scratch"] = str(workdir)
    try:
        np.savez(workdir / "data.npz", **data)
        (workdir / "config.json").write_text(json.dumps(cfg))
        data.clear()
        for ph in phases:
            res = None
            for attempt in range(1 + max(0, retries)):
                if wait_quiet_s > 0:
                    wait_quiet(wait_quiet_s)
                eprint(f"--- {ph} ---" + (f" (retry {attempt})" if attempt else ""))
                r = spawn_phase(module, ph, workdir, timeout)
                r["info"]["attempts"] = attempt + 1
                if res is None or ("error" in res["info"] and "error" not in r["info"]) or (
                        "error" not in r["info"]
                        and r["info"]["foreign_cpu_share"] < res["info"]["foreign_cpu_share"]):
                    res = r
                if "error" in r["info"] or r["info"]["foreign_cpu_share"] <= FOREIGN_WARN:
                    break
            out.metrics.update(res["metrics"])
            out.spread.update(res["spread"])
            out.samples_s.update(res["samples_s"])
            out.info[ph] = res["info"]
            if "error" in res["info"]:
                out.errors[ph] = res["info"]["error"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cfg.pop("scratch", None)
    return out


def evaluate_target(op: str, threshold: float, value: float | None) -> dict:
    """A target's entry in the report: ``value`` checked against ``op`` (">=" or "<=")
    ``threshold``; ``pass`` is None when the value is unknown."""
    passed = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"target": f"{op} {threshold:g}", "op": op, "threshold": threshold, "value": value,
            "pass": passed}


def ratio_of(metrics: dict, num: str, den: str) -> float | None:
    """``metrics[num] / metrics[den]``, or None unless both are numbers and den > 0."""
    a, b = metrics.get(num), metrics.get(den)
    ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0
    return (a / b) if ok else None


def timed_together(results: PhaseResults, num: str, den: str) -> bool:
    """Whether metrics ``num`` and ``den`` were timed in one interleaved group."""
    return any(num in g and den in g for info in results.info.values()
               for g in info.get("timed_together", ()))


def paired_ratio(results: PhaseResults, num: str, den: str) -> float | None:
    """The throughput ratio ``num / den``: where the two were timed together, the median
    over repeats of ``seconds[den][i] / seconds[num][i]`` (both passes of repeat i ran in
    the same repeat, over the same batches, so the seconds' ratio is the keys/s ratio);
    otherwise the ratio of their medians (:func:`ratio_of`)."""
    if not timed_together(results, num, den):
        return ratio_of(results.metrics, num, den)
    t_num, t_den = results.samples_s[num], results.samples_s[den]
    return statistics.median(b / a for a, b in zip(t_num, t_den))


def build_report(module: str, argv: list[str] | None, cfg: dict, results: PhaseResults,
                 t_start: float, ratios: dict, targets: dict,
                 machine_extra: dict | None = None) -> dict:
    """The report (``metrics``, ``ratios``, ``targets``, ``machine``, ``commit``,
    ``command``, ``config``); completes ``cfg`` with the run's spreads, per-pass seconds,
    per-phase info and errors, timing and provenance. ``machine_extra`` is added to the
    machine info, and so is what the dynembed phases saw (version, kernel threads)."""
    commit, dirty = git_commit(REPO_ROOT)
    cfg["git_dirty"] = dirty
    cfg["spread"] = results.spread  # (max - min) / median keys/s per metric
    cfg["samples_s"] = results.samples_s  # seconds per timed pass, per metric
    cfg["phase_info"] = results.info
    cfg["errors"] = results.errors
    cfg["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    cfg["loadavg_end"] = loadavg()
    cfg["python_executable"] = sys.executable
    mach = machine_info()
    mach.update(machine_extra or {})
    for ph_info in results.info.values():  # what the dynembed phases saw
        for k in ("dynembed_version", "dynembed_num_threads"):
            if ph_info.get(k) is not None:
                mach.setdefault(k, ph_info[k])
    return {
        "metrics": results.metrics,
        "ratios": ratios,
        "targets": targets,
        "machine": mach,
        "commit": commit,
        "command": ["python", "-m", module, *(sys.argv[1:] if argv is None else argv)],
        "config": cfg,
    }


def write_report(report: dict, text: str, json_path: str | None) -> None:
    """Prints the rendered ``text`` to stdout and, with ``json_path``, writes ``report``
    there as JSON (creating the folder)."""
    print(text, flush=True)
    if json_path:
        path = Path(json_path)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=json_default) + "\n")
        eprint(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# Report text
# --------------------------------------------------------------------------------------------


def report_header(report: dict, title: str, versions: str, rule: int) -> list[str]:
    """The opening lines: a rule ``rule`` characters wide, ``title``, the machine and commit,
    and the versions of python, torch (with its threads) and numba, then ``versions``."""
    mach, cfg = report["machine"], report["config"]
    return [
        "=" * rule,
        title,
        f"{mach['cpu_model']}, {mach['cores']} cores, {mach['ram_gib']} GiB RAM; "
        f"commit {report['commit'][:12]}" + (" (+ uncommitted changes)" if cfg.get("git_dirty") else ""),
        f"python {mach['python']}, torch {mach['torch']} ({mach['torch_threads']} threads), "
        f"numba {mach['numba']}, " + versions,
    ]


def metric_row(label: str, value: str, spread, width: int, note: str = "") -> str:
    """A table row: ``label`` padded to ``width``, the formatted ``value`` right-aligned, and
    the spread (a fraction of the median) when there is one."""
    extra = f"   spread {100 * spread:4.0f}%" if isinstance(spread, (int, float)) else ""
    return f"  {label:<{width}s} {value:>12s}{extra}{note}"


def verdict(passed: bool | None) -> str:
    """PASS, FAIL, or n/a for a target not decided."""
    return "n/a" if passed is None else ("PASS" if passed else "FAIL")


def _three_places(name: str, value: float) -> str:
    return f"{value:.3f}"


def targets_table(report: dict, others: list[str], note: str,
                  fmt: Callable[[str, float], str] = _three_places) -> list[str]:
    """The report's "Ratios and targets" lines: every target with its verdict, then the
    ratios named in ``others`` (no target) marked ``note``; ``fmt(name, value)`` formats a
    target's value."""
    lines = [f"{'Ratios and targets':<52s} {'value':>10s}   {'target':>7s}   result"]
    for name, t in report["targets"].items():
        v = t["value"]
        val = "-" if v is None else fmt(name, v)
        lines.append(f"  {name:<50s} {val:>10s}   {t['target']:>7s}   {verdict(t['pass'])}")
    for name in others:
        v = report["ratios"].get(name)
        lines.append(f"  {name:<50s} {'-' if v is None else f'{v:.3f}':>10s}   {'':>7s}   "
                     f"{note}")
    return lines


def report_footer(report: dict, rule: int) -> list[str]:
    """The closing lines: targets passed/failed, the phases other processes disturbed,
    errors, and a closing rule ``rule`` characters wide."""
    targets, cfg = report["targets"], report["config"]
    npass = sum(t["pass"] is True for t in targets.values())
    nfail = sum(t["pass"] is False for t in targets.values())
    L = [f"  {npass} pass, {nfail} fail, {len(targets) - npass - nfail} n/a"]
    busy = {k: v.get("foreign_cpu_share") for k, v in cfg.get("phase_info", {}).items()
            if (v.get("foreign_cpu_share") or 0) > FOREIGN_WARN}
    if busy:
        L.append("-" * rule)
        L.append("  WARNING: other processes used CPU during: " + ", ".join(
            f"{k} ({100 * v:.0f}% of all cores)" for k, v in busy.items())
            + "; those timings are unreliable")
    errs = cfg.get("errors", {})
    if errs:
        L.append("-" * rule)
        for k, v in errs.items():
            L.append(f"  ERROR in {k}: {v}")
    L.append("=" * rule)
    return L
