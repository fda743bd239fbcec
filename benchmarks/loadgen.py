"""Closed-loop HTTP load generator for the serving benchmark, usable against any server.

``concurrency`` connections (HTTP/1.1 keep-alive) each send a POST, wait for its answer and
send the next, cycling through a list of JSON bodies, for ``duration_s`` seconds after
``warmup_s`` seconds of the same load whose results are dropped. Result: requests/s,
p50/p90/p99 latency, errors.

Two engines give the same result dict:

* ``wrk`` (Debian's ``wrk``, ``apt-get install -y wrk``), driven by a Lua script that
  pre-formats every request once (:data:`_WRK_LUA`). The default when ``wrk`` is on
  ``PATH``: one C thread on epoll reaches about ten times the rate of a Python client for
  a tenth of the CPU (see :func:`self_test`), which matters on a 2-core machine where the
  client shares the cores with the server. Its latency histogram has microsecond
  resolution. Limits: whole-second durations (``duration_s`` is rounded up; the result's
  ``duration_s`` is the one measured), errors are socket errors plus HTTP statuses >= 400
  (a 2xx/3xx other than 200 counts as success), and the warm-up is a separate ``wrk`` run
  just before the measured one (the server is warm; the connections are new).
* ``python``: asyncio streams of the standard library, in a child process (so the
  caller's own work does not slow it), for machines without ``wrk``. It counts every
  non-200 answer as an error and keeps each request's latency.

In both, a request that has no answer in ``timeout_s`` is an error and has no latency.

Both report ``client_cpu_s`` (CPU seconds the load generator itself used while it ran,
warm-up included for ``python``) and ``client_cpu_share`` (of all cores over that time): on
a small machine the client competes with the server for the cores, and this says by how
much.

Example::

    from benchmarks import loadgen
    res = loadgen.run_load("http://127.0.0.1:8080/predictions/ctr", bodies,
                           concurrency=8, duration_s=5, warmup_s=1)
    res["requests_per_s"], res["p99_ms"], res["errors"]

Command line (bodies: a file with one JSON body a line, or ``--ctr N`` synthetic CTR
requests)::

    python -m benchmarks.loadgen http://127.0.0.1:8080/predictions/ctr --ctr 10000 \\
        --concurrency 8 --duration 5 --warmup 1 [--engine wrk|python] [--json out.json]
    python -m benchmarks.loadgen --self-test      # both engines against a trivial server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

ENGINES = ("auto", "wrk", "python")
_MARK = "LOADGEN_RESULT "

# One Lua state per wrk thread. init() pre-formats every request (wrk.format adds the
# method, path, wrk.headers and Content-Length); request() only indexes, so the script
# costs nothing per request. setup() gives each thread its own starting offset, so threads
# do not send the same bodies in lockstep. done() prints the summary as one JSON line.
_WRK_LUA = r"""
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end

local reqs = {}
local n = 0
local i = 0
function init(args)
  wrk.method = "POST"
  if wrk.headers["Content-Type"] == nil then
    wrk.headers["Content-Type"] = "application/json"
  end
  for line in io.lines(args[1]) do
    n = n + 1
    reqs[n] = wrk.format(nil, nil, nil, line)
  end
  i = ((tid or 0) * 7919) % n
end

function request()
  i = i + 1
  if i > n then i = 1 end
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"duration_us":%d,"requests":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"mean":%.3f,' ..
    '"min":%d,"max":%d}\n',
    "LOADGEN_RESULT ", summary.duration, summary.requests, summary.bytes, e.connect, e.read,
    e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.mean, latency.min,
    latency.max))
end
"""


def _bodies_bytes(bodies: Sequence) -> list[bytes]:
    """Bodies as bytes: bytes kept, str encoded, anything else JSON-encoded."""
    out = []
    for b in bodies:
        if isinstance(b, (bytes, bytearray)):
            out.append(bytes(b))
        elif isinstance(b, str):
            out.append(b.encode())
        else:
            out.append(json.dumps(b, separators=(",", ":")).encode())
    if not out:
        raise ValueError("bodies is empty")
    return out


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of sorted values; None if there are none."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _child_env() -> dict:
    """This environment with the repository root first on ``PYTHONPATH`` (children run
    ``-m benchmarks.loadgen``)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_child(cmd: list[str], timeout_s: float, **kw) -> tuple[subprocess.CompletedProcess,
                                                                 float, float]:
    """Runs ``cmd``; (completed process, its own CPU seconds, wall seconds). The CPU time
    comes from ``wait4`` of that child alone."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, **kw)
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))
    return done, ru.ru_utime + ru.ru_stime, time.perf_counter() - t


def _finish(res: dict, cpu_s: float, wall_s: float) -> dict:
    res["client_cpu_s"] = round(cpu_s, 3)
    res["client_cpu_share"] = round(cpu_s / (wall_s * (os.cpu_count() or 1)), 3) if wall_s else None
    return res


# ------------------------------------------------------------------------------------------
# wrk engine
# ------------------------------------------------------------------------------------------


def _wrk_once(url: str, body_file: Path, script: Path, concurrency: int, threads: int,
              seconds: int, headers: Mapping[str, str], timeout_s: float) -> tuple[dict, float, float]:
    cmd = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds}s",
           "--timeout", f"{max(1, math.ceil(timeout_s))}s", "-s", str(script)]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    cmd += [url, "--", str(body_file)]
    done, cpu, wall = _run_child(cmd, seconds + timeout_s + 30)
    line = next((x for x in done.stdout.splitlines() if x.startswith(_MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-1000:]}")
    return json.loads(line[len(_MARK):]), cpu, wall


def _run_wrk(url: str, bodies: list[bytes], concurrency: int, duration_s: float,
             warmup_s: float, headers: Mapping[str, str], threads: int | None,
             timeout_s: float) -> dict:
    if any(b"\n" in b or b"\r" in b for b in bodies):
        raise ValueError("wrk engine: bodies must not contain line breaks (one body a line); "
                         "use compact JSON")
    threads = max(1, min(concurrency, threads or 1))
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        body_file, script = Path(tmp) / "bodies.txt", Path(tmp) / "loadgen.lua"
        body_file.write_bytes(b"\n".join(bodies) + b"\n")
        script.write_text(_WRK_LUA)
        warm = None
        if warmup_s > 0:
            warm, _, _ = _wrk_once(url, body_file, script, concurrency, threads,
                                   max(1, math.ceil(warmup_s)), headers, timeout_s)
        r, cpu, wall = _wrk_once(url, body_file, script, concurrency, threads,
                                 max(1, math.ceil(duration_s)), headers, timeout_s)
    dur = r["duration_us"] / 1e6
    socket_errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
    res = {
        "engine": "wrk", "url": url, "concurrency": concurrency, "threads": threads,
        "duration_s": round(dur, 3), "requests": r["requests"],
        "requests_per_s": r["requests"] / dur if dur > 0 else None,
        "p50_ms": r["p50"] / 1e3, "p90_ms": r["p90"] / 1e3, "p99_ms": r["p99"] / 1e3,
        "p999_ms": r["p999"] / 1e3, "mean_ms": r["mean"] / 1e3, "min_ms": r["min"] / 1e3,
        "max_ms": r["max"] / 1e3,
        "errors": r["status"] + socket_errors,
        "errors_detail": {"status_ge_400": r["status"], "connect": r["connect"],
                          "read": r["read"], "write": r["write"], "timeout": r["timeout"]},
        "warmup_requests": warm["requests"] if warm else 0,
    }
    if r["requests"] == 0:
        for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms", "min_ms", "max_ms"):
            res[k] = None
    return _finish(res, cpu, wall)


# ------------------------------------------------------------------------------------------
# Python engine (child process)
# ------------------------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Reads one HTTP/1.1 response; (status, whether the server keeps the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, keep = 0, False, True
    for h in lines[1:]:
        name, _, value = h.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and value.strip().lower() == b"close":
            keep = False
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, keep


async def _connection(host: str, port: int, reqs: list[bytes], start: int, t_measure: float,
                      t_end: float, timeout_s: float, out: dict) -> None:
    """One closed-loop connection: send, wait for the answer, send the next."""
    i = start
    reader = writer = None
    perf = time.perf_counter
    while perf() < t_end:
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), timeout_s)
                writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                           socket.TCP_NODELAY, 1)
            t0 = perf()
            writer.write(reqs[i])
            i = i + 1 if i + 1 < len(reqs) else 0
            status, keep = await asyncio.wait_for(_read_response(reader), timeout_s)
            t1 = perf()
            if t0 >= t_measure and t1 <= t_end:
                out["lat"].append(t1 - t0)
                if status != 200:
                    out["status"] += 1
            if not keep:
                writer.close()
                writer = None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ValueError) as e:
            if perf() >= t_measure:
                key = "timeout" if isinstance(e, asyncio.TimeoutError) else "socket"
                out[key] += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)  # no busy loop against a dead server
    if writer is not None:
        writer.close()


async def _python_load(url: str, bodies: list[bytes], concurrency: int, duration_s: float,
                       warmup_s: float, headers: Mapping[str, str], timeout_s: float) -> dict:
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    hdr = {"Host": f"{host}:{port}", "Content-Type": "application/json", **headers}
    head = "".join(f"{k}: {v}\r\n" for k, v in hdr.items())
    reqs = [f"POST {path} HTTP/1.1\r\n{head}Content-Length: {len(b)}\r\n\r\n".encode() + b
            for b in bodies]
    out = {"lat": [], "status": 0, "timeout": 0, "socket": 0}
    t_start = time.perf_counter()
    t_measure = t_start + warmup_s
    t_end = t_measure + duration_s
    await asyncio.gather(*(_connection(host, port, reqs, (c * 7919) % len(reqs), t_measure,
                                       t_end, timeout_s, out) for c in range(concurrency)))
    lat = sorted(out["lat"])
    ms = [x * 1e3 for x in lat]
    res = {
        "engine": "python", "url": url, "concurrency": concurrency, "threads": 1,
        "duration_s": duration_s, "requests": len(lat),
        "requests_per_s": len(lat) / duration_s,
        "p50_ms": _percentile(ms, 50), "p90_ms": _percentile(ms, 90),
        "p99_ms": _percentile(ms, 99), "p999_ms": _percentile(ms, 99.9),
        "mean_ms": sum(ms) / len(ms) if ms else None, "min_ms": ms[0] if ms else None,
        "max_ms": ms[-1] if ms else None,
        "errors": out["status"] + out["timeout"] + out["socket"],
        "errors_detail": {"status_not_200": out["status"], "timeout": out["timeout"],
                          "socket": out["socket"]},
    }
    return res


def _run_python(url: str, bodies: list[bytes], concurrency: int, duration_s: float,
                warmup_s: float, headers: Mapping[str, str], timeout_s: float) -> dict:
    """Runs :func:`_python_load` in a child process (``--_child``), bodies via a file."""
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        spec = Path(tmp) / "spec.json"
        bfile = Path(tmp) / "bodies.bin"
        # Length-prefixed: bodies may hold any bytes.
        with open(bfile, "wb") as f:
            f.writelines(len(b).to_bytes(4, "little") + b for b in bodies)
        spec.write_text(json.dumps({"url": url, "bodies": str(bfile), "concurrency": concurrency,
                                    "duration_s": duration_s, "warmup_s": warmup_s,
                                    "headers": dict(headers), "timeout_s": timeout_s}))
        env = _child_env()
        done, cpu, wall = _run_child([sys.executable, "-m", "benchmarks.loadgen", "--_child",
                                      str(spec)], duration_s + warmup_s + timeout_s + 60,
                                     env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith(_MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"python load generator failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-1000:]}")
    return _finish(json.loads(line[len(_MARK):]), cpu, wall)


def _child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    data = Path(spec["bodies"]).read_bytes()
    bodies, at = [], 0
    while at < len(data):
        n = int.from_bytes(data[at:at + 4], "little")
        bodies.append(data[at + 4:at + 4 + n])
        at += 4 + n
    res = asyncio.run(_python_load(spec["url"], bodies, spec["concurrency"],
                                   spec["duration_s"], spec["warmup_s"], spec["headers"],
                                   spec["timeout_s"]))
    print(_MARK + json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------------------------------
# API
# ------------------------------------------------------------------------------------------


def run_load(url: str, bodies: Sequence, concurrency: int, duration_s: float,
             warmup_s: float, headers: Mapping[str, str] | None = None, *,
             engine: str = "auto", threads: int | None = None,
             timeout_s: float = 30.0) -> dict:
    """Closed-loop load against ``url``: ``concurrency`` keep-alive connections POSTing the
    ``bodies`` in turn (each connection from its own offset), ``warmup_s`` seconds not
    measured, then ``duration_s`` seconds measured.

    Args:
        url: ``http://host:port/path`` (loopback for the benchmark).
        bodies: request bodies, cycled: bytes, str, or JSON-able objects (encoded
            compactly). Sent with ``Content-Type: application/json`` unless ``headers``
            says otherwise.
        concurrency: connections, each with one request in flight.
        duration_s: measured seconds (rounded up to whole seconds with wrk).
        warmup_s: seconds of load before, not measured (0: none).
        headers: extra request headers.
        engine: "wrk", "python", or "auto" (wrk if on PATH).
        threads: wrk threads (default 1: enough for tens of thousands of requests/s, and
            it leaves the cores to the server); the python engine uses one.
        timeout_s: a request with no answer in this time is an error.

    Returns:
        A dict: ``engine``, ``url``, ``concurrency``, ``duration_s`` (measured),
        ``requests`` and ``requests_per_s`` (answers, error statuses included: check
        ``errors`` is 0), ``p50_ms``, ``p90_ms``, ``p99_ms``, ``p999_ms``,
        ``mean_ms``, ``min_ms``, ``max_ms`` (None without answers), ``errors`` (failed
        requests: error statuses, timeouts, socket errors) and ``errors_detail``,
        ``client_cpu_s`` and ``client_cpu_share``.

    Raises:
        ValueError: a bad argument; RuntimeError: the engine failed to run.
    """
    if concurrency < 1 or duration_s <= 0 or warmup_s < 0:
        raise ValueError("concurrency must be >= 1, duration_s > 0 and warmup_s >= 0")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    data = _bodies_bytes(bodies)
    hdr = dict(headers or {})
    if engine == "auto":
        engine = "wrk" if shutil.which("wrk") else "python"
    if engine == "wrk":
        if not shutil.which("wrk"):
            raise RuntimeError("wrk is not installed (apt-get install -y wrk); or use "
                               "engine='python'")
        return _run_wrk(url, data, concurrency, duration_s, warmup_s, hdr, threads, timeout_s)
    return _run_python(url, data, concurrency, duration_s, warmup_s, hdr, timeout_s)


def format_result(res: dict) -> str:
    """One line: rate, latency percentiles, errors, client CPU."""
    def ms(x):
        return "-" if x is None else f"{x:.2f}"
    return (f"[{res['engine']}] c={res['concurrency']}: {res['requests_per_s'] or 0:,.0f} req/s "
            f"({res['requests']} in {res['duration_s']}s), p50 {ms(res['p50_ms'])} ms, "
            f"p90 {ms(res['p90_ms'])} ms, p99 {ms(res['p99_ms'])} ms, errors {res['errors']}, "
            f"client CPU {res['client_cpu_s']}s ({100 * (res['client_cpu_share'] or 0):.0f}% "
            "of the machine)")


# ------------------------------------------------------------------------------------------
# A trivial server, to check the load generator
# ------------------------------------------------------------------------------------------


class _TrivialHTTP(asyncio.Protocol):
    """Answers every request at once with ``200 0.5`` (keep-alive), parsing only the
    headers' end and Content-Length: about as little work per request as Python allows."""

    RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 3\r\n\r\n0.5")

    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        self.buf += data
        out = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buf[:end].lower()
            n = 0
            at = head.find(b"content-length:")
            if at >= 0:
                eol = head.find(b"\r\n", at)
                n = int(head[at + 15:eol if eol >= 0 else len(head)])
            if len(self.buf) < end + 4 + n:
                break
            self.buf = self.buf[end + 4 + n:]
            out.append(self.RESPONSE)
        if out:
            self.transport.write(b"".join(out))


def _serve_trivial(port: int) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_TrivialHTTP, "127.0.0.1", port, backlog=1024)
        print("READY", flush=True)
        async with server:
            await server.serve_forever()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


@contextlib.contextmanager
def trivial_server() -> Iterator[str]:
    """A trivial HTTP server (:class:`_TrivialHTTP`) in a child process on a free loopback
    port; yields its URL, and stops it on exit."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = _child_env()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.loadgen", "--_serve",
                             str(port)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, text=True)
    try:
        line = proc.stdout.readline()
        if "READY" not in line:
            raise RuntimeError("trivial server did not start")
        yield f"http://127.0.0.1:{port}/predict"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def self_test(duration_s: float = 3.0, concurrency: int = 8) -> list[dict]:
    """Both engines (wrk if installed) against :func:`trivial_server`: the rates they reach
    and the CPU they use. The server is single-threaded Python, so the rates are a floor of
    what each engine can drive; ``client_cpu_share`` is what it costs the machine."""
    bodies = [{"user": f"u{i}", "item": "i1", "tags": ["t1", "t2"], "hour": "3"}
              for i in range(100)]
    out = []
    with trivial_server() as url:
        for engine in (("wrk", "python") if shutil.which("wrk") else ("python",)):
            res = run_load(url, bodies, concurrency, duration_s, warmup_s=1.0, engine=engine)
            print(format_result(res), file=sys.stderr, flush=True)
            out.append(res)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loadgen",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("url", nargs="?", help="target URL (POST)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--bodies", help="file with one JSON request body a line")
    src.add_argument("--ctr", type=int, metavar="N",
                     help="N synthetic CTR requests (benchmarks.serving_peer.ctr_model)")
    ap.add_argument("--seed", type=int, default=1, help="seed of --ctr requests")
    ap.add_argument("--concurrency", "-c", type=int, default=8)
    ap.add_argument("--duration", "-d", type=float, default=5.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds")
    ap.add_argument("--engine", choices=ENGINES, default="auto")
    ap.add_argument("--threads", type=int, help="wrk threads (default 1)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s")
    ap.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    ap.add_argument("--json", help="also write the result to this file")
    ap.add_argument("--self-test", action="store_true",
                    help="run the engines against a trivial local server and exit")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return _child_main(args._child)
    if args._serve:
        _serve_trivial(args._serve)
        return 0
    if args.self_test:
        print(json.dumps(self_test(), indent=1))
        return 0
    if not args.url:
        ap.error("a URL is needed (or --self-test)")
    if args.bodies:
        bodies = [line for line in Path(args.bodies).read_bytes().splitlines() if line.strip()]
    else:
        from benchmarks.serving_peer.ctr_model import make_requests
        bodies = make_requests(args.ctr or 10_000, args.seed)
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    res = run_load(args.url, bodies, args.concurrency, args.duration, args.warmup, headers,
                   engine=args.engine, threads=args.threads, timeout_s=args.timeout)
    print(format_result(res), file=sys.stderr)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
