"""Train on real data, export, serve with the CLI, and compare served with in-process answers.

MovieLens 100k (downloaded once, cached; skips with the reason if it cannot be had).
"""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from dynembed.checkpoint.api import load
from dynembed.checkpoint.manager import CheckpointManager
from examples.datasets import DatasetUnavailableError, load_movielens_100k
from tests.serving.helpers import start_cli_server


@pytest.fixture(scope="module")
def movielens():
    try:
        return load_movielens_100k()
    except DatasetUnavailableError as exc:
        pytest.skip(f"MovieLens 100k is not cached and could not be downloaded: {exc}")


def _requests(movielens, n: int) -> tuple[list[dict], dict]:
    from examples.movielens import FEATURES, Batches, build_examples, split

    ratings, users, items = movielens
    _, test_df = split(build_examples(ratings, users, items), "random", 0.2, 0)
    test_df = test_df.iloc[:n]
    batch = Batches(test_df)
    features, _ = batch.batch(np.arange(n))
    examples = []
    for i in range(n):
        example = {}
        for name in FEATURES:
            value = features[name][i]
            example[name] = int(value) if isinstance(value, torch.Tensor) else value
        examples.append(example)
    return examples, features


def test_train_export_serve_and_the_answers_match(movielens, tmp_path):
    from examples import elastic_ctr

    ckpt = tmp_path / "ckpt"
    elastic_ctr.main(["--steps", "120", "--max-rows", "20000", "--checkpoint-every", "60",
                      "--checkpoint-dir", str(ckpt), "--store-dir", str(tmp_path / "tables"),
                      "--rows-in-memory", "500"])
    store = tmp_path / "store"
    store.mkdir()
    export = subprocess.run([sys.executable, "-m", "dynembed", "export", "--factory",
                             "examples.elastic_ctr:serving_model", "--checkpoint", str(ckpt),
                             "--name", "ctr", "--out", str(store / "ctr-1.0")],
                            capture_output=True, text=True, timeout=300, check=False)
    assert export.returncode == 0, export.stderr[-3000:]

    # the in-process model at the same checkpoint
    model = elastic_ctr.serving_model()
    load(CheckpointManager(ckpt).latest(), model, strict=False)
    model.eval()
    examples, features = _requests(movielens, 300)
    with torch.no_grad():
        want = torch.sigmoid(model(features)).numpy()

    proc, urls = start_cli_server(["--model-store", str(store), "--models", "ctr=ctr-1.0",
                                   "--inference-address", "127.0.0.1:0",
                                   "--management-address", "127.0.0.1:0",
                                   "--metrics-address", "127.0.0.1:0",
                                   "--key-file", str(tmp_path / "key_file.json"),
                                   "--batch-size", "32", "--max-batch-delay", "5"],
                                  ready="/v2/models/ctr/ready")
    try:
        got = []
        for start in range(0, len(examples), 50):
            response = httpx.post(urls["inference"] + "/predictions/ctr",
                                  json=examples[start:start + 50], timeout=60)
            assert response.status_code == 200, response.text
            got += response.json()
        one = httpx.post(urls["inference"] + "/v1/models/ctr:predict",
                         json={"instances": examples[:1]}).json()["predictions"]
        metrics = httpx.get(urls["metrics"] + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert one == pytest.approx(got[:1], rel=1e-6)
    assert 'dynembed_serving_requests_total{model="ctr",status="200",version="1.0"}' in metrics
    assert code == 0
    assert not (tmp_path / "key_file.json").exists()  # removed at shutdown
