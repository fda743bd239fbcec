"""A small training job for the multi-process tests: run alone or under torchrun.

    python tests/distributed/train_worker.py --out DIR --steps 12
    torchrun --nproc-per-node=2 ... tests/distributed/train_worker.py --out DIR --steps 12

Synthetic click data (Zipf user ids, string item tags, a country from a small replicated
table) and a model of dynamic tables plus an MLP, trained with de.train.Runtime. It writes
into --out: ``restored-w<W>-r<R>-a<attempt>.pt`` (the rank's rows right after restore),
``final-w<W>-r<R>.pt`` (rows, dense state, step at the end), and rank 0 appends the global
loss of every step to ``loss.jsonl``. ``--device cuda`` moves the model to the GPU. ``--kill-rank/--kill-step`` SIGKILLs one rank once
(a marker file keeps the restarted attempt alive).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import dynembed as de

COUNTRIES = np.array(["de", "fr", "us", "jp", "br", "in", "ng", "mx"], dtype=object)
TAGS = np.array([f"tag{i}" for i in range(300)], dtype=object)


def make_data(n: int, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    users = (rng.zipf(1.3, n) % 20_000).astype(np.int64) - 5_000  # negatives too
    tags = TAGS[rng.zipf(1.2, (n, 3)) % len(TAGS)]
    country = COUNTRIES[rng.integers(0, len(COUNTRIES), n)]
    score = (users % 7 == 0) * 1.0 + np.isin(tags[:, 0], TAGS[:40]) + (country == "jp")
    labels = (score + rng.normal(0, 0.3, n) > 0.8).astype(np.float32)
    return {"users": users, "tags": tags, "country": country, "labels": labels}


class Model(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        opt = de.optim.Adagrad(lr=0.3)
        self.embeddings = de.EmbeddingCollection(
            tables={"ids": de.TableConfig(dim=dim, optimizer=opt, seed=11, key_log=True),
                    "country": de.TableConfig(dim=4, optimizer=opt, seed=12,
                                              placement="replicated")},
            features={"user": "ids",
                      "tags": de.FeatureConfig(table="ids", pooling="mean"),
                      "country": "country"})
        # a module of its own (the one-table path of the router), with momentum
        self.tag_bag = de.DynamicEmbeddingBag(dim=3, mode="sum", seed=13,
                                              optimizer=de.optim.SGD(lr=0.05, momentum=0.9))
        self.mlp = nn.Sequential(nn.Linear(2 * dim + 4 + 3, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, batch: dict) -> torch.Tensor:
        tags = [list(t) for t in batch["tags"]]
        x = self.embeddings({"user": torch.from_numpy(batch["users"]), "tags": tags,
                             "country": list(batch["country"])}, concat=True)
        return self.mlp(torch.cat([x, self.tag_bag(tags)], dim=1)).squeeze(1)


def rows_of(model: Model) -> dict:
    out = {}
    for name, table in {**model.embeddings.tables, "bag": model.tag_bag.table}.items():
        export = table.export()
        out[name] = {"ids": export.ids, "weights": export.weights, "state": export.optimizer_state, "counts": export.counts}
    return out


def _slow_saves_on_rank_0(seconds: float) -> None:
    import os
    import time

    from dynembed.checkpoint.manager import CheckpointManager
    save = CheckpointManager.save

    def slow(self, *args, **kwargs):
        result = save(self, *args, **kwargs)
        if os.environ.get("RANK") == "0":
            time.sleep(seconds)
        return result

    CheckpointManager.save = slow


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=2_000)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--dim-on-rank-1", type=int, default=None)
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-step", type=int, default=None)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--device", default="cpu", help="where the model's outputs and dense "
                   "layers go (rows stay in host memory)")
    p.add_argument("--fail-restore-rank", type=int, default=None,
                   help="this rank's restore hits an I/O error (injected)")
    p.add_argument("--slow-save", type=float, default=0.0,
                   help="rank 0's saves take this many seconds longer (as a compaction)")
    args = p.parse_args()
    if args.slow_save:
        _slow_saves_on_rank_0(args.slow_save)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = make_data(args.samples)
    with de.train.Runtime(args.ckpt, every_steps=args.every, timeout=args.timeout) as rt:
        dim = args.dim_on_rank_1 if (args.dim_on_rank_1 and rt.rank == 1) else args.dim
        model = Model(dim).to(args.device)
        net = rt.prepare(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        if rt.rank == args.fail_restore_rank:
            def failing_load(*_args, **_kwargs):
                raise OSError(errno.EIO, "injected I/O error reading the checkpoint")
            de.train.runtime.load = failing_load
        rt.restore(opt)
        tag = f"w{rt.world_size}-r{rt.rank}"
        torch.save({"step": rt.step, "rows": rows_of(model)},
                   out / f"restored-{tag}-a{rt.env.restart_count}.pt")
        for step in rt.steps(args.steps):
            idx = rt.batch_indices(step, args.batch, args.samples)
            batch = {k: v[idx] for k, v in data.items()}
            loss = nn.functional.binary_cross_entropy_with_logits(
                net(batch), torch.from_numpy(batch["labels"]).to(args.device))
            loss.backward()
            opt.step()
            opt.zero_grad()
            global_loss = loss.detach().clone()
            if rt.distributed:
                dist.all_reduce(global_loss)
                global_loss /= rt.world_size
            rt.log(loss=global_loss.item())
            if rt.rank == 0:
                with open(out / "loss.jsonl", "a") as f:
                    f.write(json.dumps({"step": step + 1, "loss": global_loss.item(),
                                        "attempt": rt.env.restart_count}) + "\n")
            marker = out / "killed"
            if (rt.rank == args.kill_rank and step + 1 == args.kill_step
                    and not marker.exists()):
                marker.write_text(str(step + 1))
                os.kill(os.getpid(), signal.SIGKILL)
            if args.step_sleep:
                time.sleep(args.step_sleep)
        if not rt.preempted:
            torch.save({"step": rt.step, "rows": rows_of(model),
                        "dense": {k: v.cpu() for k, v in model.mlp.state_dict().items()}},
                       out / f"final-{tag}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
