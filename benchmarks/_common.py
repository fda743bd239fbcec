"""Shared helpers for the benchmarks: workload generation, timing, memory, machine info.

Nothing here imports dynembed or fbgemm; the phases in :mod:`benchmarks.core` do that lazily.
"""

from __future__ import annotations

import gc
import glob
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

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
    get = batches if callable(batches) else (lambda _rep: batches)
    t_warm = time.perf_counter()
    w = 0
    while w < warmup or (w < max_warmup and time.perf_counter() - t_warm < min_warmup_s):
        for b in get(-1 - w):
            fn(b)
        w += 1
    samples: list[float] = []
    keys_per_pass = 0
    for rep in range(repeats):
        bs = get(rep)
        keys_per_pass = len(bs) * keys_per_batch
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter()
            for b in bs:
                fn(b)
            samples.append(time.perf_counter() - t0)
        finally:
            if was_enabled:
                gc.enable()
    out = summarize(samples, keys_per_pass)
    out["warmup_passes"] = w
    return out


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
    except Exception:  # pragma: no cover - non-glibc
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
    import torch  # noqa: PLC0415
    try:
        import numba  # noqa: PLC0415
        numba_version = numba.__version__
        numba_threads = numba.config.NUMBA_NUM_THREADS
    except Exception:  # pragma: no cover
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
                              text=True, timeout=30)
        commit = head.stdout.strip() if head.returncode == 0 and head.stdout.strip() else "uncommitted"
        st = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                            text=True, timeout=30)
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
                                  capture_output=True, text=True, timeout=300)
        try:
            log(f"downloading {WORDS_PACKAGE} with apt-get into {cache_dir} ...")
            r = download()
            if r.returncode != 0 or not glob.glob(os.path.join(tmp, "*.deb")):
                log("apt-get download failed; running apt-get update and retrying ...")
                subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600)
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
