"""Models moved to a GPU: lookups take their keys, offsets and weights on the GPU and answer
there, while rows stay in host memory; training, deferred steps, mixed precision, eval,
sampled softmax, checkpoints and torch.compile give what the same model gives on the CPU.

They run where torch sees a GPU; they passed on an H200 with torch 2.11.0+cu130 on
2026-11-28. CI has none: there they skip, and the CPU behaviour they compare with is tested
everywhere else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import dynembed as de
from dynembed.train import Runtime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch sees none here)")

WORDS = np.array([f"word{i}" for i in range(60)], dtype=object)
BATCH = 32


class Ranker(nn.Module):
    """One of each module: string keys, weighted sum bags, a collection with a shared table
    (one plain and one mean-pooled feature), under a small MLP."""

    def __init__(self, update_mode: str = "fused") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.words = de.DynamicEmbedding(dim=8, optimizer=de.optim.Adam(lr=0.01), seed=1,
                                         update_mode=update_mode)
        self.items = de.DynamicEmbeddingBag(dim=8, mode="sum", seed=2,
                                            optimizer=de.optim.Adagrad(lr=0.1),
                                            update_mode=update_mode)
        opt = de.optim.SGD(lr=0.1, momentum=0.9)
        self.features = de.EmbeddingCollection(
            tables={"t": de.TableConfig(dim=4, optimizer=opt, seed=3, update_mode=update_mode)},
            features={"user": "t", "city": de.FeatureConfig(table="t", pooling="mean")})
        self.mlp = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, batch: dict) -> torch.Tensor:
        x = torch.cat([self.words(batch["words"]),
                       self.items(batch["items"], batch["offsets"],
                                  per_sample_weights=batch["weights"]),
                       self.features({"user": batch["users"], "city": batch["cities"]},
                                     concat=True)], dim=1)
        return self.mlp(x).squeeze(1)


def _batches(n: int, device: str, seed: int = 0) -> list[dict]:
    """``n`` batches, every tensor on ``device`` (string keys stay a list)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(0, 4, BATCH)
        values = rng.zipf(1.3, int(lengths.sum())) % 500
        batch = {"words": list(WORDS[rng.zipf(1.2, BATCH) % len(WORDS)]),
                 "items": torch.from_numpy(values.astype(np.int64)),
                 "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]])),
                 "weights": torch.from_numpy(rng.uniform(0.5, 2.0, values.shape[0])).float(),
                 "users": torch.from_numpy(rng.integers(-2**62, 2**62, BATCH) % 97 - 40),
                 "cities": torch.from_numpy(rng.integers(0, 30, (BATCH, 3)) + 1000),
                 "labels": torch.from_numpy((rng.random(BATCH) < 0.3).astype(np.float32))}
        out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()})
    return out


def _rows(model: Ranker) -> dict[str, dict[int, np.ndarray]]:
    """table name -> id -> weights and optimizer state, concatenated."""
    tables = {"words": model.words.table, "items": model.items.table,
              **model.features.tables}
    out = {}
    for name, table in tables.items():
        e = table.export()
        values = torch.cat([e.weights, e.optimizer_state], dim=1).numpy()
        out[name] = dict(zip(e.ids.tolist(), values))
    return out


def assert_same_rows(a: Ranker, b: Ranker, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    rows_a, rows_b = _rows(a), _rows(b)
    for name in rows_a:
        assert rows_a[name].keys() == rows_b[name].keys(), name
        keys = sorted(rows_a[name])
        np.testing.assert_allclose(np.stack([rows_a[name][k] for k in keys]),
                                   np.stack([rows_b[name][k] for k in keys]),
                                   rtol=rtol, atol=atol, err_msg=name)


def assert_same_dense(a: nn.Module, b: nn.Module, atol: float = 1e-5) -> None:
    for (name, p), q in zip(a.mlp.state_dict().items(), b.mlp.state_dict().values()):
        torch.testing.assert_close(p.cpu(), q.cpu(), rtol=1e-4, atol=atol, msg=name)


def _train(model: Ranker, batches: list[dict], micro: int = 1) -> list[float]:
    """Adam on the dense part; ``micro`` batches per step (deferred tables step once)."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for i in range(0, len(batches), micro):
        for batch in batches[i:i + micro]:
            loss = F.binary_cross_entropy_with_logits(model(batch), batch["labels"]) / micro
            loss.backward()
            losses.append(loss.item())
        de.sparse_step(model)
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("update_mode,micro", [("fused", 1), ("deferred", 3)])
def test_a_model_on_the_gpu_trains_as_on_the_cpu(update_mode, micro):
    """Keys, offsets, weights and labels on the GPU: the outputs are there, the gradient
    comes back to the rows in host memory, and 12 steps give the CPU model's rows, dense
    weights and losses (fused updates, and deferred ones accumulated over 3 batches)."""
    cpu, gpu = Ranker(update_mode), Ranker(update_mode).cuda()
    batches = _batches(12, "cuda")
    out = gpu(batches[0])
    assert out.device.type == "cuda" and out.dtype == torch.float32
    gpu_losses = _train(gpu, batches, micro)
    cpu_losses = _train(cpu, _batches(12, "cpu"), micro)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-4, atol=1e-6)
    assert_same_rows(gpu, cpu)
    assert_same_dense(gpu, cpu)
    for name, table in {"words": gpu.words.table, "items": gpu.items.table}.items():
        assert table.arena.weights.device.type == "cpu", name  # rows stay in host memory
        assert table.stats().totals.updated_rows > 0, name


def test_weights_of_bags_on_the_gpu_get_their_gradient_there():
    """Per-sample weights that need a gradient (a GPU model computed them) get it on the
    GPU, equal to the CPU model's."""
    grads = {}
    for device in ("cpu", "cuda"):
        model = Ranker().to(device)
        batch = _batches(1, device)[0]
        batch["weights"].requires_grad_(True)
        F.binary_cross_entropy_with_logits(model(batch), batch["labels"]).backward()
        grads[device] = batch["weights"].grad
    assert grads["cuda"].device.type == "cuda"
    torch.testing.assert_close(grads["cuda"].cpu(), grads["cpu"], rtol=1e-4, atol=1e-6)


def test_half_precision_on_the_gpu_trains_the_float32_rows():
    emb = de.DynamicEmbedding(dim=8, optimizer=de.optim.SGD(lr=0.5), seed=4).cuda().half()
    keys = torch.tensor([5, -7, 5, 2**62], device="cuda")
    before = emb(keys).detach()
    assert before.device.type == "cuda" and before.dtype == torch.float16
    emb(keys).float().sum().backward()
    rows = emb.table.export()
    assert rows.weights.dtype == torch.float32
    after = emb(keys).detach()
    # d(sum)/d(row) is 1 per occurrence: key 5 twice
    expected = before.float() - 0.5 * torch.tensor([2, 1, 2, 1], device="cuda")[:, None]
    torch.testing.assert_close(after.float(), expected, rtol=0, atol=2e-3)


def test_autocast_with_a_grad_scaler_gives_tables_the_unscaled_gradient():
    """float16 autocast on the GPU with torch.amp.GradScaler inside de.loss_scale: a step
    moves the rows as the float32 CPU model's step does (not 65,536 times further); a step
    whose loss overflowed leaves every row as it was, counts the skipped gradients and
    lowers the scale."""
    cpu, gpu = Ranker(), Ranker().cuda()
    batch_gpu, batch_cpu = _batches(1, "cuda")[0], _batches(1, "cpu")[0]
    scaler = torch.amp.GradScaler("cuda")
    opt = torch.optim.SGD(gpu.mlp.parameters(), lr=0.1)
    with de.loss_scale(scaler):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.binary_cross_entropy_with_logits(gpu(batch_gpu).float(),
                                                      batch_gpu["labels"])
        before = _rows(gpu)  # the rows the lookup created
        scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    F.binary_cross_entropy_with_logits(cpu(batch_cpu), batch_cpu["labels"]).backward()
    moved_gpu, moved_cpu = _rows(gpu), _rows(cpu)
    for name in before:
        keys = sorted(before[name])
        start = np.stack([before[name][k] for k in keys])[:, :8 if name != "t" else 4]
        dim = start.shape[1]
        step_gpu = np.stack([moved_gpu[name][k][:dim] for k in keys]) - start
        step_cpu = np.stack([moved_cpu[name][k][:dim] for k in keys]) - start
        assert np.abs(step_cpu).max() > 1e-4, name
        np.testing.assert_allclose(step_gpu, step_cpu, rtol=0.05, atol=2e-4, err_msg=name)

    scale = scaler.get_scale()
    skipped = gpu.words.stats().totals.skipped_gradients
    settled = _rows(gpu)
    with de.loss_scale(scaler):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = gpu(batch_gpu).float().sum() * float("inf")
        scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    for name, rows in _rows(gpu).items():
        for key, value in rows.items():
            np.testing.assert_array_equal(value, settled[name][key], err_msg=name)
    assert gpu.words.stats().totals.skipped_gradients > skipped
    assert scaler.get_scale() < scale


def test_eval_on_the_gpu_answers_unseen_keys_with_the_default_and_adds_no_row():
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=6,
                              default_value=0.25).cuda()
    known = emb(torch.tensor([1, 2], device="cuda")).detach()
    emb.eval()
    with torch.no_grad():
        got = emb(torch.tensor([[2, 99], [1, -5]], device="cuda"))
    assert got.device.type == "cuda" and got.shape == (2, 2, 4)
    torch.testing.assert_close(got[0, 0], known[1])
    torch.testing.assert_close(got[1, 0], known[0])
    assert (got[0, 1] == 0.25).all() and (got[1, 1] == 0.25).all()
    assert emb.stats().rows == 2 and emb.stats().last_call.defaults_served == 2


def test_sampled_softmax_on_the_gpu_matches_the_cpu():
    """Hidden states and labels on the GPU: the loss is there, and the output table's rows
    move as on the CPU with the same negatives."""
    losses, tables = {}, {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        words = de.DynamicEmbedding(dim=8, optimizer=de.optim.Adagrad(lr=0.1), seed=7).to(device)
        out = de.DynamicEmbedding(dim=8, optimizer=de.optim.Adagrad(lr=0.1), seed=8).to(device)
        centers = torch.arange(40, device=device) % 13
        contexts = (centers * 7 + 3) % 50
        loss = de.sampled_softmax_loss(out, words(centers), contexts, num_sampled=16,
                                       generator=5)
        assert loss.device.type == device
        loss.backward()
        losses[device], tables[device] = loss.item(), out.table.export()
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-5)
    order = {d: torch.argsort(t.ids) for d, t in tables.items()}
    torch.testing.assert_close(tables["cuda"].ids[order["cuda"]],
                               tables["cpu"].ids[order["cpu"]], rtol=0, atol=0)
    torch.testing.assert_close(tables["cuda"].weights[order["cuda"]],
                               tables["cpu"].weights[order["cpu"]], rtol=1e-4, atol=1e-6)


def test_a_checkpoint_of_a_gpu_model_loads_on_the_gpu_and_on_the_cpu(tmp_path):
    """Saved from the GPU after 6 steps: loaded into a fresh GPU model (dense optimizer state
    on the GPU too), the next 6 steps give the uninterrupted model's; loaded into a CPU
    model, it answers as the GPU model."""
    batches = _batches(12, "cuda")
    whole = Ranker().cuda()
    opt = torch.optim.Adam(whole.parameters(), lr=0.01)

    def step(model, optimizer, batch):
        F.binary_cross_entropy_with_logits(model(batch), batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad()

    for batch in batches[:6]:
        step(whole, opt, batch)
    de.checkpoint.save(tmp_path / "ckpt", whole, opt, {"step": 6})

    resumed = Ranker().cuda()
    opt2 = torch.optim.Adam(resumed.parameters(), lr=0.01)
    assert de.checkpoint.load(tmp_path / "ckpt", resumed, opt2)["step"] == 6
    assert all(s["exp_avg"].device.type == "cuda" for s in opt2.state.values() if s)
    on_cpu = Ranker()
    de.checkpoint.load(tmp_path / "ckpt", on_cpu)
    with torch.no_grad():
        whole.eval(), on_cpu.eval()
        probe_gpu, probe_cpu = batches[6], _batches(12, "cpu")[6]
        torch.testing.assert_close(on_cpu(probe_cpu), whole(probe_gpu).cpu(),
                                   rtol=1e-5, atol=1e-6)
        whole.train()
    for batch in batches[6:]:
        step(whole, opt, batch)
        step(resumed, opt2, batch)
    assert_same_rows(resumed, whole, rtol=1e-6, atol=1e-7)
    assert_same_dense(resumed, whole, atol=1e-7)


def test_a_restored_runtime_continues_the_gpu_random_stream(tmp_path):
    """Dropout on the GPU draws from the CUDA generator: a job restored from its step-4
    checkpoint draws at steps 4-7 what the uninterrupted job drew."""
    def job(steps: int, fail_at: int | None = None) -> dict[int, torch.Tensor]:
        torch.manual_seed(1)  # as a script does at its top, on every start and restart
        drawn = {}
        rt = Runtime(tmp_path / f"ckpt-{fail_at}", every_steps=4).start()
        model = Ranker().cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            rt.prepare(model)
            rt.restore(opt)
            for step in rt.steps(steps):
                mask = F.dropout(torch.ones(64, device="cuda"), 0.5)
                drawn[step] = mask.cpu()
                if step == fail_at:
                    break
        finally:
            rt.close()
        return drawn

    whole = job(8)
    job(8, fail_at=5)  # saved step 4, then stopped
    again = job(8, fail_at=5)  # restores step 4 from the same directory
    assert sorted(again) == [4, 5]
    for step in again:
        torch.testing.assert_close(again[step], whole[step], rtol=0, atol=0)


def test_a_compiled_gpu_model_trains_as_the_eager_one():
    """torch.compile runs the lookups eagerly (a graph break) and compiles the rest for the
    GPU: 4 steps give the eager model's rows and dense weights."""
    eager, compiled = Ranker().cuda(), Ranker().cuda()
    batches = _batches(4, "cuda")
    np.testing.assert_allclose(_train(torch.compile(compiled), batches), _train(eager, batches),
                               rtol=1e-4, atol=1e-6)
    assert_same_rows(compiled, eager)
    assert_same_dense(compiled, eager)


def test_table_verbs_and_state_dicts_take_gpu_tensors():
    """Keys, vectors and queries from a GPU model go into the table's verbs as they are,
    and a state dict loaded onto the GPU (``torch.load(..., map_location="cuda")``) loads
    back, its key log and admission counts too."""
    def table_module():
        return de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=1,
                                   key_log=True,
                                   admission=de.policy.FrequencyAdmission(threshold=2,
                                                                          width=1024))

    emb = table_module()
    keys = torch.tensor([3, -9, 2**62], device="cuda")
    values = torch.arange(12, dtype=torch.float32, device="cuda").view(3, 4)
    emb.table.insert_or_assign(keys, values)
    torch.testing.assert_close(emb.table.find(keys).values, values.cpu())
    best = emb.table.top_k(values[2], k=2)  # a query from a GPU model
    assert best.ids.tolist() == [2**62, -9]
    best = emb.table.top_k(values[2:], k=1, exclude=[keys[2:]])  # seen items, on the GPU
    assert best.ids.tolist() == [[-9]]
    emb.table.assign(keys[:1], values[2:])
    torch.testing.assert_close(emb.table.find(keys[:1]).values, values[2:].cpu())
    emb(["seen", "seen", "once"])  # "seen" admitted, "once" counted once
    assert emb.table.erase(keys[1:2]) == 1
    state = {k: v.cuda() for k, v in emb.state_dict().items()}
    again = table_module()
    again.load_state_dict(state)
    assert again.table.export().ids.tolist() == emb.table.export().ids.tolist()
    assert again.table.key_log.lookup(again.table.ids_of(["seen"]).ids) == ["seen"]
    again(["once"])  # its second sighting, restored with the admission counts
    assert again.table.contains(["once"]).all()
