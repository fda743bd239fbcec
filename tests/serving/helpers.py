"""A small trained model, its package, and a real server on free loopback ports."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from torch import nn

import dynembed as de
from dynembed.serving import ModelServer, ServerConfig, export_package

FEATURES = {"user": "user", "item": "item",
            "tags": de.FeatureConfig(table="tags", pooling="mean")}


def make_model(seed: int = 0):
    """(collection, dense) trained a few steps on synthetic string features."""
    torch.manual_seed(seed)
    coll = de.EmbeddingCollection(
        tables={"user": de.TableConfig(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=1),
                "item": de.TableConfig(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=2),
                "tags": de.TableConfig(dim=3, optimizer=de.optim.SGD(lr=0.1), seed=3)},
        features=FEATURES)
    dense = nn.Sequential(nn.Linear(11, 8), nn.ReLU(), nn.Linear(8, 1), nn.Flatten(0))
    opt = torch.optim.SGD(dense.parameters(), lr=0.1)
    for step in range(5):
        batch = examples(32, seed=step)
        out = dense(coll(columns(batch), concat=True))
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return coll, dense


class Trained(nn.Module):
    """A training job's model: its checkpoints name tables by path (embeddings.tables.*)."""

    def __init__(self, coll, dense) -> None:
        super().__init__()
        self.embeddings, self.dense = coll, dense


def examples(n: int, seed: int = 0, unseen: bool = False) -> list[dict]:
    """n request examples; ``unseen`` draws keys training never saw."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: int(torch.randint(0, k, (1,), generator=g))
    prefix = "new-" if unseen else ""
    return [{"user": f"{prefix}u{pick(50)}", "item": f"{prefix}i{pick(30)}",
             "tags": [f"t{pick(20)}" for _ in range(pick(4))]} for _ in range(n)]


def columns(batch: list[dict]) -> dict:
    return {name: [e[name] for e in batch] for name in FEATURES}


def write_package(store: Path, name: str = "ctr", version: str = "1.0", seed: int = 0):
    coll, dense = make_model(seed)
    export_package(store / f"{name}-{version}", embeddings=coll, dense=dense, name=name,
                   version=version, output="sigmoid")
    return coll, dense


def expected(coll, dense, batch: list[dict]) -> list[float]:
    """What the served model must answer: the in-process model in eval mode."""
    coll.eval()
    with torch.no_grad():
        return torch.sigmoid(dense(coll(columns(batch), concat=True))).tolist()


@dataclass
class Running:
    server: ModelServer
    thread: threading.Thread
    inference: str
    management: str
    metrics: str
    key_file: Path

    def token(self, api: str = "management") -> dict:
        keys = json.loads(self.key_file.read_text())
        return {"Authorization": f"Bearer {keys[api]['key']}"}

    def stop(self, timeout: float = 30) -> None:
        self.server.shutdown()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not stop"


def start_server(store: Path, **options) -> Running:
    """Starts a ModelServer on free loopback ports in a thread; waits until it answers."""
    options.setdefault("key_file", str(store.parent / "key_file.json"))
    config = ServerConfig(model_store=str(store), inference_address="127.0.0.1:0",
                          management_address="127.0.0.1:0", metrics_address="127.0.0.1:0",
                          **options)
    server = ModelServer(config)
    addresses = server.bind()
    errors = []

    def run():
        try:
            server.run()
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    urls = {api: f"http://127.0.0.1:{port}" for api, (_, port) in addresses.items()}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if errors or not thread.is_alive():
            raise RuntimeError(f"the server failed to start: {errors}")
        try:
            if httpx.get(urls["inference"] + "/ping", timeout=2).status_code == 200 and \
                    server.registry.models.keys() >= set(config.models):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    else:
        raise RuntimeError("the server did not start within 60 s")
    return Running(server, thread, urls["inference"], urls["management"], urls["metrics"],
                   Path(config.key_file))


def start_cli_server(args: list[str], ready: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """Starts ``dynembed serve ARGS`` (its own process) and waits until it answers 200 on
    ``ready`` (a path of the inference API).

    Returns:
        (the process, the URLs it printed by API: inference, management, metrics)
    """
    proc = subprocess.Popen([sys.executable, "-m", "dynembed", "serve", *args],
                            stderr=subprocess.PIPE, text=True)
    urls, lines = {}, []

    def read():
        for line in proc.stderr:
            lines.append(line)
            match = re.match(r"(\w+) API on (http://\S+)", line)
            if match:
                urls[match.group(1)] = match.group(2)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("dynembed serve exited:\n" + "".join(lines))
        if len(urls) == 3:
            try:
                if httpx.get(urls["inference"] + "/ping").status_code == 200 and \
                        httpx.get(urls["inference"] + ready).status_code == 200:
                    return proc, urls
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("dynembed serve did not come up:\n" + "".join(lines))


def predict_request(batch: list[dict], model: str = "ctr") -> bytes:
    """An HTTP/1.1 request (kept alive) predicting ``batch`` with ``model``, as sent on a
    socket."""
    body = json.dumps(batch).encode()
    return (f"POST /predictions/{model} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def read_answer(sock: socket.socket, timeout: float = 60):
    """(status, headers, body: parsed if JSON) of the response read from ``sock``, or the
    name of the error that came instead (``ConnectionResetError``, ``RemoteDisconnected``,
    ...)."""
    sock.settimeout(timeout)
    try:
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__
    try:
        body = json.loads(body)
    except ValueError:
        body = body.decode(errors="replace")
    return response.status, dict(response.getheaders()), body


def torchserve_error(response: httpx.Response, code: int, kind: str | None = None) -> str:
    """The message of a TorchServe-shaped error ``{"code", "type", "message"}``, checking
    the status, the shape and (if given) the type."""
    assert response.status_code == code, response.text
    body = response.json()
    assert set(body) == {"code", "type", "message"} and body["code"] == code
    if kind is not None:
        assert body["type"] == kind, body
    return body["message"]


def eventually(condition, timeout: float = 20.0) -> None:
    """Polls ``condition()`` until it is true; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
