"""Security: tokens, the key file, loopback defaults, custom handlers only where allowed,
and packages whose dense program would run code when loaded."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pathlib
import pickle
import shutil
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch

from dynembed.serving import (
    ModelServer,
    PackageError,
    ServerConfig,
    ServingError,
    open_package,
)
from dynembed.serving.auth import Tokens
from dynembed.serving.server import parse_address
from tests.serving.helpers import (
    Running,
    examples,
    start_server,
    torchserve_error,
    write_package,
)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    folder = tmp_path_factory.mktemp("security")
    write_package(folder)
    return folder / "ctr-1.0"


@pytest.fixture
def store(package, tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    shutil.copytree(package, folder / "ctr-1.0")
    return folder


# ---------------------------------------------------------------------- tokens
def test_the_management_api_needs_its_token(store):
    running = start_server(store)
    try:
        url = running.management + "/models"
        key = json.loads(running.key_file.read_text())["management"]["key"]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key},
                        {"Authorization": f"Basic {key}"}, {"Authorization": "Bearer"},
                        {"Authorization": f"Bearer {key}x"}):
            torchserve_error(httpx.get(url, headers=headers), 401, "InvalidKeyException")
            torchserve_error(httpx.post(url, params={"url": "ctr-1.0"}, headers=headers), 401)
            torchserve_error(httpx.delete(url + "/ctr", headers=headers), 401)
        assert running.server.registry.models == {}  # nothing happened
        assert httpx.get(url, headers=running.token()).status_code == 200
        assert httpx.post(url, params={"url": "ctr-1.0"},
                          headers={"Authorization": f"Bearer {key}"}).status_code == 200
        # the scheme's case does not matter (RFC 9110): "bearer" was refused with a 401
        for scheme in ("bearer", "BEARER"):
            assert httpx.get(url, headers={"Authorization": f"{scheme} {key}"}
                             ).status_code == 200
        # inference stays open by default, and its key is not written
        assert httpx.post(running.inference + "/predictions/ctr",
                          json=examples(2)).status_code == 200
        assert set(json.loads(running.key_file.read_text())) == {"management"}
    finally:
        running.stop()


def _start_with_inference_auth(store, **options) -> Running:
    """start_server for a server with inference authorization on."""
    config = ServerConfig(model_store=str(store), inference_address="127.0.0.1:0",
                          management_address="127.0.0.1:0", metrics_address="127.0.0.1:0",
                          key_file=str(store.parent / "key_file.json"), inference_auth=True,
                          **options)
    server = ModelServer(config)
    ports = {api: port for api, (_, port) in server.bind().items()}
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    urls = {api: f"http://127.0.0.1:{port}" for api, port in ports.items()}
    running = Running(server, thread, urls["inference"], urls["management"], urls["metrics"],
                      Path(config.key_file))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and thread.is_alive():
        try:
            ping = httpx.get(urls["inference"] + "/ping", headers=running.token("inference"))
            if ping.status_code == 200 and server.registry.models.keys() >= set(config.models):
                return running
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    running.stop()
    raise RuntimeError("the server did not start")


def test_inference_authorization_when_turned_on(store):
    running = _start_with_inference_auth(store, models={"ctr": "ctr-1.0"})
    try:
        # health probes stay open (they carry no data; Kubernetes calls them without a token)
        for probe in ("/ping", "/v2/health/live", "/v2/health/ready"):
            assert httpx.get(running.inference + probe).status_code == 200
        torchserve_error(httpx.get(running.inference + "/v2/models/ctr"), 401,
                         "InvalidKeyException")
        keys = json.loads(running.key_file.read_text())
        assert set(keys) == {"management", "inference"}
        assert keys["management"]["key"] != keys["inference"]["key"]
        v2 = {"inputs": [{"name": "user", "shape": [1], "datatype": "BYTES", "data": ["u"]},
                         {"name": "item", "shape": [1], "datatype": "BYTES", "data": ["i"]},
                         {"name": "tags", "shape": [1], "datatype": "BYTES", "data": [[]]}]}
        calls = [("/predictions/ctr", examples(2)), ("/v1/models/ctr:predict",
                                                     {"instances": examples(2)}),
                 ("/v2/models/ctr/infer", v2)]
        for path, body in calls:
            url = running.inference + path
            torchserve_error(httpx.post(url, json=body), 401, "InvalidKeyException")
            torchserve_error(httpx.post(url, json=body, headers=running.token("management")), 401)
            assert httpx.post(url, json=body,
                              headers=running.token("inference")).status_code == 200
        torchserve_error(httpx.get(running.management + "/models",
                                   headers=running.token("inference")), 401)
        assert httpx.get(running.management + "/models",
                         headers=running.token()).status_code == 200
    finally:
        running.stop()


def test_management_authorization_can_be_turned_off(store):
    running = start_server(store, management_auth=False)
    try:
        assert httpx.get(running.management + "/models").status_code == 200
        assert not running.key_file.exists()  # no token required, none written
    finally:
        running.stop()
    other = running.key_file
    other.write_text('{"management": {"key": "another-servers-token"}}')
    running = start_server(store, management_auth=False, key_file=str(other))
    running.stop()
    assert other.exists()  # another server's key file is not this one's to delete


def test_a_server_that_cannot_bind_leaves_the_running_servers_key_file(store, tmp_path):
    running = start_server(store, key_file=str(tmp_path / "key_file.json"))
    try:
        before = running.key_file.read_text()
        taken = running.inference.rsplit(":", 1)[1]
        result = subprocess.run(
            [sys.executable, "-m", "dynembed", "serve", "--model-store", str(store),
             "--inference-address", f"127.0.0.1:{taken}", "--management-address",
             "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
             "--key-file", str(running.key_file)],
            capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith(
            f"error: [Errno 98] cannot listen on 127.0.0.1:{taken} for the inference API")
        assert running.key_file.read_text() == before
    finally:
        running.stop()


def test_the_key_file_is_private_and_removed_at_shutdown(store, tmp_path):
    key_file = tmp_path / "keys" / "key_file.json"
    key_file.parent.mkdir()
    key_file.write_text('{"management": {"key": "old"}}')
    key_file.chmod(0o644)
    running = start_server(store, key_file=str(key_file))
    try:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = json.loads(key_file.read_text())["management"]["key"]
        assert key != "old" and len(key) >= 24
    finally:
        running.stop()
    assert not key_file.exists()
    assert list(key_file.parent.iterdir()) == []  # no temporary file left either


def test_a_leftover_temporary_key_file_does_not_widen_the_mode(tmp_path):
    key_file = tmp_path / "key_file.json"
    leftover = tmp_path / f".key_file.json.{os.getpid()}"
    leftover.write_text("stale")
    leftover.chmod(0o644)
    tokens = Tokens(key_file=key_file)
    assert not key_file.exists()  # written once the server holds its ports
    tokens.publish()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert json.loads(key_file.read_text()) == {"management": {"key": tokens.keys[
        "management"]}}
    tokens.remove_file()
    assert not key_file.exists()


def test_servers_bind_loopback_and_require_management_tokens_by_default(tmp_path):
    config = ServerConfig(model_store=str(tmp_path))
    for name in ("inference_address", "management_address", "metrics_address"):
        assert parse_address(getattr(config, name), name)[0] == "127.0.0.1"
    assert config.management_auth is True and config.inference_auth is False
    assert config.allow_custom_handlers == ()


# ---------------------------------------------------------------------- custom handlers
HANDLER = '''
from pathlib import Path

Path(__file__).with_name("imported").write_text("the handler's code ran")


class MyHandler:
    def __init__(self, package):
        self.package = package
        self.features = package.manifest["features"]

    def validate(self, examples):
        return [examples] if isinstance(examples, dict) else examples

    def predict(self, examples):
        return [float(len(e["user"])) for e in examples]
'''


def _custom_package(store, handler: str = "custom:handler.py:MyHandler",
                    folder: str = "custom-1.0") -> pathlib.Path:
    target = store / folder
    shutil.copytree(store / "ctr-1.0", target)
    (target / "handler.py").write_text(HANDLER)
    manifest = json.loads((target / "MANIFEST.json").read_text())
    manifest["model"]["handler"] = handler
    (target / "MANIFEST.json").write_text(json.dumps(manifest))
    return target


def test_a_custom_handler_is_refused_unless_allowed(store):
    custom = _custom_package(store)
    for allowed in ((), ("other",)):
        running = start_server(store, allow_custom_handlers=allowed)
        try:
            response = httpx.post(running.management + "/models",
                                  params={"url": "custom-1.0"}, headers=running.token())
            message = torchserve_error(response, 400, "BadRequestException")
            assert "custom handler" in message and "allow" in message
            assert running.server.registry.models == {}
        finally:
            running.stop()
    at_startup = ModelServer(ServerConfig(model_store=str(store), key_file=None,
                                          models={"ctr": "custom-1.0"}))
    with pytest.raises(ServingError, match="custom handler") as raised:
        asyncio.run(at_startup.start_models())
    assert raised.value.status == 400
    assert not (custom / "imported").exists()  # its code never ran


def test_an_allowed_custom_handler_runs(store):
    custom = _custom_package(store)
    running = start_server(store, allow_custom_handlers=("ctr",))
    try:
        response = httpx.post(running.management + "/models", params={"url": "custom-1.0"},
                              headers=running.token())
        assert response.status_code == 200, response.text
        assert (custom / "imported").exists()
        answer = httpx.post(running.inference + "/predictions/ctr",
                            json=[{"user": "abcd"}, {"user": "xy"}])
        assert answer.status_code == 200 and answer.json() == [4.0, 2.0]
    finally:
        running.stop()


def test_a_malformed_custom_handler_is_400_even_when_allowed(store):
    cases = [("custom:../handler.py:MyHandler", "inside the package"),
             ("custom:/etc/hostname:MyHandler", "inside the package"),
             ("custom:handler.py", "custom:<file>.py:<Class>"),
             ("custom:handler.py:Missing", "failed to load"),
             ("mymodule:handle", "unknown handler")]
    for k, (handler, _) in enumerate(cases):
        _custom_package(store, handler, folder=f"custom-{k}")
    (store / "handler.py").write_text(HANDLER)  # beside the packages, not inside one
    running = start_server(store, allow_custom_handlers=("ctr",))
    try:
        for k, (handler, problem) in enumerate(cases):
            response = httpx.post(running.management + "/models",
                                  params={"url": f"custom-{k}"}, headers=running.token())
            assert problem in torchserve_error(response, 400, "BadRequestException"), handler
        assert not (store / "imported").exists()
        assert running.server.registry.models == {}
    finally:
        running.stop()


# ---------------------------------------------------------------------- hostile packages
class _Touch:
    """Unpickling this creates ``path``: what a hostile package would do instead."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def _rewrite_archive(dense: pathlib.Path, *, model=None, constants=None, extra=None):
    """Rewrites the torch.export archive ``dense`` with its model JSON passed through
    ``model`` and its constants config replaced by ``constants``."""
    original = dense.read_bytes()
    with zipfile.ZipFile(io.BytesIO(original)) as zin, zipfile.ZipFile(dense, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("models/model.json") and model is not None:
                document = json.loads(data)
                model(document)
                data = json.dumps(document).encode()
            if info.filename.endswith("_constants_config.json") and constants is not None:
                data = json.dumps(constants).encode()
            zout.writestr(info, data)
        root = zin.namelist()[0].split("/")[0]
        for name, data in (extra or {}).items():
            zout.writestr(f"{root}/{name}", data)


def _hostile(kind: str, dense: pathlib.Path, marker: pathlib.Path) -> None:
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    if kind == "pickle":
        dense.write_bytes(pickle.dumps(_Touch(marker)))
    elif kind == "torch.save":
        torch.save({"program": _Touch(marker)}, dense)
    elif kind == "shape expression":
        def model(document):
            sizes = document["graph_module"]["graph"]["tensor_values"]["input"]["sizes"]
            sizes[0]["as_expr"]["expr_str"] = f"{code} or " + sizes[0]["as_expr"]["expr_str"]
        _rewrite_archive(dense, model=model)
    elif kind == "guard":
        _rewrite_archive(dense, model=lambda document: document.update(guards_code=[code]))
    else:  # a constant stored as an "opaque object", which torch unpickles with pickle
        prefix = "opaque_obj_" if kind == "opaque constant" else "custom_obj_"
        _rewrite_archive(dense, constants={"config": {"evil": {
            "path_name": prefix + "0", "is_param": False, "use_pickle": True,
            "tensor_meta": None}}},
            extra={f"data/constants/{prefix}0": pickle.dumps(_Touch(marker))})


HOSTILE = ["pickle", "torch.save", "shape expression", "guard", "opaque constant",
           "custom object constant"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_dense_program_is_refused_without_running(store, tmp_path, kind):
    marker = tmp_path / "pwned"
    _hostile(kind, store / "ctr-1.0" / "dense.pt2", marker)
    with pytest.raises(PackageError, match="dense.pt2"):
        open_package(store / "ctr-1.0")
    assert not marker.exists()


def test_a_hostile_package_is_refused_by_the_server(store, tmp_path):
    marker = tmp_path / "pwned"
    for k, kind in enumerate(HOSTILE):
        shutil.copytree(store / "ctr-1.0", store / f"evil-{k}")
        _hostile(kind, store / f"evil-{k}" / "dense.pt2", marker)
    running = start_server(store)
    try:
        for k in range(len(HOSTILE)):
            response = httpx.post(running.management + "/models", params={"url": f"evil-{k}"},
                                  headers=running.token(), timeout=30)
            assert "dense.pt2" in torchserve_error(response, 400, "BadRequestException")
        assert running.server.registry.models == {}
        assert not marker.exists()
        # the untouched package still loads and serves
        assert httpx.post(running.management + "/models", params={"url": "ctr-1.0"},
                          headers=running.token()).status_code == 200
    finally:
        running.stop()


def test_the_archive_check_keeps_real_guards_and_shape_expressions(tmp_path):
    from dynembed.serving.package import load_dense

    class Pairs(torch.nn.Module):
        def forward(self, x):
            return x.reshape(-1, 2, x.shape[1] // 2).sum(1).amax(1)

    program = torch.export.export(
        Pairs(), (torch.zeros(4, 6),),
        dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("d") * 2},))
    assert program._guards_code  # this program does carry guards torch will exec
    torch.export.save(program, tmp_path / "pairs.pt2")
    module = load_dense(tmp_path / "pairs.pt2")
    x = torch.arange(30.0).reshape(3, 10)
    assert torch.equal(module(x), Pairs()(x))


def test_a_custom_handler_is_allowed_by_its_package_name_not_the_name_it_is_served_under(
        store):
    """A model_name must not let a management caller run a package's code under a name the
    operator allowed for another package; the allowed package may be served under any name."""
    custom = _custom_package(store)  # its package name is ctr
    running = start_server(store, allow_custom_handlers=("other",))
    try:
        response = httpx.post(running.management + "/models", headers=running.token(),
                              params={"url": "custom-1.0", "model_name": "other"})
        message = torchserve_error(response, 400, "BadRequestException")
        assert "--allow-custom-handler ctr" in message and "package's name" in message
        assert not (custom / "imported").exists()  # its code never ran
    finally:
        running.stop()
    running = start_server(store, allow_custom_handlers=("ctr",))
    try:
        response = httpx.post(running.management + "/models", headers=running.token(),
                              params={"url": "custom-1.0", "model_name": "other"})
        assert response.status_code == 200, response.text
        answer = httpx.post(running.inference + "/predictions/other", json=[{"user": "abc"}])
        assert answer.status_code == 200 and answer.json() == [3.0]
    finally:
        running.stop()


def test_a_failed_prediction_names_no_server_file(package, tmp_path):
    """A damaged checkpoint block answered "prediction failed: /srv/.../rank-0.rows:
    records: block 13 fails its checksum": the server's paths went to every client."""
    from tests.serving.test_package import _damaged_copy
    folder = tmp_path / "store"
    shutil.copytree(package, folder / "ctr-1.0", ignore=shutil.ignore_patterns("tables"))
    _damaged_copy(package / "tables", folder / "ctr-1.0" / "tables")
    running = start_server(folder, models={"ctr": "ctr-1.0"})
    try:
        response = httpx.post(running.inference + "/predictions/ctr",
                              json=examples(50, seed=7), timeout=30)
        assert response.status_code == 500
        assert response.json()["message"] == "prediction failed; see the server log"
        assert str(tmp_path) not in response.text
    finally:
        running.stop()
