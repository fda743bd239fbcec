"""CheckpointManager: schedule, full/delta choice, compaction, retention, latest good one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import dynembed as de
from dynembed.checkpoint import manifest as mf

from .helpers import assert_same_rows, batches, make_table, train


def kinds(manager):
    return [(p.name, mf.read(p)["kind"]) for p in manager.checkpoints()]


def test_saves_full_then_deltas_and_compacts_long_chains(tmp_path):
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=10, max_chain=3)
    table = make_table()
    for step in range(1, 6):
        train(table, batches(2, 1000, seed=step))
        manager.save(step, tables={"t": table}, extra={"step": step})
    assert kinds(manager) == [("step-0000000001", "full"), ("step-0000000002", "delta"),
                              ("step-0000000003", "delta"), ("step-0000000004-full", "full"),
                              ("step-0000000005", "delta")]
    restored = make_table()
    assert manager.restore(tables={"t": restored}) == {"step": 5}
    assert_same_rows(table, restored)



def test_small_files_of_older_links_are_not_read_nor_a_reason_to_fall_back(tmp_path):
    """The newest link's dense and aux files are the ones a restore reads (the older links
    give rows, checked block by block): every link's were CRC-checked at each save, and one
    damaged in an older link made the newest count as damaged too."""
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=10, max_chain=10)
    table = make_table(key_log=True)
    for step in (1, 2):
        train(table, batches(2, 1000, seed=step))
        manager.save(step, tables={"t": table}, extra={"step": step})
    first = manager.checkpoints()[0]
    aux = next(first.glob("tables/t/*.aux.pt"))
    data = bytearray(aux.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, another CRC
    aux.write_bytes(bytes(data))
    assert manager.latest() == manager.checkpoints()[1]
    restored = make_table(key_log=True)
    assert manager.restore(tables={"t": restored}) == {"step": 2}
    assert_same_rows(table, restored)
    de.checkpoint.compact(manager.checkpoints()[1], tmp_path / "compacted")
    with pytest.raises(de.CheckpointCorruptError, match="CRC-32"):  # its own are checked
        de.checkpoint.load(first, tables={"t": make_table(key_log=True)})


def test_a_step_saved_again_after_its_compaction_is_refused(tmp_path):
    """step-N was accepted beside step-N-full, and restore then took step-N-full (the
    older state): the MovieLens example's --resume failed on every try."""
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=10, max_chain=2)
    table = make_table()
    for step in (1, 2, 3):
        train(table, batches(1, 100, seed=step))
        manager.save(step, tables={"t": table}, extra={"step": step})
    assert manager.latest().name == "step-0000000003-full"
    with pytest.raises(FileExistsError, match="step-0000000003-full exists"):
        manager.save(3, tables={"t": table}, extra={"newer": True})
    assert [p.name for p in manager.checkpoints()][-1] == "step-0000000003-full"
    assert manager.restore(tables={"t": make_table()}) == {"step": 3}

def test_keep_last_keeps_the_chains_it_needs(tmp_path):
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=2, max_chain=100)
    table = make_table()
    for step in range(1, 5):
        train(table, batches(1, 100, seed=step))
        manager.save(step, tables={"t": table})
    # steps 3 and 4 are kept, and the base and delta they are chained to
    assert [p.name for p in manager.checkpoints()] == [f"step-000000000{i}" for i in (1, 2, 3, 4)]
    table.clear()  # the next save must be full: the old chain is no longer needed
    manager.save(5, tables={"t": table})
    manager.save(6, tables={"t": table})
    assert [p.name for p in manager.checkpoints()] == ["step-0000000005", "step-0000000006"]


def test_maybe_save_follows_the_step_schedule(tmp_path):
    manager = de.checkpoint.CheckpointManager(tmp_path, every_steps=3)
    table = make_table()
    saved = [step for step in range(1, 11)
             if manager.maybe_save(step, tables={"t": table}) is not None]
    assert saved == [3, 6, 9]


def test_latest_skips_damaged_checkpoints_and_partial_ones_are_cleaned(tmp_path):
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=5, max_chain=1)
    table = make_table()
    train(table, batches(2, 500))
    manager.save(1, tables={"t": table})
    train(table, batches(2, 500, seed=3))
    manager.save(2, tables={"t": table})
    rows = next((tmp_path / "step-0000000002").glob("tables/t/*.rows"))
    rows.write_bytes(rows.read_bytes()[:-10])  # truncated after the commit
    (tmp_path / "step-0000000003.partial").mkdir()  # a crash in the middle of a save
    assert manager.latest() == tmp_path / "step-0000000001"
    manager.cleanup()
    assert not (tmp_path / "step-0000000003.partial").exists()


def test_restore_of_an_empty_directory_is_a_fresh_start(tmp_path):
    manager = de.checkpoint.CheckpointManager(tmp_path)
    assert manager.restore(tables={"t": make_table()}) is None


@pytest.mark.parametrize("options,match", [
    ({"keep_last": 0}, "keep_last"), ({"every_steps": -1}, "every_steps"),
    ({"every_seconds": 0}, "every_seconds"), ({"max_chain": True}, "max_chain"),
    # these were accepted and failed at the first save (hours later), or never saved
    ({"every_seconds": float("nan")}, "every_seconds"),
    ({"every_seconds": float("inf")}, "every_seconds"),
    ({"rank": 5, "world_size": 2}, "rank"), ({"world_size": 0}, "world_size"),
    ({"num_buckets": 3}, "num_buckets")])
def test_bad_manager_options_name_the_argument(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        de.checkpoint.CheckpointManager(tmp_path, **options)


def test_a_step_before_the_newest_checkpoint_is_refused(tmp_path):
    """Retention keeps the newest steps: a new run counting from 1 in the same directory
    had each save deleted at once by its own cleanup (save returned a path that was gone,
    and a restart went back to the old run's step)."""
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=2)
    table = make_table()
    train(table, batches(1, 100))
    manager.save(100, tables={"t": table})
    manager.save(200, tables={"t": table})
    with pytest.raises(ValueError, match="step=1 is before the newest checkpoint"):
        manager.save(1, tables={"t": table})
    assert [p.name for p in manager.checkpoints()] == ["step-0000000100", "step-0000000200"]
    assert manager.save(np.int64(300), tables={"t": table}).name == "step-0000000300"


def test_a_save_after_a_fallback_below_a_damaged_newer_checkpoint_is_kept(tmp_path):
    """A job of several ranks does not set a damaged checkpoint aside: after resuming from
    the step before it, each save ranked below it, and keep_last deleted it at once."""
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=1)
    table = make_table()
    train(table, batches(1, 100))
    manager.save(100, tables={"t": table})
    newer = manager.save(200, tables={"t": table})
    (newer / mf.read(newer)["tables"]["t"]["shards"][0]["aux"]).write_bytes(b"damaged")
    assert manager.latest().name == "step-0000000100"
    saved = manager.save(150, tables={"t": table})
    assert saved.exists() and manager.latest() == saved


def test_ranks_that_fell_back_from_damaged_rows_save_again(tmp_path):
    """With several ranks a checkpoint whose rows turn out damaged is not set aside, and
    latest() (which reads no rows) still named it: every save after the fallback was
    refused as older than it."""
    import torch

    def model():
        emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1,
                                  placement="replicated")
        emb.table.find_or_insert(torch.arange(5000))
        return emb

    models = [model(), model()]
    managers = [de.checkpoint.CheckpointManager(tmp_path, rank=r, world_size=2, keep_last=3)
                for r in (0, 1)]
    for step in (80, 90, 100):
        for manager, emb in zip(managers, models):
            manager.save(step, emb, extra={"step": step})
    rows = max((tmp_path / "step-0000000100").rglob("*.rows"), key=lambda p: p.stat().st_size)
    data = bytearray(rows.read_bytes())
    for at in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):  # inside row blocks
        data[at] ^= 0xFF
    rows.write_bytes(bytes(data))
    assert [m.restore(e) for m, e in zip(managers, models)] == [{"step": 90}] * 2
    assert managers[0].latest().name == "step-0000000090"
    saved = [m.save(95, e, extra={"step": 95}) for m, e in zip(managers, models)]
    assert saved[1].name == "step-0000000095" and managers[1].latest() == saved[1]


def test_maybe_save_without_a_schedule_is_an_error(tmp_path):
    manager = de.checkpoint.CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="maybe_save never saves without every_steps"):
        manager.maybe_save(1, tables={"t": make_table()})


def test_a_restored_table_continues_the_delta_chain(tmp_path):
    manager = de.checkpoint.CheckpointManager(tmp_path, max_chain=10)
    table = make_table()
    train(table, batches(3, 1000))
    manager.save(1, tables={"t": table})
    restarted = make_table()
    manager = de.checkpoint.CheckpointManager(tmp_path, max_chain=10)
    manager.restore(tables={"t": restarted}, lazy=True)
    train(restarted, batches(2, 1000, seed=8))
    manager.save(2, tables={"t": restarted})
    assert mf.read(tmp_path / "step-0000000002")["kind"] == "delta"
    check = make_table()
    de.checkpoint.load(tmp_path / "step-0000000002", tables={"t": check})
    assert_same_rows(restarted, check)
    assert np.array_equal(np.sort(check.export().ids.numpy()),
                          np.sort(restarted.export().ids.numpy()))


def _two_checkpoints(tmp_path):
    """A manager's steps 1 and 2 (full checkpoints) of a trained table, and the table as
    step 1 loads it."""
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=5, max_chain=1)
    table = make_table()
    train(table, batches(2, 500))
    manager.save(1, tables={"t": table}, extra={"step": 1})
    first = make_table()
    de.checkpoint.load(tmp_path / "step-0000000001", tables={"t": first})
    train(table, batches(2, 500, seed=3))
    manager.save(2, tables={"t": table}, extra={"step": 2})
    return manager, first


def test_restore_falls_back_on_an_older_checkpoint_when_rows_are_damaged(tmp_path):
    manager, first = _two_checkpoints(tmp_path)
    _flip_a_records_byte(next((tmp_path / "step-0000000002").glob("tables/t/*.rows")))
    assert manager.latest() == tmp_path / "step-0000000002"
    restored = make_table()
    assert manager.restore(tables={"t": restored}) == {"step": 1}
    assert_same_rows(first, restored)
    assert (tmp_path / "step-0000000002.damaged").exists()  # kept aside, so that step 2
    assert [h["step"] for h in de.checkpoint.history(tmp_path)] == [1]  # and not listed
    train(restored, batches(2, 500, seed=3))                 # can be saved again
    assert manager.save(2, tables={"t": restored}) == tmp_path / "step-0000000002"


def test_damage_a_lazy_restore_reads_in_training_is_not_restored_again(tmp_path):
    """A lazy restore checks rows only as it reads them: training failed at the damaged
    block, and every restart with a plain manager restored the same checkpoint and failed
    at the same read again."""
    _, first = _two_checkpoints(tmp_path)
    rows = next((tmp_path / "step-0000000002").glob("tables/t/*.rows"))
    _flip_a_records_byte(rows)
    lazy = make_table()
    assert de.checkpoint.CheckpointManager(tmp_path).restore(
        tables={"t": lazy}, lazy=True) == {"step": 2}  # its blocks are not read yet
    with pytest.raises(de.CheckpointCorruptError, match="checksum"):
        lazy.export()  # reads every row: the damaged block too
    assert rows.with_name(rows.name + mf.DAMAGE_MARK).exists()
    with pytest.raises(de.CheckpointCorruptError, match="found damaged when it was read"):
        mf.check_chain(mf.chain(tmp_path / "step-0000000002"))

    restarted = make_table()
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=5, max_chain=1)
    assert manager.restore(tables={"t": restarted}, lazy=True) == {"step": 1}
    assert_same_rows(first, restarted)
    assert (tmp_path / "step-0000000002.damaged").exists()
    train(restarted, batches(2, 500, seed=3))  # and step 2 can be saved again
    assert manager.save(2, tables={"t": restarted}) == tmp_path / "step-0000000002"


def _flip_a_records_byte(rows: Path) -> None:
    """Damages a block of a rows file's records, keeping its size (only the block's
    checksum can tell)."""
    from dynembed.checkpoint.rows_file import RowsFile

    offset, size = RowsFile(str(rows)).layout.offsets["records"]
    data = bytearray(rows.read_bytes())
    data[offset + size // 2] ^= 0x01
    rows.write_bytes(bytes(data))


def test_steps_past_ten_digits_are_found(tmp_path):
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=2)
    table = make_table()
    train(table, batches(1, 100))
    manager.save(9_999_999_999, tables={"t": table})
    path = manager.save(10**10, tables={"t": table})
    assert path.name == "step-10000000000" and manager.latest() == path
    assert [p.name for p in manager.checkpoints()] == ["step-9999999999", "step-10000000000"]


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    manager = de.checkpoint.CheckpointManager(tmp_path)
    table = make_table()
    train(table, batches(2, 500))
    manager.save(1, tables={"t": table})
    _flip_a_records_byte(next((tmp_path / "step-0000000001").glob("tables/t/*.rows")))
    with pytest.raises(de.CheckpointCorruptError, match="every checkpoint"):
        manager.restore(tables={"t": make_table()})
    assert manager.checkpoints() == []


def test_checkpoints_set_aside_as_damaged_go_once_older_than_every_kept_one(tmp_path):
    from dynembed.checkpoint.manager import set_aside

    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=2, max_chain=1)
    table = make_table()
    train(table, batches(1, 100))
    manager.save(1, tables={"t": table})
    for _ in range(2):  # step 2 found damaged twice, saved again each time
        manager.save(2, tables={"t": table})
        set_aside(tmp_path / "step-0000000002")
    manager.save(2, tables={"t": table})
    (tmp_path / "notes").mkdir()  # not the manager's: never touched
    (tmp_path / "step-0000000001.damaged.txt").write_text("a user's file")
    aside = ["step-0000000002.damaged", "step-0000000002.damaged-2"]
    assert sorted(p.name for p in tmp_path.glob("*.damaged*") if p.is_dir()) == aside
    manager.save(3, tables={"t": table})  # kept: 2 and 3; the set-aside step 2 stays
    assert all((tmp_path / name).is_dir() for name in aside)
    manager.save(4, tables={"t": table})  # kept: 3 and 4; step 2 is out of the window
    assert not any((tmp_path / name).exists() for name in aside)
    assert (tmp_path / "notes").is_dir()
    assert (tmp_path / "step-0000000001.damaged.txt").read_text() == "a user's file"
    assert [p.name for p in manager.checkpoints()] == ["step-0000000003", "step-0000000004"]


def test_set_aside_checkpoints_stay_while_nothing_else_loads(tmp_path):
    from dynembed.checkpoint.manager import set_aside

    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=1)
    table = make_table()
    train(table, batches(1, 100))
    manager.save(1, tables={"t": table})
    set_aside(tmp_path / "step-0000000001")
    assert manager.cleanup() == []  # the only evidence of what went wrong
    assert (tmp_path / "step-0000000001.damaged").is_dir()


def test_latest_never_goes_back_while_a_compaction_replaces_the_newest(tmp_path, monkeypatch):
    """latest() listed step-N, found it half deleted by the compaction that had just written
    step-N-full, and fell back to step-(N-1): a server following the directory swapped
    the older tables in."""
    import shutil

    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=10, max_chain=10)
    table = make_table()
    for step in (1, 2):
        train(table, batches(1, 100, seed=step))
        manager.save(step, tables={"t": table}, extra={"step": step})
    newest = tmp_path / "step-0000000002"
    check_files, compacting = mf.check_files, []

    def compacted_meanwhile(folder, manifest, **options):
        if folder == newest and not compacting:  # the compaction runs now
            compacting.append(True)
            de.checkpoint.compact(newest, tmp_path / "step-0000000002-full")
            shutil.rmtree(newest)
            raise de.CheckpointCorruptError(f"{newest}: a file is missing")
        return check_files(folder, manifest, **options)

    monkeypatch.setattr(mf, "check_files", compacted_meanwhile)
    assert manager.latest() == tmp_path / "step-0000000002-full"


def test_a_follower_moves_to_newer_steps_and_back_only_when_its_run_is_gone(tmp_path):
    from dynembed.serving.server import _behind

    c = tmp_path / "c"
    for name in ("step-0000000005", "step-0000000006"):
        (c / name).mkdir(parents=True)
    latest = c / "step-0000000005"
    assert _behind(None, latest) and _behind(str(c / "step-0000000004-full"), latest)
    assert not _behind(str(latest), latest)
    assert not _behind(str(c / "step-0000000006"), latest)  # a listing that lagged: not back
    assert _behind(str(latest), c / "step-0000000005-full")  # the same state, compacted
    assert not _behind(str(c / "step-0000000005-full"), latest)  # whose delta is deleted
    assert _behind("/elsewhere/model.pt", latest)  # not a step: follow the directory
    # the run started over: the step served is gone (with no compacted copy), and the
    # server once kept its tables until the new run passed that step
    (c / "step-0000000006").rmdir()
    assert _behind(str(c / "step-0000000006"), latest)
    (c / "step-0000000006-full").mkdir()  # ... unless a compaction replaced it
    assert not _behind(str(c / "step-0000000006"), latest)


def test_a_delta_whose_parent_is_gone_is_set_aside_so_its_step_can_be_saved_again(tmp_path):
    """restore() skipped a delta whose parent was gone (deleted by hand, lost with a disk)
    but left it in place: the training that resumed from an older checkpoint then failed
    with FileExistsError when it reached that step again, at every restart."""
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=5)
    table = make_table()
    for step in (1, 2, 3):
        train(table, batches(1, 500, seed=step))
        manager.save(step, tables={"t": table}, extra={"step": step})
    shutil.rmtree(tmp_path / "step-0000000002")  # step 3's parent
    restored = make_table()
    resumed = de.checkpoint.CheckpointManager(tmp_path, keep_last=5)
    assert resumed.restore(tables={"t": restored}) == {"step": 1}
    assert (tmp_path / "step-0000000003.damaged").is_dir()  # kept for inspection
    for step in (2, 3):
        train(restored, batches(1, 500, seed=step))
        assert resumed.save(step, tables={"t": restored}, extra={"step": step}) is not None
    again = make_table()
    assert de.checkpoint.CheckpointManager(tmp_path).restore(tables={"t": again}) == {"step": 3}
    assert_same_rows(table, again)
    # every checkpoint unloadable: an error, not a fresh start over them
    shutil.rmtree(tmp_path / "step-0000000001")
    for path in tmp_path.glob("step-*-full"):
        shutil.rmtree(path)
    with pytest.raises(de.CheckpointCorruptError, match="every checkpoint"):
        de.checkpoint.CheckpointManager(tmp_path).restore(tables={"t": make_table()})


def test_a_save_on_a_damaged_latest_checkpoint_is_made_in_full(tmp_path):
    """The delta save reads the latest checkpoint's rows (to count the live rows): damaged
    ones made every later save fail with advice to load an earlier checkpoint, so training
    could not checkpoint again until a restart."""
    table = make_table()
    train(table, batches(5, 5000, size=2000))
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=3)
    manager.save(1, tables={"t": table})
    rows = next((tmp_path / "step-0000000001" / "tables" / "t").glob("*.rows"))
    damaged = bytearray(rows.read_bytes())
    damaged[8192 + 100] ^= 0xFF  # same size: found only when read
    rows.write_bytes(bytes(damaged))
    train(table, batches(1, 5000, size=2000, seed=9))
    second = manager.save(2, tables={"t": table})
    assert mf.read(second)["kind"] == "full"
    train(table, batches(1, 5000, size=2000, seed=10))
    third = manager.save(3, tables={"t": table})
    assert mf.read(third)["kind"] == "delta"  # on the full one
    restored = make_table()
    de.checkpoint.load(third, tables={"t": restored})
    assert_same_rows(restored, table)


def test_latest_step_says_whether_a_step_was_saved(tmp_path):
    """A second save of a step raises; latest_step() tells a loop that maybe_save saved it
    already (examples parsed the directory name for it), compacted ones included."""
    manager = de.checkpoint.CheckpointManager(tmp_path, every_steps=2, max_chain=1)
    assert manager.latest_step() is None
    table = make_table()
    for step in range(1, 6):
        train(table, batches(1, 100, seed=step))
        manager.maybe_save(step, tables={"t": table})
        assert manager.latest_step() == (None if step == 1 else step - step % 2)
    compacting = de.checkpoint.CheckpointManager(tmp_path / "c", max_chain=2)
    for step in range(1, 4):  # full, delta, then the chain compacted: step-3-full
        compacting.save(step, tables={"t": table})
    assert compacting.latest().name == "step-0000000003-full"
    assert compacting.latest_step() == 3
    with pytest.raises(FileExistsError, match="latest_step"):
        compacting.save(3, tables={"t": table})


def test_a_deletion_cut_short_is_finished_by_the_next_cleanup(tmp_path, monkeypatch):
    """rmtree is not atomic: a crash after it had removed an old checkpoint's manifest left
    a step-N directory that no listing showed and no cleanup removed (and that made a
    later save of step N fail)."""
    import dynembed.checkpoint.manager as manager_module

    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=1, max_chain=1)
    table = make_table()
    train(table, batches(2, 500))
    manager.save(1, tables={"t": table})

    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        if "step-0000000001" not in str(path):  # the save's own staging
            return real_rmtree(path, ignore_errors=ignore_errors)
        (Path(path) / mf.MANIFEST).unlink()
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(manager_module.shutil, "rmtree", killed_midway)
    train(table, batches(2, 500, seed=3))
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, tables={"t": table})  # committed, then its cleanup is cut short
    monkeypatch.undo()

    restarted = de.checkpoint.CheckpointManager(tmp_path, keep_last=1, max_chain=1)
    assert [p.name for p in restarted.checkpoints()] == ["step-0000000002"]
    restarted.cleanup()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000000002"]


def test_cleanup_removes_a_step_directory_without_its_manifest(tmp_path):
    """What an older version's interrupted deletion left: a committed directory always has
    its manifest (it is renamed into place complete), so one without is debris."""
    manager = de.checkpoint.CheckpointManager(tmp_path, keep_last=2)
    manager.save(3, tables={"t": make_table()})
    (tmp_path / "step-0000000001" / "tables").mkdir(parents=True)
    assert tmp_path / "step-0000000001" in manager.cleanup()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000000003"]
    manager.save(4, tables={"t": make_table()})
