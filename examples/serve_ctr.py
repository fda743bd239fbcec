"""Serve the elastic CTR model over HTTP while it follows the training job's checkpoints.

    python -m examples.elastic_ctr --steps 600     # or: dynembed train ... -m examples.elastic_ctr
    python -m examples.serve_ctr

What a first deployment does, with the real parts:

1. ``dynembed export`` packages the *oldest* checkpoint of ``--checkpoint-dir`` (the tables
   as a checkpoint, the dense part as a ``torch.export`` program), as if the model had been
   deployed early in training;
2. a :class:`~dynembed.serving.ModelServer` (TorchServe-compatible APIs on uvicorn) serves
   it on loopback ports and follows the checkpoint directory: it moves to the newest
   checkpoint, tables and dense layers together, without a restart or a failed request;
3. the held-out ratings are scored over HTTP (``POST /predictions/ctr``) and by the model
   loaded in-process from that newest checkpoint: both AUCs, and the largest difference
   of a predicted probability (the server computes the dense part in float64).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

import dynembed as de
from dynembed.cli import main as dynembed_cli
from dynembed.serving import ModelServer, ServerConfig
from examples._cli import int_at_least, positive_float
from examples.datasets import DatasetUnavailableError, load_movielens_100k
from examples.elastic_ctr import serving_model
from examples.movielens import FEATURES, Batches, build_examples, roc_auc, split


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m examples.serve_ctr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint-dir", default="runs/elastic_ctr/checkpoints",
                   help="the training job's checkpoints (examples.elastic_ctr's)")
    p.add_argument("--model-store", default="runs/serve_ctr/model-store",
                   help="where the package is written (emptied first)")
    p.add_argument("--dim", type=int_at_least(1), default=16, help="as trained")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="as trained (the split)")
    p.add_argument("--max-rows", type=int_at_least(3), default=None, help="as trained")
    p.add_argument("--examples", type=int_at_least(1), default=5000,
                   help="held-out ratings to score over HTTP")
    p.add_argument("--request-size", type=int_at_least(1), default=64,
                   help="examples per HTTP request")
    p.add_argument("--timeout", type=positive_float, default=120.0,
                   help="seconds to wait for the server to start and to follow")
    p.add_argument("--cache-dir", default=None)
    return p.parse_args(argv)


def requests_of(batches: Batches, n: int) -> list[dict]:
    """The first ``n`` examples as request objects: feature -> key (or list of keys)."""
    examples = []
    for i in range(n):
        example = {}
        for name in FEATURES:
            value = batches.columns[name][i]
            example[name] = int(value) if isinstance(value, np.integer) else value
        examples.append(example)
    return examples


class RunningServer:
    """A ModelServer on free loopback ports, in a thread; :meth:`stop` shuts it down."""

    def __init__(self, config: ServerConfig, timeout: float) -> None:
        self.server = ModelServer(config)
        ports = {api: port for api, (_, port) in self.server.bind().items()}
        self.urls = {api: f"http://127.0.0.1:{port}" for api, port in ports.items()}
        self.key_file = Path(config.key_file)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.wait(lambda: self.get("inference", "/ping")["status"] == "Healthy", timeout,
                  "the server to start")

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            self.errors.append(e)

    def get(self, api: str, path: str):
        headers = {}
        if api == "management":
            key = json.loads(self.key_file.read_text())["management"]["key"]
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.urls[api] + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def predict(self, model: str, examples: list[dict]) -> list[float]:
        request = urllib.request.Request(
            f"{self.urls['inference']}/predictions/{model}", data=json.dumps(examples).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.errors or not self.thread.is_alive():
                raise RuntimeError(f"the server stopped: {self.errors}")
            try:
                if condition():
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(0.1)
        raise TimeoutError(f"waited {timeout} s for {what}")

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(60)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    checkpoints = de.checkpoint.CheckpointManager(args.checkpoint_dir).checkpoints()
    if not checkpoints:
        raise SystemExit(f"error: no checkpoint in {args.checkpoint_dir}; train first: "
                         "python -m examples.elastic_ctr")
    oldest, newest = checkpoints[0], de.checkpoint.CheckpointManager(
        args.checkpoint_dir).latest()
    store = Path(args.model_store)
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    package = f"ctr-{oldest.name}"
    code = dynembed_cli(["export", "--factory", "examples.elastic_ctr:serving_model",
                         "--checkpoint", str(oldest), "--name", "ctr", "--version", "1.0",
                         "--out", str(store / package)])
    if code != 0:
        raise SystemExit(code)

    ratings, users, items = load_movielens_100k(args.cache_dir)
    if args.max_rows is not None and args.max_rows < len(ratings):
        ratings = ratings.sample(n=args.max_rows, random_state=args.seed)
    _, test_df = split(build_examples(ratings, users, items), "random", 0.2, args.seed)
    test = Batches(test_df.iloc[:args.examples])
    examples = requests_of(test, test.n)

    server = RunningServer(ServerConfig(
        model_store=str(store), models={"ctr": package}, inference_address="127.0.0.1:0",
        management_address="127.0.0.1:0", metrics_address="127.0.0.1:0",
        key_file=str(store.parent / "key_file.json"), batch_size=64, max_batch_delay_ms=5,
        follow={"ctr": args.checkpoint_dir}, follow_interval_s=0.5), args.timeout)
    try:
        described = lambda: server.get("management", "/models/ctr")[0]
        if newest != oldest:
            server.wait(lambda: Path(described()["tablesCheckpoint"] or "").name == newest.name,
                        args.timeout, f"the server to follow {newest}")
        started = time.perf_counter()
        served = []
        for start in range(0, len(examples), args.request_size):
            served += server.predict("ctr", examples[start:start + args.request_size])
        seconds = time.perf_counter() - started
        serving_from = described()["tablesCheckpoint"] or oldest
    finally:
        server.stop()

    model = serving_model(args.dim)
    de.checkpoint.load(newest, model, dropped=("admission",))
    model.eval()
    with torch.no_grad():
        features, labels = test.batch(np.arange(test.n))
        local = torch.sigmoid(model(features)).numpy()
    served, labels = np.asarray(served), labels.numpy()
    result = {"exported": oldest.name, "served": Path(serving_from).name,
              "auc_served": roc_auc(labels, served), "auc_in_process": roc_auc(labels, local),
              "max_abs_diff": float(np.abs(served - local).max()), "examples": test.n,
              "examples_per_s": test.n / seconds}
    print(f"exported {oldest.name}; the server followed to {result['served']} and answered "
          f"{test.n:,} held-out ratings over HTTP ({result['examples_per_s']:,.0f} examples/s, "
          f"{args.request_size} per request)")
    print(f"test AUC served {result['auc_served']:.4f}, in-process "
          f"{result['auc_in_process']:.4f}; largest difference of a probability "
          f"{result['max_abs_diff']:.1e}")
    return result


if __name__ == "__main__":
    try:
        main()
    except DatasetUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
