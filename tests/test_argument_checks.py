"""Arguments that were accepted and then quietly did something else (an API review): flags
given as strings, numbers beyond float32, state that poisons training, one key given where a
list is expected, paths given as None. Each is refused up front, naming the argument."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.serving.registry import Registry
from dynembed.serving.server import ServerConfig
from dynembed.table.index import HashIndex


@pytest.mark.parametrize("flag", ["read_only", "key_log"])
@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
def test_table_flags_take_only_bools(flag, value):
    """``read_only="false"`` is truthy: the table silently stopped training (outputs of
    default vectors, no rows, no gradient)."""
    with pytest.raises(TypeError, match=f"{flag} must be True or False"):
        de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), **{flag: value})
    assert de.TableConfig(dim=4, **{flag: np.bool_(True)}).__getattribute__(flag) is True


def test_a_table_config_is_frozen_once_checked():
    """A field set after the checks ran reached the table unchecked (``dim = -3`` gave an
    integer overflow from torch)."""
    config = de.TableConfig(dim=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dim = -3
    assert dataclasses.replace(config, dim=8).dim == 8
    with pytest.raises(ValueError, match="dim must be an int > 0"):
        dataclasses.replace(config, dim=-3)


def test_a_huge_dim_is_refused_by_the_config():
    """``dim=2**40`` (a typo) passed the config and failed in torch's allocator, a
    RuntimeError naming no argument."""
    assert de.TableConfig(dim=de.table.config.MAX_DIM).dim == de.table.config.MAX_DIM
    with pytest.raises(ValueError, match=r"dim must be an int > 0 and at most 1,048,576"):
        de.DynamicEmbedding(dim=2**40)


@pytest.mark.parametrize("rows", [2**62, 2**45])
def test_a_reservation_beyond_memory_is_a_memory_error_leaving_the_table(rows):
    """``reserve(2**62)`` raised numpy's "array is too big" ValueError, unlike the
    MemoryError (table unchanged) of any other size that does not fit."""
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1))
    before = emb(torch.tensor([1, 2])).detach().clone()
    with pytest.raises(MemoryError, match="cannot allocate a table arena.*table is unchanged"):
        emb.table.reserve(rows)
    assert torch.equal(emb(torch.tensor([1, 2])), before)
    assert emb.table.size() == 2


def test_an_index_beyond_memory_is_a_memory_error_leaving_the_index():
    index = HashIndex(4)
    with pytest.raises(MemoryError, match="cannot allocate a hash index.*unchanged"):
        index.reserve(2**61)
    assert index.buckets == 16


def test_torch_cpu_device_is_taken_like_the_string():
    emb = de.DynamicEmbedding(dim=4, device=torch.device("cpu"))
    assert emb.table.config.device == "cpu"
    with pytest.raises(ValueError, match="device must be 'cpu'"):
        de.DynamicEmbedding(dim=4, device=torch.device("meta"))


def test_a_string_default_value_is_not_read_as_its_digits():
    with pytest.raises(ValueError, match="default_value must be a number or a sequence"):
        de.DynamicEmbedding(dim=4, default_value="1234")


@pytest.mark.parametrize("make", [
    lambda: de.optim.SGD(lr=1e39),
    lambda: de.optim.Adagrad(lr=0.1, eps=1e39),
    lambda: de.optim.Adagrad(lr=0.1, initial_accumulator_value=1e39),
    lambda: de.optim.Adam(weight_decay=1e39),
    lambda: de.optim.FTRL(lr=0.1, l2=1e39),
])
def test_optimizer_numbers_beyond_float32_are_refused(make):
    """float32's inf: rows became NaN or -inf (or never moved again), nothing counted."""
    with pytest.raises(ValueError, match="within float32's range"):
        make()


def test_the_largest_float32_learning_rate_is_still_taken():
    assert de.optim.SGD(lr=3.4e38).lr == 3.4e38


def _adagrad_table():
    return de.DynamicTable(de.TableConfig(dim=2, optimizer=de.optim.Adagrad(lr=0.1)))


def test_negative_accumulators_are_refused_by_insert_or_assign():
    """A negative Adagrad sum of squares made the row NaN at its next update, uncounted."""
    table = _adagrad_table()
    with pytest.raises(ValueError, match="sums of squared gradients"):
        table.insert_or_assign([1], torch.ones(1, 2), optimizer_state=-torch.ones(1, 2))
    assert table.size() == 0
    table.insert_or_assign([1], torch.ones(1, 2), optimizer_state=torch.zeros(1, 2))
    assert table.size() == 1


@pytest.mark.parametrize("damage, match", [
    (lambda s: s["weights"].fill_(float("nan")), "'weights' holds NaN or inf"),
    (lambda s: s["weights"].fill_(float("inf")), "'weights' holds NaN or inf"),
    (lambda s: s["optimizer_state"].fill_(float("nan")), "'optimizer_state' holds NaN"),
    (lambda s: s["optimizer_state"].fill_(-1.0), "sums of squared gradients"),
    (lambda s: s["counters.inserts"].fill_(-3), "'counters.inserts' is -3"),
    (lambda s: s["meta"].__setitem__(3, -5), "step=-5"),
])
def test_a_state_dict_that_would_poison_training_is_refused(damage, match):
    table = _adagrad_table()
    table.insert_or_assign([1, 2], torch.ones(2, 2))
    state = {k: v.clone() for k, v in table.state_dict().items()}
    damage(state)
    other = _adagrad_table()
    other.insert_or_assign([7], torch.zeros(1, 2))
    with pytest.raises(de.StateDictError, match=match):
        other.load_state_dict(state)
    assert other.size() == 1  # unchanged


def test_overflowed_accumulators_still_load():
    """+inf is what a sum of squares overflows to; the kernels read it as float32's max."""
    table = _adagrad_table()
    table.insert_or_assign([1], torch.ones(1, 2))
    state = table.state_dict()
    state["optimizer_state"].fill_(float("inf"))
    other = _adagrad_table()
    other.load_state_dict(state)
    assert torch.isinf(other.export().optimizer_state).all()


def test_a_state_dict_that_is_not_a_dict_is_named():
    with pytest.raises(TypeError, match="state must be the dict of tensors"):
        _adagrad_table().load_state_dict(None)


@pytest.mark.parametrize("fn", [de.hash_strings, de.hash_bytes])
def test_hashing_one_key_alone_is_refused(fn):
    """``hash_strings("abc")`` hashed each character."""
    key = "abc" if fn is de.hash_strings else b"abc"
    with pytest.raises(TypeError, match="wrap it"):
        fn(key)
    with pytest.raises(TypeError, match="keys must be a list"):
        fn(None)
    assert fn([key]).shape == (1,)


def test_hashing_names_a_key_of_the_wrong_type():
    with pytest.raises(TypeError, match="keys must hold only str"):
        de.hash_strings(["a", 1])


def test_a_numpy_scalar_key_is_read_like_a_0d_array():
    emb = de.DynamicEmbedding(dim=4, seed=1)
    assert torch.equal(emb(np.int64(3)), emb(np.array(3)))
    with pytest.raises(de.KeyInputError, match="floating point"):
        emb(np.float32(3))


def test_prefetch_checks_keys_without_a_store_too():
    with pytest.raises(de.KeyInputError):
        de.DynamicEmbedding(dim=4).table.prefetch([1.0])


@pytest.mark.parametrize("values, match", [
    (None, r"values must be a \(1, 4\) float tensor"),
    (np.array([[None, 1, 2, 3]], dtype=object), r"values must be a \(1, 4\) float tensor"),
    ([["a", "b", "c", "d"]], r"values must be a \(1, 4\) float tensor"),
    (torch.ones(1, 4, device="meta"), "meta device"),
])
def test_insert_or_assign_of_values_that_are_not_numbers_names_them(values, match):
    table = de.DynamicEmbedding(dim=4).table
    with pytest.raises(TypeError, match=match):
        table.insert_or_assign([1], values)
    assert table.size() == 0


def test_set_sparse_lr_does_not_warn_again(recwarn):
    """It re-made the table's config, which repeated the config's warnings every call."""
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1),
                              eviction=de.policy.TTL(steps=10))
    recwarn.clear()
    for lr in (0.2, 0.3):
        de.set_sparse_lr(emb, lr)
    assert emb.table.config.optimizer.lr == 0.3
    assert not [w for w in recwarn if "evict_every" in str(w.message)]


@pytest.mark.parametrize("step", [None, "3", -1, 1.5, True, 2**63])
def test_checkpoint_steps_are_checked_in_maybe_save_and_save(tmp_path, step):
    """maybe_save(-1) returned None silently; save(2**70) named a directory that made every
    later save be refused as older."""
    manager = de.checkpoint.CheckpointManager(tmp_path, every_steps=1000)
    table = _adagrad_table()
    for call in (manager.maybe_save, manager.save):
        with pytest.raises(ValueError, match="step must be"):
            call(step, tables={"t": table})
    assert manager.checkpoints() == []


@pytest.mark.parametrize("call, arg", [
    (lambda: de.checkpoint.CheckpointManager(None), "directory"),
    (lambda: de.checkpoint.describe(None), "path"),
    (lambda: de.checkpoint.history(None), "directory"),
    (lambda: de.serving.open_package(None), "path"),
    (lambda: de.train.Runtime(checkpoint_dir=3), "checkpoint_dir"),
    (lambda: de.train.Runtime(progress_file=3), "progress_file"),
])
def test_paths_given_as_none_or_numbers_are_named(call, arg):
    with pytest.raises(TypeError, match=f"{arg} must be a str or os.PathLike"):
        call()


def test_an_empty_checkpoint_directory_is_not_the_current_one():
    with pytest.raises(ValueError, match="directory is empty"):
        de.checkpoint.CheckpointManager("")


@pytest.mark.parametrize("options, error, match", [
    ({"ddp": "no"}, TypeError, "ddp must be True or False"),
    ({"handle_sigterm": 0}, TypeError, "handle_sigterm must be True or False"),
    ({"backend": 3}, TypeError, "backend must be None"),
])
def test_runtime_options_are_checked(options, error, match):
    with pytest.raises(error, match=match):
        de.train.Runtime(**options)


def test_runtime_restore_checks_the_optimizer_before_training(tmp_path):
    """A sparse optimizer (or anything else) passed here failed only at the first
    checkpoint, after training steps had run."""
    with de.train.Runtime(tmp_path / "ckpt", every_steps=2) as rt:
        rt.prepare(de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1)))
        with pytest.raises(TypeError, match="optimizer must be the dense part's torch"):
            rt.restore(de.optim.SGD(lr=0.1))


@pytest.mark.parametrize("dropped", ["admission", ["admission", 3]])
def test_load_dropped_takes_a_list_of_names(tmp_path, dropped):
    """``dropped="admission"`` was read as its letters."""
    table = _adagrad_table()
    path = de.checkpoint.save(tmp_path / "c", tables={"t": table})
    with pytest.raises(TypeError, match="dropped must"):
        de.checkpoint.load(path, tables={"t": _adagrad_table()}, dropped=dropped)
    with pytest.raises(TypeError, match="strict must be True or False"):
        de.checkpoint.load(path, tables={"t": _adagrad_table()}, strict="no")


@pytest.mark.parametrize("options, error, match", [
    ({"preload": "no"}, TypeError, "preload must be True or False"),
    ({"management_auth": "no"}, TypeError, "management_auth must be True or False"),
    ({"max_request_bytes": True}, ValueError, "max_request_bytes must be an integer"),
    ({"batch_size": True}, ValueError, "batch_size must be an integer"),
    ({"max_batch_delay_ms": "5"}, ValueError, "max_batch_delay_ms must be a number"),
    ({"allow_custom_handlers": "ctr"}, TypeError, "single string 'ctr'"),
])
def test_server_options_are_checked(tmp_path, options, error, match):
    with pytest.raises(error, match=match):
        ServerConfig(model_store=str(tmp_path), **options)


def test_custom_handler_names_are_not_split_into_letters(tmp_path):
    """A str became a set of characters: packages named "c", "t" or "r" could run their own
    handler code."""
    with pytest.raises(TypeError, match="single string 'ctr'"):
        Registry(tmp_path, allow_custom_handlers="ctr")
    assert Registry(tmp_path, allow_custom_handlers=["ctr"]).allow_custom == {"ctr"}


def test_a_list_of_0d_tensors_says_how_to_pass_them():
    with pytest.raises(de.KeyInputError, match="0-d Tensor; pass the keys as one tensor"):
        de.DynamicEmbedding(dim=2)([torch.tensor(1), torch.tensor(2)])


@pytest.mark.parametrize("make", [lambda: de.DynamicEmbedding(dim=4),
                                  lambda: de.DynamicEmbeddingBag(dim=4)])
def test_a_table_module_refuses_the_meta_device(make):
    """``emb.to("meta")`` was accepted: lookups then inserted rows and returned meta
    outputs, and backward failed inside torch."""
    emb = make()
    with pytest.raises(RuntimeError, match="cannot move to the meta device"):
        emb.to("meta")
    assert emb.to(torch.float16)(torch.tensor([[1, 2]])).dtype == torch.float16  # unchanged


@pytest.mark.parametrize("query", [
    lambda emb, q: emb.table.top_k(q, k=2),
    lambda emb, q: de.sampled_softmax_loss(emb, q, torch.arange(2), num_sampled=3),
])
def test_meta_queries_are_named(query):
    """torch's "item() cannot be called on meta tensors" / "Cannot copy out of meta
    tensor" named neither the argument nor the fix."""
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1))
    emb(torch.arange(10))
    with pytest.raises(ValueError, match="on the meta device, which holds no values"):
        query(emb, torch.zeros(2, 4, device="meta"))


def test_sampled_softmax_takes_numpy_integers():
    """``num_sampled=np.int64(5)`` was "must be an int", a numpy seed a TypeError."""
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=0)
    emb(torch.arange(20))
    emb.eval()  # the same draws at every call (training steps draw anew)
    inputs = torch.ones(2, 4)
    numpy_args = de.sampled_softmax_loss(emb, inputs, torch.arange(2), num_sampled=np.int64(5),
                                         generator=np.int64(3))
    plain = de.sampled_softmax_loss(emb, inputs, torch.arange(2), num_sampled=5, generator=3)
    assert torch.equal(numpy_args, plain)
    with pytest.raises(TypeError, match="generator must be None"):
        de.sampled_softmax_loss(emb, inputs, torch.arange(2), num_sampled=5,
                                generator=np.bool_(True))
