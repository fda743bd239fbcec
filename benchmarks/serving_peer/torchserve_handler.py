"""TorchServe custom handler of the serving benchmark's CTR model (the peer).

Does per batch what dynembed's server does: takes each request's JSON object (TorchServe
has already decoded it when the request says ``Content-Type: application/json``; a raw
body is decoded here), maps each feature's string key to its row with a dict lookup
(unseen keys: the zero row; ``tags`` mean-pooled with ``embedding_bag``), concatenates the
rows, runs the MLP and answers one probability (a JSON number) per request.

The MLP runs as frozen TorchScript: on this model it is about twice as fast as eager
PyTorch at batch 1-64 (the peer gets its fastest option). The lookups are the same
:meth:`ctr_model.PeerTables.lookup` the reference uses, so the peer's answers are the
reference's.

TorchServe batching (``batch_size``, ``max_batch_delay``) works as usual: ``data`` holds
one entry per request of the batch and the handler answers them in order.

Handler settings come from the archive's ``model-config.yaml``, section ``handler``:
``torch_threads`` (intra-op threads per worker, default 1: the MLP is far too small to
gain from more, and workers would fight over the cores) and ``torchscript`` (default
true).

Inside the archive this file sits next to ``ctr_model.py`` (TorchServe puts the model
directory on ``sys.path``); in the repository it imports ``benchmarks.serving_peer``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from ts.torch_handler.base_handler import BaseHandler

try:  # inside the model archive: an extra file next to this one
    import ctr_model
except ImportError:  # in the repository
    from benchmarks.serving_peer import ctr_model

logger = logging.getLogger(__name__)


def _request_object(row: dict):
    """The JSON object of one request of the batch."""
    value = row.get("body")
    if value is None:
        value = row.get("data")
    if isinstance(value, (bytes, bytearray)):
        # Sent without Content-Type: application/json, so TorchServe did not decode it.
        value = json.loads(value)
    elif isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise TypeError(f"a request must be a JSON object of features, got "
                        f"{type(value).__name__}")
    return value


class CTRHandler(BaseHandler):
    """Dict lookups + frozen TorchScript MLP; one probability per request."""

    def __init__(self):
        super().__init__()
        self.tables: ctr_model.PeerTables | None = None
        self.dense = None

    def initialize(self, context):
        """Loads the tables and the MLP from the model directory (unpacked archive)."""
        model_dir = context.system_properties.get("model_dir")
        cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {}
        torch.set_num_threads(int(cfg.get("torch_threads", 1)))
        workload = ctr_model.Workload.from_json(
            (Path(model_dir) / ctr_model.WORKLOAD_FILE).read_text())
        self.tables = ctr_model.PeerTables.load(model_dir)
        self.dense = ctr_model.load_dense(model_dir, workload,
                                          script=bool(cfg.get("torchscript", True)))
        # One call per batch size the frontend may send: TorchScript's profiling executor
        # optimises on its first calls, which must not land in the timed requests.
        warm = [{"user": "u1", "item": "i1", "category": "c0", "tags": ["t1"], "hour": "0"}]
        with torch.inference_mode():
            for b in (1, 2, 3, 8, 64):
                self.dense(self.tables.lookup(warm * b))
        self.manifest = context.manifest
        self.initialized = True
        logger.info("CTR handler ready: %s keys, torch threads %d",
                    {f: len(i) for f, i in self.tables.index.items()},
                    torch.get_num_threads())

    def preprocess(self, data):
        """The batch's dense input: (B, total_dim)."""
        return self.tables.lookup([_request_object(row) for row in data])

    def inference(self, data, *args, **kwargs):
        with torch.inference_mode():
            return torch.sigmoid(self.dense(data))

    def postprocess(self, data):
        """One float per request, in the batch's order (TorchServe JSON-encodes each)."""
        return data.tolist()
