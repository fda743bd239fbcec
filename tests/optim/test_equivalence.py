"""A dynamic table trains to the same weights as a static embedding with the same rule.

torch's own sparse optimizers are the reference where torch has one (SGD, Adagrad,
SparseAdam); for lazy momentum, row-wise Adagrad and FTRL the reference is the published
formula applied with numpy to the rows each batch touches.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import dynembed as de

VOCAB = 40
DIM = 8
STEPS = 40
BATCH = 64


def _vocab(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**63, 2**63 - 1, (VOCAB,), generator=g, dtype=torch.int64)


def _batches(seed: int = 1):
    """Batches with many duplicate keys (40 ids, 64 draws) and per-step targets."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        # 64 draws over 40 ids: duplicates in every batch, and some rows left untouched.
        idx = torch.randint(0, VOCAB, (BATCH,), generator=g)
        yield idx, torch.randn(BATCH, DIM, generator=g)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Non-linear, so gradients depend on the current weights.
    return ((torch.tanh(out) - target) ** 2).sum()


def _dynamic(optimizer) -> tuple[de.DynamicEmbedding, torch.Tensor]:
    emb = de.DynamicEmbedding(dim=DIM, optimizer=optimizer, seed=3)
    ids = _vocab()
    with torch.no_grad():
        emb(ids)  # insert every key so both sides start from the same vectors
    return emb, ids


def _train_dynamic(emb, ids) -> torch.Tensor:
    for idx, target in _batches():
        _loss(emb(ids[idx]), target).backward()
    return emb.table.find(ids).values


def _initial(emb, ids) -> torch.Tensor:
    return emb.table.find(ids).values.clone()


@pytest.mark.parametrize("name, ours, theirs", [
    ("sgd", de.optim.SGD(lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
    ("adagrad", de.optim.Adagrad(lr=0.1), lambda p: torch.optim.Adagrad(p, lr=0.1)),
    ("adagrad-decay", de.optim.Adagrad(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
     lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    ("adam", de.optim.Adam(lr=0.01), lambda p: torch.optim.SparseAdam(p, lr=0.01)),
    ("adam-betas", de.optim.Adam(lr=0.02, betas=(0.8, 0.99), eps=1e-6),
     lambda p: torch.optim.SparseAdam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6)),
    # 1 - beta in float32 from float32(beta) was 7e-4 off here
    ("adam-betas-near-one", de.optim.Adam(lr=0.5, betas=(0.99999, 0.99999)),
     lambda p: torch.optim.SparseAdam(p, lr=0.5, betas=(0.99999, 0.99999))),
])
def test_matches_torch_sparse_optimizer(name, ours, theirs):
    emb, ids = _dynamic(ours)
    ref = torch.nn.Embedding(VOCAB, DIM, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(_initial(emb, ids))
    opt = theirs(ref.parameters())
    for idx, target in _batches():
        opt.zero_grad()
        _loss(ref(idx), target).backward()
        opt.step()
    got = _train_dynamic(emb, ids)
    assert not torch.equal(got, _initial(_dynamic(ours)[0], ids)), "training moved nothing"
    torch.testing.assert_close(got, ref.weight.detach(), rtol=1e-4, atol=1e-5)


def _reference_run(emb, ids, update) -> torch.Tensor:
    """Trains a dense copy, applying ``update(w, state, rows, grad_rows)`` to touched rows."""
    w = _initial(emb, ids).numpy().astype(np.float64)
    state: dict = {}
    for idx, target in _batches():
        wt = torch.tensor(w, dtype=torch.float32, requires_grad=True)
        _loss(wt[idx], target).backward()
        rows = np.unique(idx.numpy())
        update(w, state, rows, wt.grad.numpy()[rows].astype(np.float64))
    return torch.tensor(w, dtype=torch.float32)


def test_sgd_momentum_matches_lazy_reference():
    lr, mom = 0.05, 0.9

    def update(w, state, rows, g):
        buf = state.setdefault("buf", np.zeros_like(w))
        buf[rows] = mom * buf[rows] + g
        w[rows] -= lr * buf[rows]

    emb, ids = _dynamic(de.optim.SGD(lr=lr, momentum=mom))
    expected = _reference_run(emb, ids, update)
    torch.testing.assert_close(_train_dynamic(emb, ids), expected, rtol=1e-4, atol=1e-5)


def test_sgd_dampening_starts_each_row_as_torch_does():
    """torch's first step sets the buffer to the gradient undamped; lazily, so does each
    row's first update here (and a row's later updates damp)."""
    lr, mom, damp = 0.05, 0.9, 0.5

    def update(w, state, rows, g):
        buf = state.setdefault("buf", np.zeros_like(w))
        started = state.setdefault("started", np.zeros(w.shape[0], dtype=bool))
        first = ~started[rows]
        buf[rows] = np.where(first[:, None], g, mom * buf[rows] + (1 - damp) * g)
        started[rows] = True
        w[rows] -= lr * buf[rows]

    emb, ids = _dynamic(de.optim.SGD(lr=lr, momentum=mom, dampening=damp))
    expected = _reference_run(emb, ids, update)
    torch.testing.assert_close(_train_dynamic(emb, ids), expected, rtol=1e-4, atol=1e-5)

    # One parameter touched every step: exactly torch.optim.SGD.
    emb = de.DynamicEmbedding(dim=DIM, optimizer=de.optim.SGD(lr=lr, momentum=mom,
                                                               dampening=damp), seed=3)
    key = torch.tensor([7])
    ref = torch.nn.Parameter(emb.table.find_or_insert(key).values.clone())
    opt = torch.optim.SGD([ref], lr=lr, momentum=mom, dampening=damp)
    for _, target in zip(range(5), _batches()):
        _loss(emb(key), target[1][:1]).backward()
        opt.zero_grad()
        _loss(ref, target[1][:1]).backward()
        opt.step()
    torch.testing.assert_close(emb.table.find(key).values, ref.detach(), rtol=1e-5, atol=1e-6)


def test_nesterov_matches_lazy_reference():
    lr, mom = 0.05, 0.5

    def update(w, state, rows, g):
        buf = state.setdefault("buf", np.zeros_like(w))
        buf[rows] = mom * buf[rows] + g
        w[rows] -= lr * (g + mom * buf[rows])

    emb, ids = _dynamic(de.optim.SGD(lr=lr, momentum=mom, nesterov=True))
    expected = _reference_run(emb, ids, update)
    torch.testing.assert_close(_train_dynamic(emb, ids), expected, rtol=1e-4, atol=1e-5)


def test_rowwise_adagrad_matches_reference():
    lr, eps = 0.1, 1e-8

    def update(w, state, rows, g):
        acc = state.setdefault("acc", np.zeros(w.shape[0]))
        acc[rows] += (g ** 2).mean(axis=1)
        w[rows] -= lr * g / (np.sqrt(acc[rows])[:, None] + eps)

    emb, ids = _dynamic(de.optim.RowWiseAdagrad(lr=lr, eps=eps))
    expected = _reference_run(emb, ids, update)
    torch.testing.assert_close(_train_dynamic(emb, ids), expected, rtol=1e-4, atol=1e-5)
    assert emb.table.arena.state_width == 1


def test_ftrl_matches_reference():
    alpha, beta, l1, l2, n0 = 0.1, 1.0, 0.001, 0.01, 0.1

    def update(w, state, rows, g):
        z = state.setdefault("z", np.zeros_like(w))
        n = state.setdefault("n", np.full_like(w, n0))
        n_new = n[rows] + g ** 2
        sigma = (np.sqrt(n_new) - np.sqrt(n[rows])) / alpha
        z[rows] += g - sigma * w[rows]
        n[rows] = n_new
        zr = z[rows]
        w[rows] = np.where(np.abs(zr) <= l1, 0.0,
                           -(zr - np.sign(zr) * l1) / ((beta + np.sqrt(n_new)) / alpha + l2))

    emb, ids = _dynamic(de.optim.FTRL(lr=alpha, beta=beta, l1=l1, l2=l2,
                                      initial_accumulator_value=n0))
    expected = _reference_run(emb, ids, update)
    torch.testing.assert_close(_train_dynamic(emb, ids), expected, rtol=1e-4, atol=1e-5)


def test_weight_decay_matches_torch_dense_sgd_on_touched_rows():
    # torch's sparse SGD has no weight decay; the reference is g + wd * w on touched rows.
    lr, wd = 0.05, 0.1

    def update(w, state, rows, g):
        w[rows] -= lr * (g + wd * w[rows])

    emb, ids = _dynamic(de.optim.SGD(lr=lr, weight_decay=wd))
    expected = _reference_run(emb, ids, update)
    torch.testing.assert_close(_train_dynamic(emb, ids), expected, rtol=1e-4, atol=1e-5)


def test_max_grad_norm_clips_each_row():
    lr, clip = 0.05, 0.01

    def update(w, state, rows, g):
        norms = np.linalg.norm(g, axis=1, keepdims=True)
        g = np.where(norms > clip, g * clip / (norms + 1e-6), g)
        w[rows] -= lr * g

    emb, ids = _dynamic(de.optim.SGD(lr=lr, max_grad_norm=clip))
    expected = _reference_run(emb, ids, update)
    torch.testing.assert_close(_train_dynamic(emb, ids), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("field, value", [
    ("lr", 0), ("lr", -1.0), ("lr", float("nan")), ("weight_decay", -0.1),
    ("max_grad_norm", 0.0), ("lr", True), ("weight_decay", float("inf")),
])
def test_bad_hyperparameters_name_the_field(field, value):
    kwargs = {"lr": 0.1, field: value}
    with pytest.raises(ValueError, match=field):
        de.optim.SGD(**kwargs)


def test_numpy_hyperparameters_are_numbers():
    """Kept as numpy scalars, they made export_package's JSON manifest fail."""
    sgd = de.optim.SGD(lr=np.float32(0.1), weight_decay=np.float64(0.0))
    assert sgd.lr == np.float32(0.1) and type(sgd.lr) is float
    adam = de.optim.Adam(lr=0.1, betas=(np.float32(0.9), 0.99))
    assert adam.betas[0] == np.float32(0.9) and type(adam.betas[0]) is float
    assert json.loads(json.dumps(dataclasses.asdict(adam)))["betas"][0] == adam.betas[0]
    listed = de.optim.Adam(lr=0.1, betas=[np.float32(0.9), np.float32(0.99)])
    assert json.dumps(dataclasses.asdict(listed))  # a list of numpy floats too
    assert repr(sgd) == repr(de.optim.SGD(lr=float(np.float32(0.1))))


def test_ftrl_stays_finite_after_a_gradient_whose_square_overflows_float32():
    """n (float32) became inf at |g| = 1e20; every later step then made the row NaN
    (sqrt(inf) - sqrt(inf)), uncounted."""
    emb = de.DynamicEmbedding(dim=3, optimizer=de.optim.FTRL(lr=0.1), seed=1)
    for g in (1e20, 1.0, -1.0):
        out = emb(torch.tensor([7]))
        out.backward(torch.full_like(out, g))
        assert torch.isfinite(emb.table.find([7]).values).all(), g
    assert emb.table.stats().totals.nonfinite_gradients == 0


def test_bad_optimizer_specific_fields():
    with pytest.raises(TypeError, match="nesterov must be True or False"):
        de.optim.SGD(lr=0.1, momentum=0.9, nesterov="no")
    with pytest.raises(ValueError, match="momentum"):
        de.optim.SGD(lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="nesterov"):
        de.optim.SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        de.optim.Adam(lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        de.optim.Adagrad(lr=0.1, eps=0)
    with pytest.raises(ValueError, match="l1"):
        de.optim.FTRL(lr=0.1, l1=-1)
    # a zero denominator once gave -inf weights for gradients whose square underflows
    with pytest.raises(ValueError, match="beta, l2 and initial_accumulator_value are all 0"):
        de.optim.FTRL(lr=0.1, beta=0, initial_accumulator_value=0)
    de.optim.FTRL(lr=0.1, beta=0, initial_accumulator_value=0, l2=0.1)



@pytest.mark.parametrize("optimizer, reference", [
    (de.optim.Adagrad(lr=0.1), lambda p: torch.optim.Adagrad(p, lr=0.1)),
    (de.optim.Adam(lr=0.1), lambda p: torch.optim.SparseAdam(p, lr=0.1)),
])
@pytest.mark.parametrize("dim", [3, 16, 17])
def test_a_finite_gradient_whose_square_overflows_updates_as_torch(optimizer, reference, dim):
    """With LLVM's no-inf fast math, |g| = 1e20 (finite; g * g is inf) made vectorised
    rows NaN, uncounted, where torch leaves them as they were."""
    emb = de.DynamicEmbedding(dim=dim, optimizer=optimizer, seed=1)
    ref = torch.nn.Embedding(1, dim, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(emb.table.find_or_insert([7]).values)
    opt = reference(ref.parameters())
    grad = torch.full((1, dim), 1e20)
    emb(torch.tensor([7])).backward(grad)
    ref(torch.tensor([0])).backward(grad)
    opt.step()
    got = emb.table.find([7]).values
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref.weight.detach())


def _batches_touching_every_row(seed: int = 1):
    """Every id once plus 64 random draws per batch: a lazy optimizer then steps every row
    every batch, as a dense one does."""
    for idx, target in _batches(seed):
        every = torch.arange(VOCAB)
        yield torch.cat([every, idx]), torch.cat([torch.zeros(VOCAB, DIM), target])


@pytest.mark.parametrize("make_ours", [
    lambda: de.optim.AdamW(lr=0.01, weight_decay=0.5),
    lambda: de.optim.Adam(lr=0.01, weight_decay=0.5, decoupled_weight_decay=True),
])
# gradients near 1e-7 (a mean over a large batch): eps then matters, and torch's AdamW adds
# it after the bias correction, where SparseAdam adds it before (3x apart at step 1)
@pytest.mark.parametrize("scale", [1.0, 1e-7])
def test_adamw_matches_torch_adamw_where_every_row_is_touched(make_ours, scale):
    emb, ids = _dynamic(make_ours())
    ref = torch.nn.Embedding(VOCAB, DIM)
    with torch.no_grad():
        ref.weight.copy_(_initial(emb, ids))
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.5)
    coupled, _ = _dynamic(de.optim.Adam(lr=0.01, weight_decay=0.5))
    for idx, target in _batches_touching_every_row():
        opt.zero_grad()
        (scale * _loss(ref(idx), target)).backward()
        opt.step()
        (scale * _loss(emb(ids[idx]), target)).backward()
        (scale * _loss(coupled(ids[idx]), target)).backward()
    got = emb.table.find(ids).values
    torch.testing.assert_close(got, ref.weight.detach(), rtol=1e-4, atol=1e-5)
    # the decay is decoupled: Adam's L2 penalty, rescaled by the moments, ends elsewhere
    assert (coupled.table.find(ids).values - got).abs().max() > 1e-3


def test_adamw_decays_only_the_rows_a_batch_touches():
    """Lazy, as the moments: a row no batch touches keeps its value."""
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.AdamW(lr=0.1, weight_decay=0.5),
                              seed=1, initializer=de.init.Normal(std=1.0))
    emb(torch.tensor([1, 2])).sum().backward()
    resting = emb.table.find([1]).values.clone()
    for _ in range(3):
        emb(torch.tensor([2])).sum().backward()
    assert torch.equal(emb.table.find([1]).values, resting)
