"""The management API over HTTP: TorchServe's paths, parameters, status codes and JSON."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time

import httpx
import pytest
import torch
from torch import nn

from tests.serving.helpers import (
    eventually,
    examples,
    start_server,
    torchserve_error,
    write_package,
)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """ctr 1.0 and 2.0 (different seeds, so different answers) and copies of 1.0 renamed
    m0..m4, exported once for the module."""
    folder = tmp_path_factory.mktemp("packages")
    write_package(folder, version="1.0", seed=0)
    write_package(folder, version="2.0", seed=1)
    for k in range(5):
        _copy(folder / "ctr-1.0", folder / f"m{k}-1.0", name=f"m{k}")
    return folder


def _copy(source, target, *, name: str | None = None, version: str | None = None):
    shutil.copytree(source, target)
    manifest = json.loads((target / "MANIFEST.json").read_text())
    manifest["model"]["name"] = name or manifest["model"]["name"]
    manifest["model"]["version"] = version or manifest["model"]["version"]
    (target / "MANIFEST.json").write_text(json.dumps(manifest))


@pytest.fixture
def store(packages, tmp_path):
    folder = tmp_path / "store"
    shutil.copytree(packages, folder)
    return folder


@pytest.fixture
def server(store):
    running = start_server(store, batch_size=4, max_batch_delay_ms=1)
    yield running
    running.stop()


class Client:
    """The management API with the right token."""

    def __init__(self, running) -> None:
        self.running, self.headers = running, running.token()

    def __call__(self, method: str, path: str, **params) -> httpx.Response:
        return httpx.request(method, self.running.management + path, params=params,
                             headers=self.headers, timeout=30)

    def register(self, url: str, **params) -> httpx.Response:
        return self("POST", "/models", url=url, **params)

    def models(self) -> list[str]:
        response = self("GET", "/models")
        assert response.status_code == 200
        return [m["modelName"] for m in response.json()["models"]]

    def describe(self, path: str) -> list[dict]:
        response = self("GET", "/models/" + path)
        assert response.status_code == 200, response.text
        return response.json()

    def predict(self, path: str, batch: list[dict]) -> httpx.Response:
        return httpx.post(self.running.inference + "/predictions/" + path, json=batch,
                          timeout=30)


@pytest.fixture
def api(server):
    return Client(server)


# ---------------------------------------------------------------------- register
def test_register_synchronously(api):
    assert api.models() == []
    response = api.register("ctr-1.0")
    assert response.status_code == 200
    assert response.json() == {"status": 'Model "ctr" Version: 1.0 registered with 1 '
                                         "initial workers"}
    assert api("GET", "/models").json() == {"models": [{"modelName": "ctr",
                                                        "modelUrl": "ctr-1.0"}]}
    assert api.predict("ctr", examples(3)).status_code == 200
    response = api.register("m1-1.0", initial_workers=2, batch_size=3, max_batch_delay=7,
                            response_timeout=9, synchronous="true")
    assert response.status_code == 200 and "2 initial workers" in response.json()["status"]
    [described] = api.describe("m1")
    assert (described["minWorkers"], described["maxWorkers"], len(described["workers"]),
            described["batchSize"], described["maxBatchDelay"],
            described["responseTimeout"]) == (2, 2, 2, 3, 7, 9)
    assert described["loadedAtStartup"] is False


def test_register_with_preload_reads_the_tables_into_memory(api):
    assert api.register("ctr-1.0", preload="true").status_code == 200
    assert api.register("m1-1.0").status_code == 200  # the server's default: lazily
    registry = api.running.server.registry
    preloaded = registry.get("ctr").handler.embeddings.tables.values()
    lazy = registry.get("m1").handler.embeddings.tables.values()
    assert all(t.base is None and len(t) > 0 for t in preloaded)
    assert all(t.base is not None and len(t) == 0 for t in lazy)
    batch = examples(6)
    assert api.predict("ctr", batch).json() == api.predict("m1", batch).json()


def test_register_asynchronously(api):
    response = api.register("ctr-1.0", synchronous="false", initial_workers=2)
    assert response.status_code == 202 and "status" in response.json()
    eventually(lambda: "ctr" in api.models())
    eventually(lambda: len(api.describe("ctr")[0]["workers"]) == 2)
    assert api.predict("ctr", examples(2)).status_code == 200


def test_an_asynchronous_registration_is_refused_at_once_for_what_its_manifest_shows(
        api, store):
    """A duplicate version or a wrong model_name answered 202; the failure was only logged."""
    assert api.register("ctr-1.0").status_code == 200
    for url in ("ctr-1.0", "m1-1.0"):  # registered already; the other is fine
        assert api.register(url, synchronous="false").status_code == (
            409 if url == "ctr-1.0" else 202)
    torchserve_error(api.register("ctr-1.0", synchronous="false"), 409,
                     "ConflictStatusException")
    message = torchserve_error(api.register("m2-1.0", synchronous="false",
                                            model_name="../m3"), 400, "BadRequestException")
    assert "model_name" in message
    (store / "not-a-package").mkdir()
    torchserve_error(api.register("not-a-package", synchronous="false"), 400,
                     "BadRequestException")
    eventually(lambda: "m1" in api.models())
    assert sorted(api.models()) == ["ctr", "m1"]


def test_a_version_being_registered_is_reserved_until_its_registration_ends(api, store):
    """Two asynchronous registrations of one version: the second is refused while the first
    loads; one whose tables fail to open frees its version again."""
    _copy(store / "m1-1.0", store / "m1-again")
    assert api.register("m1-1.0", synchronous="false").status_code == 202
    message = torchserve_error(api.register("m1-again", synchronous="false"), 409,
                               "ConflictStatusException")
    assert "m1" in message
    eventually(lambda: "m1" in api.models())
    shutil.rmtree(store / "m2-1.0" / "tables")  # its manifest is fine, its tables are gone
    assert api.register("m2-1.0", synchronous="false").status_code == 202
    registry = api.running.server.registry
    eventually(lambda: not registry._pending)
    assert "m2" not in api.models()
    torchserve_error(api.register("m2-1.0"), 400, "BadRequestException")  # not 409


def test_register_twice_is_409(api, store):
    assert api.register("ctr-1.0").status_code == 200
    message = torchserve_error(api.register("ctr-1.0"), 409, "ConflictStatusException")
    assert "1.0" in message and "ctr" in message
    _copy(store / "ctr-1.0", store / "ctr-again")  # same name and version, other folder
    torchserve_error(api.register("ctr-again"), 409, "ConflictStatusException")
    assert [d["modelUrl"] for d in api.describe("ctr/all")] == ["ctr-1.0"]


def test_register_without_url_is_400(api):
    assert "url" in torchserve_error(api("POST", "/models"), 400, "BadRequestException")
    assert "url" in torchserve_error(api.register(""), 400, "BadRequestException")
    assert api.models() == []


def test_register_refuses_urls_outside_the_model_store(api, store, tmp_path):
    outside = tmp_path / "outside-1.0"
    shutil.copytree(store / "ctr-1.0", outside)  # a valid package, but not in the store
    (store / "link").symlink_to(outside, target_is_directory=True)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        for url in ("../outside-1.0", str(outside), "ctr-1.0/../../outside-1.0", "link",
                    f"http://127.0.0.1:{port}/ctr.mar", f"https://127.0.0.1:{port}/x",
                    f"file://{outside}", "s3://bucket/ctr.mar", "/etc"):
            message = torchserve_error(api.register(url), 400, "BadRequestException")
            assert "model store" in message or "downloads" in message, (url, message)
            torchserve_error(api.register(url, synchronous="false"), 400)
        with pytest.raises(BlockingIOError):  # nothing tried to fetch a URL
            listener.accept()
    finally:
        listener.close()
    assert api.models() == [] and api.running.server.registry.models == {}


def test_register_a_missing_package_is_404_and_a_bad_one_400(api, store):
    assert "nope" in torchserve_error(api.register("nope"), 404, "ModelNotFoundException")
    for url in ("ctr\x00x", "a" * 300):  # once 500s (a NUL byte, a name too long)
        assert "not a usable path" in torchserve_error(api.register(url), 400)
    for name, change in (("opt-str", lambda m: m["tables"]["user"].update(optimizer="Adagrad")),
                         ("tables-list", lambda m: m.update(tables=list(m["tables"])))):
        _copy(store / "ctr-1.0", store / name)
        manifest = json.loads((store / name / "MANIFEST.json").read_text())
        change(manifest)
        (store / name / "MANIFEST.json").write_text(json.dumps(manifest))
        torchserve_error(api.register(name), 400, "BadRequestException")  # once a 500
    torchserve_error(api.register("nope", synchronous="false"), 404)
    (store / "empty").mkdir()
    assert "not a model package" in torchserve_error(api.register("empty"), 400)
    (store / "ctr-1.0" / "MANIFEST.json").write_text("{")
    assert "JSON" in torchserve_error(api.register("ctr-1.0"), 400)
    assert api.models() == []


def test_register_with_bad_parameters_is_400(api):
    for params in ({"initial_workers": "two"}, {"initial_workers": "-1"},
                   {"batch_size": "0"}, {"batch_size": "1.5"}, {"max_batch_delay": "-1"},
                   {"max_batch_delay": "soon"}, {"response_timeout": "0"},
                   {"synchronous": "maybe"}, {"preload": "yes"},
                   {"model_name": "../x"}, {"max_batch_delay": str(10**400)},
                   {"initial_workers": "100000"}, {"response_timeout": str(2**31)}):
        message = torchserve_error(api.register("ctr-1.0", **params), 400, "BadRequestException")
        assert next(iter(params)) in message, (params, message)
    assert api.models() == []


def test_model_name_serves_a_package_under_another_name(api):
    """As TorchServe's model_name: the package answers under that name only, and that name
    is used by every API (it was refused with a 400 unless it was the package's own)."""
    response = api.register("ctr-1.0", model_name="ranker")
    assert response.status_code == 200, response.text
    assert response.json()["status"].startswith('Model "ranker" Version: 1.0 registered')
    assert api.models() == ["ranker"]
    batch = examples(5)
    answer = api.predict("ranker", batch)
    assert answer.status_code == 200
    torchserve_error(api.predict("ctr", batch), 404, "ModelNotFoundException")
    [described] = api.describe("ranker")
    assert (described["modelName"], described["modelVersion"]) == ("ranker", "1.0")
    assert described["workers"][0]["id"].startswith("ranker-1.0-")
    v2 = httpx.post(api.running.inference + "/v2/models/ranker/infer", timeout=30, json={
        "inputs": [{"name": "user", "datatype": "BYTES", "shape": [1], "data": ["u1"]},
                   {"name": "item", "datatype": "BYTES", "shape": [1], "data": ["i1"]},
                   {"name": "tags", "datatype": "BYTES", "shape": [1], "data": [["t1"]]}]})
    assert v2.status_code == 200 and v2.json()["model_name"] == "ranker", v2.text
    metrics = httpx.get(api.running.metrics + "/metrics", timeout=30).text
    assert re.search(r'^dynembed_serving_requests_total\{model="ranker",status="200",'
                     r'version="1.0"\} 2.0$', metrics, re.MULTILINE), metrics
    assert 'model="ctr"' not in metrics
    assert api("PUT", "/models/ranker", min_worker=3, synchronous="true").status_code == 200
    assert len(api.describe("ranker")[0]["workers"]) == 3
    assert api("DELETE", "/models/ranker").status_code == 200
    assert api.models() == []
    torchserve_error(api.predict("ranker", batch), 404, "ModelNotFoundException")


def test_one_package_under_two_names_is_two_independent_models(api):
    """Each name has its own versions, default, workers and lifetime; a version of a name is
    still unique (409), also while its registration is in progress."""
    assert api.register("ctr-1.0").status_code == 200
    assert api.register("ctr-1.0", model_name="ranker").status_code == 200
    torchserve_error(api.register("ctr-1.0", model_name="ranker"), 409,
                     "ConflictStatusException")
    torchserve_error(api.register("ctr-1.0"), 409, "ConflictStatusException")
    assert api.register("ctr-2.0", model_name="ranker").status_code == 200
    assert sorted(api.models()) == ["ctr", "ranker"]
    batch = examples(6)
    first = api.predict("ctr", batch).json()
    assert api.predict("ranker", batch).json() == first  # ranker's default: its first, 1.0
    assert api("PUT", "/models/ranker/2.0/set-default").status_code == 200
    second = api.predict("ranker", batch).json()
    assert second != first and api.predict("ctr", batch).json() == first
    torchserve_error(api("GET", "/models/ctr/2.0"), 404, "ModelVersionNotFoundException")
    assert api("PUT", "/models/ranker/1.0", min_worker=2, synchronous="true").status_code == 200
    assert len(api.describe("ranker/1.0")[0]["workers"]) == 2
    assert len(api.describe("ctr")[0]["workers"]) == 1
    assert api("DELETE", "/models/ranker/1.0").status_code == 200
    assert api.predict("ctr", batch).json() == first
    assert api.predict("ranker/2.0", batch).json() == second
    # an asynchronous registration under a name reserves that name's version at once
    assert api.register("ctr-1.0", model_name="m9", synchronous="false").status_code == 202
    torchserve_error(api.register("ctr-1.0", model_name="m9", synchronous="false"), 409,
                     "ConflictStatusException")
    eventually(lambda: "m9" in api.models())
    assert api.predict("m9", batch).json() == first


def test_models_loaded_at_startup_under_another_name(store):
    """ServerConfig.models (``dynembed serve --models NAME=PACKAGE``) serves the package
    under NAME, also twice under two names (the server refused to start)."""
    running = start_server(store, models={"ranker": "ctr-1.0", "ctr": "ctr-1.0"})
    client = Client(running)
    try:
        assert sorted(client.models()) == ["ctr", "ranker"]
        [described] = client.describe("ranker")
        assert described["modelName"] == "ranker" and described["loadedAtStartup"] is True
        batch = examples(4)
        assert client.predict("ranker", batch).json() == client.predict("ctr", batch).json()
        assert client("PUT", "/models/ranker", min_worker=2,
                      synchronous="true").status_code == 200
        assert len(client.describe("ranker")[0]["workers"]) == 2
        assert client("DELETE", "/models/ranker").status_code == 200
        assert client.models() == ["ctr"]
        assert client.predict("ctr", batch).status_code == 200
    finally:
        running.stop()


def _replace_dense(package, dense, width: int) -> None:
    """Writes ``dense`` (exported for a (batch, width) input) as the package's program."""
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    program = torch.export.export(dense.eval(), (torch.zeros(4, width),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, package / "dense.pt2")


def test_a_dense_program_that_does_not_fit_its_manifest_is_refused_at_registration(
        api, store):
    """It registered, and every prediction then failed with a 500."""
    _copy(store / "ctr-1.0", store / "narrow", name="narrow")
    _replace_dense(store / "narrow", nn.Sequential(nn.Linear(7, 1), nn.Flatten(0)), 7)
    _copy(store / "ctr-1.0", store / "wide-out", name="wideout")
    _replace_dense(store / "wide-out", nn.Linear(11, 2), 11)  # (B, 2); the manifest says (B,)
    _copy(store / "ctr-1.0", store / "bad-dim", name="baddim")
    manifest = json.loads((store / "bad-dim" / "MANIFEST.json").read_text())
    manifest["dense"]["input_dim"] = 12
    (store / "bad-dim" / "MANIFEST.json").write_text(json.dumps(manifest))
    for url, problem in (("narrow", "does not run on the (batch, 11) input"),
                         ("wide-out", "answers [2, 2]"),
                         ("bad-dim", "dense.input_dim is 12 but its features' rows are 11")):
        message = torchserve_error(api.register(url), 400, "BadRequestException")
        assert problem in message and "re-export" in message, message
    assert api.models() == []


def test_an_asynchronous_registration_of_a_wrong_input_dim_is_refused_before_the_202(
        api, store):
    """It answered 202 and the mismatch was only logged once the package had loaded."""
    _copy(store / "ctr-1.0", store / "bad-dim", name="baddim")
    manifest = json.loads((store / "bad-dim" / "MANIFEST.json").read_text())
    manifest["dense"]["input_dim"] = 12
    (store / "bad-dim" / "MANIFEST.json").write_text(json.dumps(manifest))
    message = torchserve_error(api.register("bad-dim", synchronous="false"), 400,
                               "BadRequestException")
    assert "dense.input_dim is 12 but its features' rows are 11" in message, message
    assert "re-export" in message, message
    assert not api.running.server.registry._pending  # its version is not held
    assert api.models() == []


# ---------------------------------------------------------------------- list, describe
def test_list_models_paginates(api):
    for k in (3, 0, 4, 1, 2):
        assert api.register(f"m{k}-1.0").status_code == 200
    pages, token = [], None
    while True:
        params = {"limit": 2} if token is None else {"limit": 2, "next_page_token": token}
        body = api("GET", "/models", **params).json()
        pages.append([m["modelName"] for m in body["models"]])
        token = body.get("nextPageToken")
        if token is None:
            break
        assert isinstance(token, str)
    assert pages == [["m0", "m1"], ["m2", "m3"], ["m4"]]
    assert api("GET", "/models", limit=10).json() == {
        "models": [{"modelName": f"m{k}", "modelUrl": f"m{k}-1.0"} for k in range(5)]}
    assert api("GET", "/models", limit=2, next_page_token=4).json() == {
        "models": [{"modelName": "m4", "modelUrl": "m4-1.0"}]}
    assert api("GET", "/models", next_page_token=9).json() == {"models": []}
    for params in ({"limit": "0"}, {"limit": "x"}, {"next_page_token": "-1"},
                   {"next_page_token": "abc"}):
        torchserve_error(api("GET", "/models", **params), 400, "BadRequestException")


def test_describe_default_specific_and_all_versions(api):
    assert api.register("ctr-1.0").status_code == 200
    assert api.register("ctr-2.0").status_code == 200
    [default] = api.describe("ctr")
    assert default["modelName"] == "ctr" and default["modelVersion"] == "1.0"
    assert default["modelUrl"] == "ctr-1.0"
    for field in ("runtime", "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay",
                  "loadedAtStartup", "workers", "jobQueueStatus"):
        assert field in default, field
    assert set(default["jobQueueStatus"]) == {"remainingCapacity", "pendingRequests"}
    assert default["tablesCheckpoint"] is None  # the package's own tables
    worker = default["workers"][0]
    assert worker["status"] == "READY" and {"id", "startTime", "gpu", "memoryUsage"} <= \
        set(worker)
    assert [d["modelVersion"] for d in api.describe("ctr/2.0")] == ["2.0"]
    assert [d["modelVersion"] for d in api.describe("ctr/all")] == ["1.0", "2.0"]
    assert "nope" in torchserve_error(api("GET", "/models/nope"), 404, "ModelNotFoundException")
    torchserve_error(api("GET", "/models/nope/all"), 404, "ModelNotFoundException")
    assert "9.9" in torchserve_error(api("GET", "/models/ctr/9.9"), 404,
                           "ModelVersionNotFoundException")


# ---------------------------------------------------------------------- scale
def test_scale_workers_synchronously(api):
    assert api.register("ctr-1.0").status_code == 200
    assert api.register("ctr-2.0").status_code == 200
    response = api("PUT", "/models/ctr", min_worker=3, synchronous="true")
    assert response.status_code == 200
    assert response.json() == {"status": "Workers scaled to 3 for model: ctr, version: 1.0"}
    [described] = api.describe("ctr")
    assert (described["minWorkers"], described["maxWorkers"], len(described["workers"])) \
        == (3, 3, 3)
    assert len(api.describe("ctr/2.0")[0]["workers"]) == 1  # only the default version
    response = api("PUT", "/models/ctr/2.0", min_worker=2, max_worker=4, synchronous="true")
    assert response.status_code == 200 and "version: 2.0" in response.json()["status"]
    [described] = api.describe("ctr/2.0")
    assert (described["minWorkers"], described["maxWorkers"], len(described["workers"])) \
        == (2, 4, 2)
    # down: answered once the stopped workers are gone (it said 3 while they finished)
    response = api("PUT", "/models/ctr", min_worker=1, synchronous="true")
    assert response.json() == {"status": "Workers scaled to 1 for model: ctr, version: 1.0"}
    assert len(api.describe("ctr")[0]["workers"]) == 1
    assert api.predict("ctr", examples(3)).status_code == 200
    for params in ({"min_worker": "3", "max_worker": "2"}, {"min_worker": "-1"},
                   {"min_worker": "x"}, {"synchronous": "sometimes"}, {"min_worker": "1_0"},
                   {"min_worker": " 1"}, {"min_worker": "\u0663"}):
        torchserve_error(api("PUT", "/models/ctr", **params), 400, "BadRequestException")
    # a parameter given twice is refused, not read as its last value (TorchServe: first)
    response = httpx.put(api.running.management + "/models/ctr?min_worker=2&min_worker=0",
                         headers=api.headers, timeout=30)
    assert "given 2 times" in torchserve_error(response, 400, "BadRequestException")
    assert len(api.describe("ctr")[0]["workers"]) == 1
    torchserve_error(api("PUT", "/models/nope", min_worker=2), 404, "ModelNotFoundException")
    torchserve_error(api("PUT", "/models/ctr/9.9", min_worker=2), 404,
                     "ModelVersionNotFoundException")


def test_scale_workers_asynchronously(api):
    assert api.register("ctr-1.0").status_code == 200
    response = api("PUT", "/models/ctr", min_worker=3)  # synchronous defaults to false
    assert response.status_code == 202
    assert response.json() == {"status": "Processing worker updates..."}
    eventually(lambda: len(api.describe("ctr")[0]["workers"]) == 3)
    assert api("PUT", "/models/ctr/1.0", min_worker=2,
               synchronous="false").status_code == 202
    eventually(lambda: len(api.describe("ctr")[0]["workers"]) == 2)


# ---------------------------------------------------------------------- versions
def test_set_default_version_moves_predictions(api):
    assert api.register("ctr-1.0").status_code == 200
    assert api.register("ctr-2.0").status_code == 200
    batch = examples(6, seed=5)
    one, two = (api.predict(f"ctr/{v}", batch).json() for v in ("1.0", "2.0"))
    assert one != two  # different seeds, different answers
    assert api.predict("ctr", batch).json() == one  # the first registered is the default
    response = api("PUT", "/models/ctr/2.0/set-default")
    assert response.status_code == 200
    assert response.json() == {"status": 'Default version successfully updated for model '
                                         '"ctr" to "2.0"'}
    assert api.predict("ctr", batch).json() == two
    assert api.describe("ctr")[0]["modelVersion"] == "2.0"
    torchserve_error(api("PUT", "/models/ctr/9.9/set-default"), 404,
                     "ModelVersionNotFoundException")
    torchserve_error(api("PUT", "/models/nope/1.0/set-default"), 404, "ModelNotFoundException")
    assert api.predict("ctr", batch).json() == two


def test_unregister_versions(api):
    assert api.register("ctr-1.0").status_code == 200
    assert api.register("ctr-2.0").status_code == 200
    batch = examples(2)
    # the default version goes last (TorchServe: 403 while other versions exist)
    for path in ("/models/ctr", "/models/ctr/1.0"):
        message = torchserve_error(api("DELETE", path), 403, "InvalidModelVersionException")
        assert "Cannot remove default version for model ctr" in message
    assert api.predict("ctr/1.0", batch).status_code == 200
    response = api("DELETE", "/models/ctr/2.0")
    assert response.status_code == 200 and response.json() == {
        "status": 'Model "ctr" unregistered'}
    torchserve_error(api.predict("ctr/2.0", batch), 404, "ModelVersionNotFoundException")
    torchserve_error(api("GET", "/models/ctr/2.0"), 404, "ModelVersionNotFoundException")
    torchserve_error(api("DELETE", "/models/ctr/2.0"), 404, "ModelVersionNotFoundException")
    assert [d["modelVersion"] for d in api.describe("ctr/all")] == ["1.0"]
    assert api("DELETE", "/models/ctr").status_code == 200  # the last, default, version
    assert api.models() == []
    torchserve_error(api.predict("ctr", batch), 404, "ModelNotFoundException")
    torchserve_error(api("DELETE", "/models/ctr"), 404, "ModelNotFoundException")
    assert api.register("ctr-2.0").status_code == 200  # and it can come back
    assert api.predict("ctr", batch).status_code == 200


def test_an_unregistered_version_leaves_no_metrics_behind(api):
    """A version that served requests kept its 67 series (requests, latency, queue, batch,
    inference, refreshes) after it was unregistered: a server that rotates versions
    exposed every version it ever had, 9,469 series after 200 versions."""
    def series(version: str) -> list[str]:
        text = httpx.get(api.running.metrics + "/metrics", timeout=30).text
        return [line for line in text.splitlines()
                if not line.startswith("#") and f'version="{version}"' in line]

    assert api.register("ctr-1.0").status_code == 200
    assert api.register("ctr-2.0").status_code == 200
    for path in ("ctr/1.0", "ctr/2.0"):
        assert api.predict(path, examples(3)).status_code == 200
    assert api("PUT", "/models/ctr/2.0", min_worker=2, synchronous="true").status_code == 200
    assert series("2.0") and series("1.0")
    assert api("DELETE", "/models/ctr/2.0").status_code == 200
    assert series("2.0") == [] and series("1.0")  # the other version's stay
    assert api("DELETE", "/models/ctr/1.0").status_code == 200
    assert series("1.0") == []
    assert api.register("ctr-2.0").status_code == 200  # it can come back, counting anew
    assert api.predict("ctr/2.0", examples(2)).status_code == 200
    assert any(line.startswith("dynembed_serving_requests_total") and line.endswith(" 1.0")
               for line in series("2.0"))


def test_a_request_in_flight_when_its_model_is_unregistered_gets_404_at_once(api):
    """It found the model, then its body arrived after the unregister: it once waited the
    whole response_timeout on the stopped batcher, then got 503."""
    assert api.register("ctr-1.0", response_timeout=60).status_code == 200
    body = json.dumps(examples(1)[0]).encode()
    host, port = api.running.inference.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /predictions/ctr HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(0.5)  # the server reads the headers and finds the model meanwhile
        assert api("DELETE", "/models/ctr").status_code == 200
        conn.sendall(body[5:])
        reply = conn.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 404") and "ModelNotFoundException" in reply


def _post_while_the_default_moves(api, path: bytes, body: bytes) -> str:
    """POSTs ``body`` to ``path`` of model ctr (default 1.0, also 2.0 registered), moving
    the default to 2.0 and unregistering 1.0 after the headers and before the rest of the
    body; returns the raw HTTP reply, asserted to be a 200."""
    host, port = api.running.inference.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (path, len(body)) + body[:5])
        time.sleep(0.5)  # the server reads the headers and finds the default (1.0)
        assert api("PUT", "/models/ctr/2.0/set-default").status_code == 200
        assert api("DELETE", "/models/ctr/1.0").status_code == 200
        conn.sendall(body[5:])
        reply = conn.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 200"), reply
    return reply


def test_a_request_for_the_default_version_follows_it_while_its_body_arrives(api):
    """It found version 1.0 as the default; the default moved to 2.0 and 1.0 was
    unregistered before its body arrived: it once got 404 naming 1.0, a version it never
    asked for."""
    assert api.register("ctr-1.0", response_timeout=60).status_code == 200
    assert api.register("ctr-2.0").status_code == 200
    body = json.dumps(examples(1)[0]).encode()
    reply = _post_while_the_default_moves(api, b"/predictions/ctr", body)
    assert [json.loads(reply.split("\r\n\r\n", 1)[1])] == api.predict("ctr/2.0", [
        examples(1)[0]]).json()


def test_zero_workers_as_in_torchserve(api):
    """TorchServe registers with 0 workers (its default) and scales to 0; predictions then
    answer 503 until the model is scaled up (both were refused with 400)."""
    response = api.register("ctr-1.0", initial_workers=0)
    assert response.status_code == 200 and "0 initial workers" in response.json()["status"]
    batch = examples(2)
    message = torchserve_error(api.predict("ctr", batch), 503, "ServiceUnavailableException")
    assert "No worker is available" in message and "min_worker=1" in message
    assert api("PUT", "/models/ctr", min_worker=1, synchronous="true").status_code == 200
    assert api.predict("ctr", batch).status_code == 200
    assert api("PUT", "/models/ctr", min_worker=0, max_worker=0,
               synchronous="true").status_code == 200
    [described] = api.describe("ctr")
    assert (described["minWorkers"], described["maxWorkers"], described["workers"]) == (0, 0, [])
    torchserve_error(api.predict("ctr", batch), 503, "ServiceUnavailableException")


def test_models_loaded_at_startup(store):
    running = start_server(store, models={"ctr": "ctr-1.0"}, default_workers=2)
    try:
        [described] = Client(running).describe("ctr")
        assert described["loadedAtStartup"] is True and len(described["workers"]) == 2
    finally:
        running.stop()


def test_an_asynchronous_scale_out_of_bounds_is_refused_at_once(api):
    """It answered 202 and the background task dropped it (only asyncio logged why)."""
    assert api.register("ctr-1.0", initial_workers=3).status_code == 200
    for synchronous in ("false", "true"):
        response = api("PUT", "/models/ctr", max_worker=2, synchronous=synchronous)
        message = torchserve_error(response, 400, "BadRequestException")
        assert "min_worker is 3 now" in message
    [described] = api.describe("ctr")
    assert (described["minWorkers"], len(described["workers"])) == (3, 3)


def test_a_version_with_no_workers_is_not_ready(api):
    """Scaled to 0 it answers 503, but readiness probes were told it was ready: the Open
    Inference Protocol's answers are status codes (200 ready, else 4xx/5xx), and the
    server's readiness answered 200 {"ready": true} whatever its models' state."""
    def get(path):
        return httpx.get(api.running.inference + path, timeout=30)

    assert api.register("ctr-1.0", initial_workers=0).status_code == 200
    for path in ("/v1/models/ctr", "/v2/models/ctr/ready", "/v2/health/ready"):
        response = get(path)
        assert response.status_code == 503 and response.json()["ready"] is False, path
    assert api("PUT", "/models/ctr", min_worker=1, synchronous="true").status_code == 200
    for path in ("/v1/models/ctr", "/v2/models/ctr/ready", "/v2/health/ready"):
        response = get(path)
        assert response.status_code == 200 and response.json()["ready"] is True, path


def test_every_response_is_counted_by_api_and_status(api):
    """Requests that named no model (404), lacked the token (401) or used a wrong method
    (405) reached no counter: only requests that resolved to a model version were."""
    def responses() -> dict:
        text = httpx.get(api.running.metrics + "/metrics", timeout=30).text
        pattern = r'dynembed_serving_http_responses_total\{api="(\w+)",status="(\d+)"\} (\S+)'
        return {(a, s): float(v) for a, s, v in re.findall(pattern, text)}

    assert api.register("ctr-1.0").status_code == 200
    before = responses()
    assert httpx.post(api.running.inference + "/predictions/nope", json=[],
                      timeout=30).status_code == 404
    assert httpx.get(api.running.inference + "/predictions/ctr", timeout=30).status_code == 405
    assert api.predict("ctr", examples(2)).status_code == 200
    assert httpx.get(api.running.management + "/models", timeout=30).status_code == 401
    assert api("GET", "/models").status_code == 200
    after = responses()
    for key in (("inference", "404"), ("inference", "405"), ("inference", "200"),
                ("management", "401"), ("management", "200")):
        assert after.get(key, 0) == before.get(key, 0) + 1, key


def test_a_package_file_that_cannot_be_read_is_400_naming_it(api, store):
    """A package file the server cannot open (here a directory where a file belongs; the
    same OSError as a file the server's user may not read) was a plain-text 500."""
    for name, broken in (("unreadable-manifest", "MANIFEST.json"),
                         ("unreadable-tables", "tables/MANIFEST.json")):
        _copy(store / "ctr-1.0", store / name)
        (store / name / broken).unlink()
        (store / name / broken).mkdir()
        for synchronous in ("true", "false"):
            response = api.register(name, synchronous=synchronous)
            if broken == "MANIFEST.json" or synchronous == "true":
                message = torchserve_error(response, 400, "BadRequestException")
                assert str(store / name / broken) in message, message
    eventually(lambda: not api.running.server.registry._pending)
    assert api.models() == []
    assert api.register("ctr-1.0").status_code == 200  # the version was not left reserved


def test_an_unexpected_management_error_is_a_torchserve_json_500(api, monkeypatch):
    """Starlette answered an unexpected error with a plain-text 500, which a TorchServe
    client cannot read as ``{"code", "type", "message"}``."""
    assert api.register("ctr-1.0").status_code == 200

    def broken(entry):
        raise RuntimeError("boom")

    monkeypatch.setattr(api.running.server.registry, "describe", broken)
    torchserve_error(api("GET", "/models/ctr"), 500, "InternalServerException")


def test_a_request_that_follows_the_default_reports_the_version_that_answered(api):
    """A v2 request found 1.0 as the default; the default moved to 2.0 and 1.0 was
    unregistered before its body arrived: 2.0 answered, but the reply's model_version and
    the request metrics named 1.0."""
    assert api.register("ctr-1.0", response_timeout=60).status_code == 200
    assert api.register("ctr-2.0").status_code == 200
    example = examples(1)[0]
    body = json.dumps({"inputs": [
        {"name": "user", "shape": [1], "datatype": "BYTES", "data": [example["user"]]},
        {"name": "item", "shape": [1], "datatype": "BYTES", "data": [example["item"]]},
        {"name": "tags", "shape": [1], "datatype": "BYTES", "data": [example["tags"]]}]}
                      ).encode()
    reply = _post_while_the_default_moves(api, b"/v2/models/ctr/infer", body)
    answer = json.loads(reply.split("\r\n\r\n", 1)[1])
    assert answer["model_version"] == "2.0"
    assert answer["outputs"][0]["data"] == api.predict("ctr/2.0", [example]).json()
    text = httpx.get(api.running.metrics + "/metrics", timeout=30).text
    requests = dict(re.findall(r'dynembed_serving_requests_total\{model="ctr",status="200",'
                               r'version="([\d.]+)"\} (\S+)', text))
    assert requests == {"2.0": "2.0"}  # this request and the check's, none for 1.0


def test_a_version_without_workers_says_how_to_scale_that_version(api):
    """The 503 of a non-default version scaled to 0 told the client to PUT
    /models/ctr?min_worker=1, which scales the default version, not the one asked for."""
    assert api.register("ctr-1.0").status_code == 200
    assert api.register("ctr-2.0", initial_workers=0).status_code == 200
    message = torchserve_error(api.predict("ctr/2.0", examples(1)), 503,
                               "ServiceUnavailableException")
    assert "PUT /models/ctr/2.0?min_worker=1" in message, message
