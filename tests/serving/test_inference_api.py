"""The inference API over HTTP: TorchServe's, KServe v1's and the Open Inference Protocol's
paths, their answers, and every error code (TorchServe's error shape, v2's {"error"})."""

from __future__ import annotations

import asyncio
import json
import re
import socket

import httpx
import pytest
import torch
from torch import nn

import dynembed as de
from dynembed.serving import export_package
from tests.serving.helpers import (
    eventually,
    examples,
    expected,
    start_server,
    torchserve_error,
    write_package,
)


def _ids_model():
    """A collection whose ``user`` feature takes int64 keys (``item`` strings, ``tags`` a
    pooled list of strings), trained a few steps, and its dense part."""
    torch.manual_seed(7)
    coll = de.EmbeddingCollection(
        tables={"user": de.TableConfig(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=1),
                "item": de.TableConfig(dim=3, optimizer=de.optim.Adagrad(lr=0.1), seed=2),
                "tags": de.TableConfig(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=3)},
        features={"user": "user", "item": "item",
                  "tags": de.FeatureConfig(table="tags", pooling="sum")})
    dense = nn.Sequential(nn.Linear(9, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))
    opt = torch.optim.SGD(dense.parameters(), lr=0.1)
    for step in range(3):
        batch = _ids_examples(16, step)
        cols = {"user": torch.tensor([e["user"] for e in batch]),
                "item": [e["item"] for e in batch], "tags": [e["tags"] for e in batch]}
        dense(coll(cols, concat=True)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return coll, dense


def _ids_examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: int(torch.randint(0, k, (1,), generator=g))
    return [{"user": pick(40) * 1_000_003 - 7, "item": f"i{pick(20)}",
             "tags": [f"t{pick(10)}" for _ in range(pick(4))]} for _ in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    store = tmp_path_factory.mktemp("inference") / "store"
    store.mkdir()
    ctr = write_package(store)
    coll, dense = _ids_model()
    export_package(store / "ids-1.0", embeddings=coll, dense=dense, name="ids",
                   version="1.0", feature_types={"user": "int64"})
    return store, ctr


@pytest.fixture(scope="module")
def server(models):
    store, _ = models
    running = start_server(store, models={"ctr": "ctr-1.0", "ids": "ids-1.0"},
                           batch_size=8, max_batch_delay_ms=2)
    yield running
    running.stop()


def _post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.inference + path, timeout=30, **kwargs)


def _get(server, path: str) -> httpx.Response:
    return httpx.get(server.inference + path, timeout=30)


def _v2_error(response: httpx.Response, code: int) -> str:
    assert response.status_code == code, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


# ---------------------------------------------------------------------- TorchServe
def test_ping(server):
    response = _get(server, "/ping")
    assert response.status_code == 200 and response.json() == {"status": "Healthy"}


def test_predictions_take_one_example_or_a_list(models, server):
    _, (coll, dense) = models
    batch = examples(6, seed=21) + examples(2, seed=22, unseen=True)
    listed = _post(server, "/predictions/ctr", json=batch)
    assert listed.status_code == 200
    assert listed.json() == pytest.approx(expected(coll, dense, batch), rel=1e-6, abs=1e-7)
    one = _post(server, "/predictions/ctr", json=batch[3])
    assert one.status_code == 200 and isinstance(one.json(), float)
    assert one.json() == listed.json()[3]
    versioned = _post(server, "/predictions/ctr/1.0", json=batch)
    assert versioned.status_code == 200 and versioned.json() == listed.json()
    assert _post(server, "/predictions/ctr", json=[batch[0]]).json() == [listed.json()[0]]


def test_predictions_refuse_bad_inputs_naming_the_feature(server):
    good = examples(1, seed=3)[0]
    cases = [({"user": good["user"], "item": good["item"]}, "tags"),            # missing
             ({**good, "age": "3"}, "age"),                                       # unknown
             ({**good, "user": 17}, "user"),                                      # key type
             ({**good, "tags": "t1"}, "tags"),                                    # not a list
             ({**good, "tags": ["t1", 2]}, "tags"),                               # key in list
             ([good, {**good, "item": None}], "item")]                            # 2nd example
    for body, feature in cases:
        message = torchserve_error(_post(server, "/predictions/ctr", json=body), 400,
                                    "BadRequestException")
        assert repr(feature) in message or feature in message, (body, message)
    for body in ([], "text", 3, [1, 2]):
        torchserve_error(_post(server, "/predictions/ctr", json=body), 400)
    # an int id for a feature the package declares as strings says how to export it
    message = torchserve_error(_post(server, "/predictions/ctr", json={**good, "user": 17}),
                               400)
    assert "feature_types={feature: 'int64'}" in message


def test_a_key_past_64_bits_is_named_as_sent(server):
    """orjson reads an integer outside [-2**63, 2**64) as a float: a key of 2**70 was
    refused as 'got 1.1805916207174113e+21', which the client never sent (and 2**70 + 1
    read the same). The error shows the integer exactly, on every prediction path."""
    good = _ids_examples(1, seed=61)[0]
    for key in (2**70 + 1, -(2**63) - 1, 2**64, 2**63):
        for path, body in (("/predictions/ids", {**good, "user": key}),
                           ("/predictions/ids", [good, {**good, "user": key}]),
                           ("/v1/models/ids:predict", {"instances": [{**good, "user": key}]})):
            message = torchserve_error(_post(server, path, json=body), 400,
                                       "BadRequestException")
            assert f"feature 'user' must be an int64 key, got {key}, outside" in message, \
                (path, message)
        bad = _replace(_v2_body([good]), "user", data=[key])
        message = _v2_error(_post(server, "/v2/models/ids/infer", json=bad), 400)
        assert f"feature 'user' must be an int64 key, got {key}, outside" in message
    # a string feature given such a number, and a float sent as one, shown as sent
    message = torchserve_error(_post(server, "/predictions/ids",
                                     json={**good, "item": 2**70 + 1}), 400)
    assert f"feature 'item' must be a string key, got {2**70 + 1};" in message
    message = torchserve_error(_post(server, "/predictions/ids",
                                     content=b'{"user": 1e21, "item": "i1", "tags": []}',
                                     headers={"content-type": "application/json"}), 400)
    assert "feature 'user' must be an int64 key, got 1e+21" in message


# ---------------------------------------------------------------------- KServe v1
def test_kserve_v1_predict_and_model_status(server):
    batch = examples(5, seed=31)
    reference = _post(server, "/predictions/ctr", json=batch).json()
    response = _post(server, "/v1/models/ctr:predict", json={"instances": batch})
    assert response.status_code == 200 and response.json() == {"predictions": reference}
    status = _get(server, "/v1/models/ctr")
    assert status.status_code == 200 and status.json() == {"name": "ctr", "ready": True}
    for body in ({"inputs": batch}, batch, {"instances": "x"}):
        torchserve_error(_post(server, "/v1/models/ctr:predict", json=body), 400)
    message = torchserve_error(_post(server, "/v1/models/ctr:predict",
                                      json={"instances": [{"user": "u1"}]}), 400)
    assert "item" in message and "tags" in message
    # no instances, no predictions (was a 400 in the TorchServe path's words)
    empty = _post(server, "/v1/models/ctr:predict", json={"instances": []})
    assert empty.status_code == 200 and empty.json() == {"predictions": []}


# ---------------------------------------------------------------------- v2
def test_v2_server_metadata_and_health(server):
    meta = _get(server, "/v2")
    assert meta.status_code == 200
    assert meta.json() == {"name": "dynembed", "version": de.__version__, "extensions": []}
    assert _get(server, "/v2/health/live").json() == {"live": True}
    assert _get(server, "/v2/health/ready").json() == {"ready": True}
    assert _get(server, "/v2/health/live").status_code == 200
    assert _get(server, "/v2/health/ready").status_code == 200


def test_v2_model_metadata_and_readiness(server):
    want = {"name": "ids", "versions": ["1.0"], "platform": "dynembed",
            "inputs": [{"name": "user", "datatype": "INT64", "shape": [-1]},
                       {"name": "item", "datatype": "BYTES", "shape": [-1]},
                       {"name": "tags", "datatype": "BYTES", "shape": [-1, -1]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1]}]}
    for path in ("/v2/models/ids", "/v2/models/ids/versions/1.0"):
        response = _get(server, path)
        assert response.status_code == 200 and response.json() == want
    ctr = _get(server, "/v2/models/ctr").json()
    assert [i["datatype"] for i in ctr["inputs"]] == ["BYTES", "BYTES", "BYTES"]
    for path in ("/v2/models/ids/ready", "/v2/models/ids/versions/1.0/ready"):
        response = _get(server, path)
        assert response.status_code == 200 and response.json() == {"name": "ids",
                                                                   "ready": True}


def _v2_body(batch: list[dict], request_id: str | None = "42") -> dict:
    body = {"inputs": [
        {"name": "user", "shape": [len(batch)], "datatype": "INT64",
         "data": [e["user"] for e in batch]},
        {"name": "item", "shape": [len(batch)], "datatype": "BYTES",
         "data": [e["item"] for e in batch]},
        {"name": "tags", "shape": [len(batch)], "datatype": "BYTES",
         "data": [e["tags"] for e in batch]}]}
    if request_id is not None:
        body["id"] = request_id
    return body


def test_v2_infer_int64_bytes_and_a_pooled_feature(server):
    batch = _ids_examples(5, seed=41)
    batch[1]["tags"] = []  # a pooled feature with no keys
    reference = _post(server, "/predictions/ids", json=batch).json()
    assert len(reference) == 5 and len(set(reference)) > 1
    for path in ("/v2/models/ids/infer", "/v2/models/ids/versions/1.0/infer"):
        response = _post(server, path, json=_v2_body(batch))
        assert response.status_code == 200, response.text
        assert response.json() == {
            "model_name": "ids", "model_version": "1.0", "id": "42",
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [5],
                         "data": reference}]}
    no_id = _post(server, "/v2/models/ids/infer", json=_v2_body(batch, None)).json()
    assert no_id["outputs"][0]["data"] == reference and no_id["id"]
    asked = _post(server, "/v2/models/ids/infer",
                  json={**_v2_body(batch), "outputs": [{"name": "output"}]})
    assert asked.json()["outputs"][0]["data"] == reference
    # an output the model does not have was ignored, answered with one not asked for
    for outputs in ([{"name": "probability"}], "output", [{"name": "output"}, "x"]):
        response = _post(server, "/v2/models/ids/infer",
                         json={**_v2_body(batch), "outputs": outputs})
        assert response.status_code == 400 and "output" in response.json()["error"], outputs
    # the same tensors flattened (row-major) or one row per example, [batch, 1]
    fixed = [{**e, "tags": ["t1", f"t{k}"]} for k, e in enumerate(batch)]
    nested = _v2_body(fixed)
    flat = _v2_body(fixed)
    flat["inputs"][0] = {"name": "user", "shape": [5, 1], "datatype": "INT64",
                         "data": [[e["user"]] for e in fixed]}
    flat["inputs"][2] = {"name": "tags", "shape": [5, 2], "datatype": "BYTES",
                         "data": [key for e in fixed for key in e["tags"]]}
    answers = [_post(server, "/v2/models/ids/infer", json=body).json()["outputs"][0]["data"]
               for body in (nested, flat)]
    assert answers[0] == answers[1] == _post(server, "/predictions/ids", json=fixed).json()


def _without(body: dict, name: str) -> dict:
    return {**body, "inputs": [t for t in body["inputs"] if t["name"] != name]}


def _replace(body: dict, name: str, **fields) -> dict:
    return {**body, "inputs": [{**t, **fields} if t["name"] == name else t
                               for t in body["inputs"]]}


def test_v2_infer_refuses_bad_tensors_naming_the_input(server):
    good = _v2_body(_ids_examples(3, seed=51))
    cases = {
        "missing": (_without(good, "tags"), "tags"),
        "unknown": ({**good, "inputs": good["inputs"] + [
            {"name": "age", "shape": [3], "datatype": "INT64", "data": [1, 2, 3]}]}, "age"),
        "key type": (_replace(good, "user", data=["a", "b", "c"]), "user"),
        "float key": (_replace(good, "user", data=[1.5, 2, 3]), "user"),
        "datatype": (_replace(good, "user", datatype="BYTES"), "user"),
        "bytes datatype": (_replace(good, "item", datatype="FP32"), "item"),
        "shape vs data": (_replace(good, "item", shape=[4]), "item"),
        "batch sizes": (_replace(good, "item", shape=[2], data=["i1", "i2"]), "item"),
        "unpooled 2-d": (_replace(good, "item", shape=[3, 2],
                                  data=["i1", "i2", "i3", "i4", "i5", "i6"]), "item"),
        "pooled flat": (_replace(good, "tags", data=["t1", "t2", "t3"]), "tags"),
        "pooled rows": (_replace(good, "tags", shape=[3, 2],
                                 data=[["t1", "t2"], ["t1"], ["t1", "t2"]]), "tags"),
        "3-d": (_replace(good, "item", shape=[3, 1, 1]), "item"),
        "negative": (_replace(good, "item", shape=[-1]), "item"),
        "twice": ({**good, "inputs": good["inputs"] + good["inputs"][:1]}, "user"),
        "list datatype": (_replace(good, "user", datatype=[]), "user"),  # once a 500
        # any batch fits [batch, 0] with no data: [2**40, 0] built that many bags, blocking
        # the event loop from a 78-byte body
        "empty flat bags": ({"inputs": [{"name": "tags", "shape": [2**40, 0],
                                         "datatype": "BYTES", "data": []}]}, "tags"),
    }
    for case, (body, name) in cases.items():
        message = _v2_error(_post(server, "/v2/models/ids/infer", json=body), 400)
        assert re.search(rf"\b{name}\b", message), (case, message)
    for body in ({}, {"inputs": []}, {"inputs": "x"}, [], {"inputs": [{"name": "user"}]}):
        _v2_error(_post(server, "/v2/models/ids/infer", json=body), 400)
    # bags of different lengths: the error says how to send them, and that way works
    for bad in (_replace(good, "tags", shape=[3, -1]),
                _replace(good, "tags", shape=[3, 2], data=[["t1", "t2"], ["t1"], []])):
        message = _v2_error(_post(server, "/v2/models/ids/infer", json=bad), 400)
        assert "give shape [batch] and one list of keys per example" in message
    ragged = _replace(good, "tags", shape=[3], data=[["t1", "t2"], ["t1"], []])
    assert _post(server, "/v2/models/ids/infer", json=ragged).status_code == 200
    no_tags = _replace(good, "tags", shape=[3, 0], data=[])  # three empty bags: fine
    assert _post(server, "/v2/models/ids/infer", json=no_tags).status_code == 200


def _requests_by_status(server, model: str) -> dict[str, float]:
    text = httpx.get(server.metrics + "/metrics", timeout=30).text
    pattern = rf'dynembed_serving_requests_total{{model="{model}",status="(\d+)",[^}}]*}} (\S+)'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text)}


def test_a_client_gone_before_its_body_ends_is_a_400_not_a_500(server):
    """The v2 path logged a traceback and counted a 500 (the fast path said 400)."""
    before = _requests_by_status(server, "ids")
    for k, path in enumerate(("/v2/models/ids/infer", "/predictions/ids")):
        port = int(server.inference.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                      .encode() + b'{"inputs": [')
        want = before.get("400", 0) + k + 1
        eventually(lambda want=want: _requests_by_status(server, "ids").get("400", 0) == want)
    after = _requests_by_status(server, "ids")
    assert after.get("500", 0) == before.get("500", 0)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("method, path, v2", [
    ("POST", "/predictions/nope", False), ("POST", "/predictions/nope/1.0", False),
    ("POST", "/v1/models/nope:predict", False), ("GET", "/v1/models/nope", False),
    ("GET", "/v2/models/nope", True), ("GET", "/v2/models/nope/versions/1.0", True),
    ("GET", "/v2/models/nope/ready", True), ("GET", "/v2/models/nope/versions/1.0/ready", True),
    ("POST", "/v2/models/nope/infer", True), ("POST", "/v2/models/nope/versions/1.0/infer", True),
])
def test_an_unknown_model_is_404(server, method, path, v2):
    body = {"instances": examples(1)} if "v1" in path else \
        _v2_body(_ids_examples(1)) if v2 else examples(1)
    response = httpx.request(method, server.inference + path, json=body, timeout=30)
    if v2:
        assert "nope" in _v2_error(response, 404)
    else:
        assert "nope" in torchserve_error(response, 404, "ModelNotFoundException")


@pytest.mark.parametrize("method, path, v2", [
    ("POST", "/predictions/ids/9.9", False), ("GET", "/v2/models/ids/versions/9.9", True),
    ("GET", "/v2/models/ids/versions/9.9/ready", True),
    ("POST", "/v2/models/ids/versions/9.9/infer", True),
])
def test_an_unknown_version_is_404(server, method, path, v2):
    body = _v2_body(_ids_examples(1)) if v2 else _ids_examples(1)
    response = httpx.request(method, server.inference + path, json=body, timeout=30)
    message = _v2_error(response, 404) if v2 else \
        torchserve_error(response, 404, "ModelVersionNotFoundException")
    assert "9.9" in message and "ids" in message


@pytest.mark.parametrize("path, v2", [("/predictions/ids", False),
                                      ("/v1/models/ids:predict", False),
                                      ("/v2/models/ids/infer", True)])
def test_a_form_upload_is_415_and_says_to_send_json(server, path, v2):
    """curl -F data=@file (TorchServe takes it) got "not valid JSON: no digit after sign"."""
    for upload in ({"files": {"data": ("x.json", b"[]")}}, {"data": {"data": "[]"}}):
        response = httpx.post(server.inference + path, timeout=30, **upload)
        message = _v2_error(response, 415) if v2 else \
            torchserve_error(response, 415, "UnsupportedMediaTypeException")
        assert "send the examples as a JSON body" in message
    assert _post(server, path, json=_v2_body(_ids_examples(2)) if v2 else
                 ({"instances": _ids_examples(2)} if "v1" in path
                  else _ids_examples(2))).status_code == 200


@pytest.mark.parametrize("path, v2", [("/predictions/ids", False),
                                      ("/v1/models/ids:predict", False),
                                      ("/v2/models/ids/infer", True)])
def test_json_sent_as_curl_d_sends_it_is_read_as_json(server, path, v2):
    """curl -d labels a JSON body application/x-www-form-urlencoded (TorchServe reads it):
    the README's own curl example got a 415."""
    examples = _ids_examples(3)
    body = _v2_body(examples) if v2 else (
        {"instances": examples} if "v1" in path else examples)
    plain = _post(server, path, json=body)
    labelled = _post(server, path, content=json.dumps(body).encode(),
                     headers={"content-type": "application/x-www-form-urlencoded"})
    assert plain.status_code == labelled.status_code == 200, labelled.text
    assert labelled.json() == plain.json()
    # broken JSON sent so got a 415 "URL-encoded bodies are not supported": say what broke
    broken = _post(server, path, content=json.dumps(body).encode()[:-1],
                   headers={"content-type": "application/x-www-form-urlencoded"})
    message = _v2_error(broken, 400) if v2 else \
        torchserve_error(broken, 400, "BadRequestException")
    assert "not valid JSON" in message


@pytest.mark.parametrize("path, v2", [("/predictions/ctr", False),
                                      ("/predictions/ctr/1.0", False),
                                      ("/v1/models/ctr:predict", False),
                                      ("/v2/models/ctr/infer", True)])
def test_malformed_json_is_400(server, path, v2):
    for content in (b'{"user": "u1", ', b"\xff\xfe not utf-8", b"",
                    b"[" * 2000 + b"]" * 2000):  # too deep (json.loads once raised: 500)
        response = _post(server, path, content=content,
                         headers={"content-type": "application/json"})
        message = _v2_error(response, 400) if v2 else \
            torchserve_error(response, 400, "BadRequestException")
        assert "JSON" in message


def test_a_body_that_does_not_arrive_in_time_is_408(models, tmp_path):
    """Headers, then too little of the body: the request waited for the rest for good,
    holding its connection and task."""
    store, _ = models
    running = start_server(store, models={"ctr": "ctr-1.0"}, response_timeout_s=1,
                           key_file=str(tmp_path / "key_file.json"))
    try:
        port = int(running.inference.rsplit(":", 1)[1])
        for path in ("/predictions/ctr", "/v2/models/ctr/infer"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                          "\r\n[".encode())
                head = s.recv(4096).decode()  # waits at most the socket's 10 s
            assert head.startswith("HTTP/1.1 408"), (path, head)
            assert "did not arrive within 1 s" in head
        assert httpx.post(running.inference + "/predictions/ctr", json=examples(2),
                          timeout=30).status_code == 200
    finally:
        running.stop()


def test_a_body_over_max_request_bytes_is_413(models, tmp_path):
    store, _ = models
    small = start_server(store, models={"ctr": "ctr-1.0"}, max_request_bytes=2000,
                         key_file=str(tmp_path / "key_file.json"))
    try:
        ok = examples(3, seed=61)
        assert httpx.post(small.inference + "/predictions/ctr", json=ok).status_code == 200
        big = examples(200, seed=62)

        def chunks():  # no content-length: the server counts while reading
            payload = httpx.Request("POST", "http://x", json=big).read()
            for start in range(0, len(payload), 512):
                yield payload[start:start + 512]

        for path in ("/predictions/ctr", "/v1/models/ctr:predict"):
            body = big if path.startswith("/pred") else {"instances": big}
            response = httpx.post(small.inference + path, json=body, timeout=30)
            assert "2000" in torchserve_error(response, 413, "RequestEntityTooLargeException")
        streamed = httpx.post(small.inference + "/predictions/ctr", content=chunks(),
                              headers={"content-type": "application/json"}, timeout=30)
        torchserve_error(streamed, 413, "RequestEntityTooLargeException")
        v2 = httpx.post(small.inference + "/v2/models/ctr/infer", timeout=30,
                        json={"inputs": [{"name": "item", "shape": [3000],
                                          "datatype": "BYTES", "data": ["i1"] * 3000}]})
        _v2_error(v2, 413)
        # the server still answers after refusing
        assert httpx.post(small.inference + "/predictions/ctr", json=ok).status_code == 200
    finally:
        small.stop()



def test_requests_past_job_queue_size_are_503_at_once(models, tmp_path):
    """The queue was unbounded: under overload every request waited behind the backlog
    until it timed out, and describe said remainingCapacity 0 with nothing queued."""
    import threading
    store, _ = models
    small = start_server(store, models={"ctr": "ctr-1.0"}, job_queue_size=1,
                         max_batch_delay_ms=0, key_file=str(tmp_path / "key_file.json"))
    headers = small.token()
    describe = lambda: httpx.get(small.management + "/models/ctr", headers=headers,
                                 timeout=30).json()[0]["jobQueueStatus"]
    try:
        assert describe() == {"remainingCapacity": 1, "pendingRequests": 0}
        batcher = small.server.registry.get("ctr", None).batcher
        release, inside, served = threading.Event(), threading.Event(), batcher.predict

        def held(batch):  # holds the one worker, so the next request stays queued
            inside.set()
            release.wait(30)
            return served(batch)

        batcher.predict = held
        answers = {}

        def send(name):
            answers[name] = _post(small, "/predictions/ctr", json=examples(1, seed=5))

        first = threading.Thread(target=send, args=("running",))
        first.start()
        assert inside.wait(30)
        second = threading.Thread(target=send, args=("queued",))
        second.start()
        for _ in range(300):
            if batcher.pending == 1:
                break
            threading.Event().wait(0.01)
        assert describe() == {"remainingCapacity": 0, "pendingRequests": 1}
        refused = _post(small, "/predictions/ctr", json=examples(1, seed=6))
        message = torchserve_error(refused, 503, "ServiceUnavailableException")
        assert "job_queue_size" in message and "overloaded" in message
        release.set()
        first.join(30)
        second.join(30)
        assert answers["running"].status_code == answers["queued"].status_code == 200
        batcher.predict = served
        assert _post(small, "/predictions/ctr", json=examples(1, seed=6)).status_code == 200
    finally:
        release.set()
        small.stop()

def test_unknown_paths_are_404_and_wrong_methods_405(server):
    for path in ("/nope", "/predictions", "/v2/models", "/v2/models/ctr/explain"):
        message = torchserve_error(_get(server, path), 404, "ResourceNotFoundException")
        assert path in message
    management = httpx.get(server.management + "/nope", headers=server.token())
    torchserve_error(management, 404, "ResourceNotFoundException")
    for method, path in (("GET", "/predictions/ctr"), ("DELETE", "/predictions/ctr/1.0"),
                         ("POST", "/ping"), ("GET", "/v2/models/ctr/infer"),
                         ("POST", "/v2/health/live"), ("PUT", "/v1/models/ctr")):
        response = httpx.request(method, server.inference + path, timeout=30)
        assert method in torchserve_error(response, 405, "MethodNotAllowedException")


def test_a_trailing_slash_names_the_same_path_as_in_torchserve(server):
    batch = examples(3, seed=23)
    plain = _post(server, "/predictions/ctr", json=batch)
    for path in ("/predictions/ctr/", "/predictions/ctr/1.0/", "/predictions/ctr//"):
        slashed = _post(server, path, json=batch)
        assert slashed.status_code == 200, (path, slashed.text)
        assert slashed.json() == plain.json()
    assert _get(server, "/ping/").json() == {"status": "Healthy"}
    assert _get(server, "/v2/models/ctr/ready/").status_code == 200
    models = httpx.get(server.management + "/models/", headers=server.token(), timeout=30)
    assert models.status_code == 200, models.text
    assert {m["modelName"] for m in models.json()["models"]} == {"ctr", "ids"}
    torchserve_error(_get(server, "/nope/"), 404, "ResourceNotFoundException")


# ---------------------------------------------------------------------- batching
def _batch_count(server) -> float:
    text = httpx.get(server.metrics + "/metrics").text
    match = re.search(r'^dynembed_serving_batch_size_count\{model="ctr",version="1.0"\} (\S+)',
                      text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_batched_answers_are_identical_to_unbatched(models, tmp_path):
    store, _ = models
    requests = [[e] for e in examples(48, seed=71)] + \
        [examples(3, seed=72 + k, unseen=k % 2 == 1) for k in range(8)]

    async def ask(url: str) -> list:
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(*(client.post(url + "/predictions/ctr", json=r)
                                               for r in requests))
        assert all(r.status_code == 200 for r in responses)
        return [r.json() for r in responses]

    unbatched = start_server(store, models={"ctr": "ctr-1.0"}, batch_size=1,
                             max_batch_delay_ms=0, key_file=str(tmp_path / "a.json"))
    try:
        alone = asyncio.run(ask(unbatched.inference))
        # one request per batch: every request ran alone
        assert _batch_count(unbatched) == len(requests)
    finally:
        unbatched.stop()
    batched = start_server(store, models={"ctr": "ctr-1.0"}, batch_size=16,
                           max_batch_delay_ms=100, key_file=str(tmp_path / "b.json"))
    try:
        together = asyncio.run(ask(batched.inference))
        assert _batch_count(batched) < len(requests) / 2  # requests did share batches
    finally:
        batched.stop()
    assert together == alone  # exactly, bit for bit
