"""The training runtime in one process: the loop, checkpoints, restore, SIGTERM."""

from __future__ import annotations

import json
import os
import random
import signal
import sys

import numpy as np
import pytest
import torch
from torch import nn

import dynembed as de
from dynembed.checkpoint.rows_file import RowsFile
from dynembed.distributed.process_group import JobEnv
from dynembed.train.runtime import Runtime


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=5)
        self.head = nn.Linear(4, 1)

    def forward(self, keys):
        return self.head(self.emb(keys)).squeeze(1)


def _train(rt: Runtime, model: nn.Module, opt, total: int, on_step=None) -> list[int]:
    done = []
    for step in rt.steps(total):
        keys = torch.from_numpy(rt.batch_indices(step, 8, 50) * 7 - 100)
        model(keys).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        done.append(step)
        if on_step is not None:
            on_step(step)
    return done


def _fresh(tmp_path, **options):
    rt = Runtime(tmp_path / "ckpt", **options).start()
    model = Tiny()
    net = rt.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return rt, model, net, opt


def test_alone_the_runtime_runs_the_loop_and_saves_every_n_steps(tmp_path):
    rt, model, net, opt = _fresh(tmp_path, every_steps=3)
    assert net is model and not rt.distributed  # nothing to wrap alone
    assert rt.restore(opt) == {} and rt.step == 0
    rt.extra["note"] = "kept"
    assert _train(rt, net, opt, 7) == list(range(7))
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step-0000000003", "step-0000000006", "step-0000000007"]
    rt.close()

    rt2, model2, _, opt2 = _fresh(tmp_path, every_steps=3)
    assert rt2.restore(opt2) == {"note": "kept"} and rt2.step == 7
    ids = model.emb.table.export().ids.numpy()
    np.testing.assert_array_equal(model2.emb.table.find(ids).values.numpy(),
                                  model.emb.table.find(ids).values.numpy())
    torch.testing.assert_close(model2.head.weight, model.head.weight)
    assert _train(rt2, model2, opt2, 9) == [7, 8]  # resumes at the restored step
    rt2.close()


def test_every_seconds_saves_when_the_interval_passed(tmp_path):
    rt, _, net, opt = _fresh(tmp_path, every_seconds=1e-9)
    rt.restore(opt)
    _train(rt, net, opt, 3)
    assert len(list((tmp_path / "ckpt").glob("step-*"))) == 3
    rt.close()


def test_sigterm_checkpoints_at_the_next_step_boundary_and_stops(tmp_path):
    rt, _, net, opt = _fresh(tmp_path, every_steps=100)
    rt.restore(opt)
    done = _train(rt, net, opt, 50,
                  on_step=lambda s: s == 4 and os.kill(os.getpid(), signal.SIGTERM))
    assert done == [0, 1, 2, 3, 4] and rt.preempted and rt.step == 5
    assert [p.name for p in (tmp_path / "ckpt").glob("step-*")] == ["step-0000000005"]
    rt.close()
    assert signal.getsignal(signal.SIGTERM) is not rt._on_sigterm  # handler given back


def test_restore_skips_a_damaged_checkpoint_for_the_one_before(tmp_path):
    rt, _, net, opt = _fresh(tmp_path, every_steps=2, max_chain=1)
    rt.restore(opt)
    _train(rt, net, opt, 4)
    rt.close()
    rows = next((tmp_path / "ckpt" / "step-0000000004").rglob("*.rows"))
    offset, size = RowsFile(str(rows)).layout.offsets["records"]
    data = bytearray(rows.read_bytes())
    data[offset + size // 2] ^= 0x01  # same size: only the block checksums can tell
    rows.write_bytes(bytes(data))
    rt2, _, net2, opt2 = _fresh(tmp_path, every_steps=2, max_chain=1, lazy_restore=False)
    rt2.restore(opt2)
    assert rt2.step == 2
    assert (tmp_path / "ckpt" / "step-0000000004.damaged").exists()
    _train(rt2, net2, opt2, 4)  # step 4 can be saved again
    assert (tmp_path / "ckpt" / "step-0000000004").exists()
    rt2.close()
    _damage(tmp_path / "ckpt" / "step-0000000004")  # the same step damaged a second time
    rt3, _, _, opt3 = _fresh(tmp_path, every_steps=2, max_chain=1, lazy_restore=False)
    rt3.restore(opt3)  # once: OSError, step-...4.damaged exists
    assert rt3.step == 2 and (tmp_path / "ckpt" / "step-0000000004.damaged-2").exists()
    rt3.close()


def test_restore_goes_on_when_a_damaged_checkpoint_cannot_be_set_aside(tmp_path, monkeypatch,
                                                                       caplog):
    """The rename fails (say, a read-only directory): the restore still falls back on the
    older checkpoint, and says why the damaged one stays where it is."""
    from dynembed.train import runtime

    rt, _, net, opt = _fresh(tmp_path, every_steps=2, max_chain=1)
    rt.restore(opt)
    _train(rt, net, opt, 4)
    rt.close()
    _damage(tmp_path / "ckpt" / "step-0000000004")

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runtime, "set_aside", refuse)
    rt2, _, _, opt2 = _fresh(tmp_path, every_steps=2, max_chain=1, lazy_restore=False)
    with caplog.at_level("WARNING", logger="dynembed.train.runtime"):
        rt2.restore(opt2)
    assert rt2.step == 2
    assert (tmp_path / "ckpt" / "step-0000000004").exists()
    assert "could not set" in caplog.text and "Permission denied" in caplog.text
    rt2.close()


def _damage(checkpoint) -> None:
    rows = next(checkpoint.rglob("*.rows"))
    offset, size = RowsFile(str(rows)).layout.offsets["records"]
    data = bytearray(rows.read_bytes())
    data[offset + size // 2] ^= 0x01  # same size: only the block checksums can tell
    rows.write_bytes(bytes(data))


def test_a_lazily_restored_checkpoint_found_damaged_in_training_is_set_aside(tmp_path):
    """A lazy restore checks rows as it reads them: the damage showed only in training, and
    every restart restored the same checkpoint and failed again."""
    rt, _, net, opt = _fresh(tmp_path, every_steps=2, max_chain=1)
    rt.restore(opt)
    _train(rt, net, opt, 4)
    rt.close()
    _damage(tmp_path / "ckpt" / "step-0000000004")
    with pytest.raises(de.CheckpointCorruptError), \
            Runtime(tmp_path / "ckpt", every_steps=2, max_chain=1) as rt:
        model = Tiny()
        net = rt.prepare(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rt.restore(opt)
        assert rt.step == 4  # restored lazily: the damage is not read yet
        _train(rt, net, opt, 8)
    assert (tmp_path / "ckpt" / "step-0000000004.damaged").exists()
    rt, _, net, opt = _fresh(tmp_path, every_steps=2, max_chain=1)  # the restart
    rt.restore(opt)
    assert rt.step == 2
    assert _train(rt, net, opt, 6) == [2, 3, 4, 5]
    rt.close()


def test_checkpoint_of_a_step_saved_already_returns_it(tmp_path):
    rt, _, net, opt = _fresh(tmp_path, every_steps=2)
    rt.restore(opt)
    _train(rt, net, opt, 3)  # the loop's last step is saved at its end
    assert rt.checkpoint() == tmp_path / "ckpt" / "step-0000000003"  # once FileExistsError
    rt.close()


def test_misuse_is_explained(tmp_path):
    with pytest.raises(ValueError, match="every_steps must be"):
        Runtime(tmp_path, every_steps=0)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        Runtime(tmp_path, timeout=None)
    with pytest.raises(ValueError, match="every_seconds needs world_size=1"):
        de.checkpoint.CheckpointManager(tmp_path / "m", every_seconds=60, world_size=2)
    for name in ("timeout", "every_seconds"):
        for bad in (float("nan"), float("inf")):  # once failed later, unnamed, or never fired
            with pytest.raises(ValueError, match=f"{name} must be a positive number"):
                Runtime(tmp_path, **{name: bad})
    with pytest.raises(ValueError, match="need checkpoint_dir"):
        Runtime(None, every_steps=5)
    # once accepted: the job trained, then failed at its first checkpoint or restart
    for options, message in (({"keep_last": 0}, "keep_last must be a positive int"),
                             ({"max_chain": None}, "max_chain must be a positive int"),

                             ({"background_rows": -5}, "background_rows must be an int >= 0"),
                             ({"num_buckets": 3}, "num_buckets must be a power of two")):
        with pytest.raises(ValueError, match=message):
            Runtime(tmp_path, **options)
    with pytest.raises(TypeError, match="lazy_restore must be True or False"):
        Runtime(tmp_path, lazy_restore="no")
    rt = Runtime(tmp_path)
    with pytest.raises(RuntimeError, match="not started"):
        rt.prepare(Tiny())
    rt.start()
    with pytest.raises(RuntimeError, match="prepare"):
        rt.restore()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        rt.prepare("model")
    with pytest.raises(ValueError, match="total must be"):
        next(rt.steps(-1))
    # float("0.5") took a string; a 2-element tensor gave torch's own words
    for bad in ("0.5", torch.ones(2), None):
        with pytest.raises(TypeError, match=r"log\(loss=...\) must be a number"):
            rt.log(auc=0.7, loss=bad)
    assert "auc" not in rt.metrics  # nothing recorded
    rt.log(loss=torch.tensor([0.25]), auc=np.float32(0.5))
    assert rt.metrics == {"loss": 0.25, "auc": 0.5}
    rt.close()


def test_job_env_reads_torchrun_variables():
    assert JobEnv.from_environ({}) == JobEnv()
    env = JobEnv.from_environ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0",
                               "TORCHELASTIC_RESTART_COUNT": "1"})
    assert (env.rank, env.world_size, env.restart_count, env.launched) == (2, 4, 1, True)
    with pytest.raises(ValueError, match="RANK must be an integer"):
        JobEnv.from_environ({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="do not describe a job"):
        JobEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2"})
    for key in ("LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):  # once taken as they were
        with pytest.raises(ValueError, match=f"{key} must be >= 0, got -1"):
            JobEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2", key: "-1"})


def _uninterrupted(folder, steps: int) -> nn.Module:
    """The model of a run that trains ``steps`` steps without stopping (the reference)."""
    torch.manual_seed(0)  # the same head as the run compared with it
    rt, model, net, opt = _fresh(folder, every_steps=100)
    rt.restore(opt)
    _train(rt, net, opt, steps)
    rt.close()
    torch.manual_seed(0)
    return model


def _assert_same_model(got: nn.Module, want: nn.Module) -> None:
    torch.testing.assert_close(got.head.weight, want.head.weight)
    ids = want.emb.table.export().ids.numpy()
    np.testing.assert_array_equal(got.emb.table.find(ids).values.numpy(),
                                  want.emb.table.find(ids).values.numpy())


def test_stop_ends_the_loop_after_counting_and_saving_the_step(tmp_path, caplog):
    """After a break, rt.step was still the step whose update had run: a checkpoint then
    held that update under the step before, and the resumed run trained the batch twice.
    rt.stop() counts and saves the step; a break leaves it uncounted (a zip with a data
    loader that ran out drops a step that never ran) and a checkpoint after it warns."""
    model = _uninterrupted(tmp_path / "a", 7)
    rt, _, net, opt = _fresh(tmp_path / "b", every_steps=100)
    rt.restore(opt)
    assert _train(rt, net, opt, 7, on_step=lambda s: s == 3 and rt.stop()) == [0, 1, 2, 3]
    assert rt.step == 4 and not rt.preempted
    assert [p.name for p in (tmp_path / "b" / "ckpt").iterdir()] == ["step-0000000004"]
    rt.close()
    rt, resumed, net, opt = _fresh(tmp_path / "b", every_steps=100)
    rt.restore(opt)
    assert _train(rt, net, opt, 7) == [4, 5, 6]
    rt.close()
    _assert_same_model(resumed, model)

    rt, _, net, opt = _fresh(tmp_path / "c", every_steps=100)
    rt.restore(opt)
    for step, _batch in zip(rt.steps(7), range(3)):  # the loader runs out after 3
        pass
    assert rt.step == 3  # step 3 was pulled by zip and never ran
    with caplog.at_level("WARNING", logger="dynembed.train.runtime"):
        rt.checkpoint()
    assert "the loop was left in it" in caplog.text
    rt.close()


def test_a_checkpoint_dir_that_cannot_be_written_is_refused_at_start():
    """It was found at the first save, after the training (and under torchrun again after
    every restart). /proc/self is a directory no one may write, root included."""
    with pytest.raises(PermissionError, match="checkpoint_dir /proc/self: cannot write"):
        Runtime("/proc/self", every_steps=2).start()


def test_the_progress_file_shows_every_checkpointed_step(tmp_path):
    """Writes were throttled to one per 0.5 s and a checkpoint forced none: a job that
    failed after saving step 5 said step 0, still running."""
    progress = tmp_path / "progress.json"
    rt = Runtime(tmp_path / "ckpt", every_steps=2, progress_file=progress).start()
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rt.prepare(model)
    rt.restore(opt)
    seen = []
    with pytest.raises(RuntimeError, match="boom"), rt:
        for step in rt.steps(10):
            model(torch.tensor([step])).sum().backward()
            seen.append(json.loads(progress.read_text())["step"])
            if step == 6:
                raise RuntimeError("boom")
    assert (seen[2], seen[4], seen[6]) == (2, 4, 6)  # each saved step shown at once
    final = json.loads(progress.read_text())
    assert final["state"] == "failed" and final["step"] == 6  # step 6 did not complete


def test_a_checkpoint_asked_inside_a_step_is_saved_at_its_end(tmp_path):
    """rt.checkpoint() in the loop's body, after the update, saved it under the step's own
    number: the resumed job trained that batch a second time. Now the save waits for the
    end of the step, and the resumed job ends with the weights of a job never stopped."""
    model = _uninterrupted(tmp_path / "a", 6)
    rt, _, net, opt = _fresh(tmp_path / "b", every_steps=100)
    rt.restore(opt)
    asked = []
    with pytest.raises(RuntimeError, match="crash"):
        for step in rt.steps(6):
            if step == 4:
                raise RuntimeError("crash")  # before step 4's update
            keys = torch.from_numpy(rt.batch_indices(step, 8, 50) * 7 - 100)
            net(keys).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step == 2:
                asked.append(rt.checkpoint())  # after the update of step 2
    rt.close()
    assert asked == [None]
    assert [p.name for p in (tmp_path / "b" / "ckpt").iterdir()] == ["step-0000000003"]
    rt, resumed, net, opt = _fresh(tmp_path / "b", every_steps=100)
    rt.restore(opt)
    assert rt.step == 3 and _train(rt, net, opt, 6) == [3, 4, 5]
    rt.close()
    _assert_same_model(resumed, model)


def _seed_everything(seed: int) -> None:
    """What a training script does at its top, on every start and restart."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _draws() -> list:
    """Numbers a step draws from the global generators (dropout, sampled negatives)."""
    return [*torch.rand(2).tolist(), *np.random.rand(2).tolist(), random.random(),
            random.gauss(0, 1), float(np.random.normal())]


def test_a_resumed_job_draws_the_random_numbers_of_a_job_never_stopped(tmp_path):
    """The checkpoint held no random generator state: the restarted script seeded them as at
    step 0, so step 3 after a resume drew step 0's dropout masks and negatives again."""
    def run(folder, total, seen):
        rt, _, _, opt = _fresh(folder, every_steps=3)
        rt.restore(opt)
        for step in rt.steps(total):
            seen[step] = _draws()
        rt.close()

    whole, resumed = {}, {}
    _seed_everything(7)
    run(tmp_path / "a", 6, whole)
    _seed_everything(7)
    run(tmp_path / "b", 3, resumed)
    _seed_everything(7)  # the restarted script
    run(tmp_path / "b", 6, resumed)
    assert sorted(resumed) == list(range(6))
    assert resumed == whole


@pytest.mark.parametrize("variables, message", [
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"},
     "MASTER_PORT must be an integer in 1..65535, got 'abc'"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
     "MASTER_PORT must be an integer in 1..65535, got '99999'"),
    ({"MASTER_PORT": "29500"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "two"},  # no process group to start
     "LOCAL_WORLD_SIZE must be an integer >= 1, got 'two'"),
])
def test_a_malformed_launcher_environment_is_named(monkeypatch, variables, message):
    """torch took MASTER_PORT=abc (or 99999) with an error naming no variable, and a bad
    LOCAL_WORLD_SIZE failed in int() after the process group had started."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        Runtime(None, timeout=5).start()
    assert not torch.distributed.is_initialized()  # nothing started, nothing left


def test_a_damaged_newer_checkpoint_is_set_aside_and_the_restored_one_kept(tmp_path):
    """The error of a damaged file in a checkpoint saved after the (lazy) restore, as a
    delta save of several ranks raises when it reads its parent, once had the sound
    restored checkpoint set aside (and deleted later) while the damaged one stayed newest."""
    rt, _, net, opt = _fresh(tmp_path, every_steps=2, max_chain=1)
    rt.restore(opt)
    _train(rt, net, opt, 4)
    rt.close()
    newer = tmp_path / "ckpt" / "step-0000000006"
    with pytest.raises(de.CheckpointCorruptError), \
            Runtime(tmp_path / "ckpt", every_steps=2, max_chain=1) as rt:
        model = Tiny()
        net = rt.prepare(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rt.restore(opt)
        assert rt.step == 4  # restored lazily from step 4
        _train(rt, net, opt, 6)  # saves step 6
        rows = next(newer.rglob("*.rows"))
        rows.write_bytes(rows.read_bytes()[:-8])
        RowsFile(str(rows))  # a save reading its parent finds the damage
    assert (tmp_path / "ckpt" / "step-0000000006.damaged").exists()
    assert (tmp_path / "ckpt" / "step-0000000004").exists()
    rt, _, net, opt = _fresh(tmp_path, every_steps=2, max_chain=1)  # the restart
    rt.restore(opt)
    assert rt.step == 4
    rt.close()


def test_a_damage_outside_the_job_sets_nothing_aside(tmp_path):
    rt, _, net, opt = _fresh(tmp_path, every_steps=2, max_chain=1)
    rt.restore(opt)
    _train(rt, net, opt, 2)
    rt.close()
    other = tmp_path / "elsewhere.rows"
    other.write_bytes(next((tmp_path / "ckpt").rglob("*.rows")).read_bytes()[:-8])
    with pytest.raises(de.CheckpointCorruptError), \
            Runtime(tmp_path / "ckpt", every_steps=2, max_chain=1) as rt:
        model = Tiny()
        rt.prepare(model)
        rt.restore(torch.optim.SGD(model.parameters(), lr=0.1))
        RowsFile(str(other))  # e.g. a file the script opened itself
    assert (tmp_path / "ckpt" / "step-0000000002").exists()


def test_training_with_checkpoints_needs_restore_first(tmp_path):
    """Forgetting rt.restore(opt) went unnoticed: the checkpoints held no optimizer state
    (so the resume that passed one was refused), and with checkpoints there the job started
    again at step 0 and failed at its first save, after training."""
    rt, _, net, opt = _fresh(tmp_path, every_steps=2)
    with pytest.raises(RuntimeError, match=r"call rt\.restore\(optimizer\) before training"):
        next(rt.steps(4))
    with pytest.raises(RuntimeError, match=r"call rt\.restore\(optimizer\)"):
        rt.checkpoint()
    assert not list((tmp_path / "ckpt").glob("step-*"))
    rt.restore(opt)  # a fresh run: finds nothing, starts at 0
    assert _train(rt, net, opt, 2) == [0, 1]
    rt.close()
    alone = Runtime().start()  # no checkpoints: nothing to restore, no need to
    alone.prepare(Tiny())
    assert list(alone.steps(2)) == [0, 1]
    alone.close()


def test_exiting_after_a_preemption_reports_preempted_not_failed(tmp_path):
    """The docs suggest sys.exit(143) when rt.preempted; the progress file then said
    "failed" after every clean stop."""
    progress = tmp_path / "progress.json"
    with pytest.raises(SystemExit), \
            Runtime(tmp_path / "ckpt", every_steps=100, progress_file=progress) as rt:
        model = Tiny()
        net = rt.prepare(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rt.restore(opt)
        _train(rt, net, opt, 50, on_step=lambda s: s == 2 and os.kill(os.getpid(),
                                                                        signal.SIGTERM))
        assert rt.preempted
        sys.exit(143)
    assert json.loads(progress.read_text())["state"] == "preempted"
    with pytest.raises(SystemExit), \
            Runtime(tmp_path / "ckpt2", every_steps=100, progress_file=progress) as rt:
        rt.prepare(Tiny())
        rt.restore()
        sys.exit(1)  # not after a preemption: a failure
    assert json.loads(progress.read_text())["state"] == "failed"


def test_the_dense_part_in_ddp_leaves_the_tables_anchors_out(tmp_path):
    """The anchors are Parameters (so freezing a model freezes its tables); one that got no
    gradient in a step, as a dynembed module in eval mode gives none, stopped
    DistributedDataParallel at the next step."""
    import torch.distributed as dist

    from dynembed.train.runtime import wrap_dense_part

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = nn.Sequential(de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1)),
                              nn.Linear(4, 1))
        model[0].eval()  # a read: no gradient reaches the anchor
        ddp = wrap_dense_part(model)
        for _ in range(3):
            ddp(torch.tensor([1, 2])).sum().backward()
        assert model[1].weight.grad is not None
        plain = nn.parallel.DistributedDataParallel(
            nn.Sequential(de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1)).eval(),
                          nn.Linear(4, 1)))
        with pytest.raises(RuntimeError, match="not used in producing loss"):
            for _ in range(3):  # the failure the wrapper avoids
                plain(torch.tensor([1, 2])).sum().backward()
    finally:
        dist.destroy_process_group()
