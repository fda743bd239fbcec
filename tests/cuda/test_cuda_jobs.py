"""A torchrun job whose model is on the GPU (both ranks share it; gloo syncs the dense part
and carries the tables' rows): killed mid-way, restarted from its checkpoint, it ends with
the rows and dense weights of one uninterrupted CPU process.

It runs where torch sees a GPU; it passed on an H200 with torch 2.11.0+cu130 on
2026-11-28. CI has none: there it skips; tests/distributed runs the same job on the CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.distributed.helpers import (
    assert_same_rows,
    check,
    rows_union,
    run_alone,
    run_torchrun,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch sees none here)")


def test_a_gpu_job_killed_and_restarted_trains_as_one_cpu_process(tmp_path, device="cuda"):
    one, two = tmp_path / "one", tmp_path / "two"
    check(run_alone("--out", str(one), "--steps", "12"))
    check(run_torchrun(2, "--out", str(two), "--ckpt", str(tmp_path / "ckpt"), "--steps", "12",
                       "--every", "4", "--kill-rank", "1", "--kill-step", "6",
                       "--device", device, max_restarts=1))
    assert (two / "killed").read_text() == "6"
    restored = [torch.load(f, weights_only=True)["step"] for f in two.glob("restored-*-a1.pt")]
    assert restored == [4, 4]
    finals = sorted(two.glob("final-w2-r*.pt"))
    for table in ("ids", "country", "bag"):
        assert_same_rows(rows_union(sorted(one.glob("final-w1-r*.pt")), table),
                         rows_union(finals, table), exact=False)
    dense1 = torch.load(one / "final-w1-r0.pt", weights_only=True)["dense"]
    for f in finals:
        dense2 = torch.load(f, weights_only=True)["dense"]
        for name in dense1:
            torch.testing.assert_close(dense1[name], dense2[name], rtol=1e-4, atol=2e-5)
    loss1 = [json.loads(line)["loss"] for line in (one / "loss.jsonl").read_text().splitlines()]
    loss2 = {r["step"]: r["loss"] for r in map(json.loads,
                                               (two / "loss.jsonl").read_text().splitlines())}
    np.testing.assert_allclose(loss1, [loss2[s] for s in range(1, 13)], rtol=1e-4)
