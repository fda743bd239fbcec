"""The command line answers bad arguments with one line naming them, never a traceback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from dynembed.cli import main
from tests.serving.helpers import write_package


def _dynembed(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynembed", *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=cwd)


def _error_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    write_package(folder)
    return folder


def test_inspect_of_a_missing_path_or_a_model_package(tmp_path, store):
    line = _error_line(_dynembed("inspect", str(tmp_path / "absent")), 2)
    assert line == f"error: checkpoint {tmp_path / 'absent'}: no such directory"
    line = _error_line(_dynembed("inspect", str(store / "ctr-1.0")), 2)
    assert "is a model package; inspect its tables" in line  # once called "damaged"


def test_export_names_a_bad_factory_and_creates_no_directory(tmp_path):
    checkpoint = tmp_path / "typo" / "ckpt"
    line = _error_line(_dynembed("export", "--factory", "os:path", "--checkpoint",
                                 str(checkpoint), "--name", "m", "--out", str(tmp_path / "o")), 1)
    assert line == f"error: --checkpoint {checkpoint}: no such directory"
    assert not (tmp_path / "typo").exists()  # once created, with its parents
    checkpoint.mkdir(parents=True)
    for factory, message in (("nomod:f", "No module named 'nomod'"),
                             ("os:nofunc", "has no attribute 'nofunc'"),
                             ("os:path", "not a function that builds the model")):
        line = _error_line(_dynembed("export", "--factory", factory, "--checkpoint",
                                     str(checkpoint), "--name", "m", "--out",
                                     str(tmp_path / "o")), 1)
        assert line.startswith(f"error: --factory {factory}: ") and message in line


def test_serve_names_the_flag_and_a_missing_startup_model(store):
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--workers", "0"), 1)
    assert line.startswith("error: --workers: ")
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--job-queue-size",
                                 "0"), 1)
    assert line.startswith("error: --job-queue-size: job_queue_size must be an integer >= 1")
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--inference-address",
                                 "nonsense"), 1)
    assert line.startswith("error: --inference-address: ")
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--models",
                                 "ctr=../elsewhere"), 1)
    assert line == "error: --models ctr=../elsewhere: not a package inside --model-store"
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--models", "a=b"), 1)
    assert "is not a model package" in line  # before the server starts (once: exit 3)


def test_train_names_its_flags(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("")
    for flags, name in ((["--nproc-per-node", "0"], "--nproc-per-node"),
                        (["--max-restarts", "-1"], "--max-restarts"),
                        (["--nnodes", "3:2"], "--nnodes")):
        line = _error_line(_dynembed("train", *flags, str(script)), 1)
        assert line.startswith(f"error: {name}: "), line


def test_inspect_checks_plot_before_printing(tmp_path, store):
    de_table = tmp_path / "ck"
    _save_one(de_table / "step-0000000001")
    result = _dynembed("inspect", str(de_table), "--plot", str(tmp_path / "out.txt"))
    assert _error_line(result, 2) == f"error: --plot {tmp_path / 'out.txt'}: give a .png file"
    assert result.stdout == ""  # once: the whole summary, then the error


def test_export_names_bad_names_a_mismatched_model_and_finds_hand_saved_checkpoints(
        tmp_path):
    from tests.serving.helpers import make_model

    hand = tmp_path / "hand"
    coll, dense = make_model(0)
    import dynembed as de
    de.checkpoint.save(hand / "a", Model(coll, dense))
    de.checkpoint.save(hand / "b", Model(coll, dense), parent=hand / "a")
    factory = "tests.cli.test_errors:build"
    line = _error_line(_dynembed("export", "--factory", factory, "--checkpoint", str(hand),
                                 "--name", "a/b", "--out", str(tmp_path / "o")), 1)
    assert line.startswith("error: --name must be")
    result = _dynembed("export", "--factory", factory, "--checkpoint", str(hand), "--name",
                       "m", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert f"from {hand / 'b'}" in result.stdout  # the newest of the hand-saved ones
    line = _error_line(_dynembed("export", "--factory", "tests.cli.test_errors:build_other",
                                 "--checkpoint", str(hand), "--name", "m", "--out",
                                 str(tmp_path / "o2")), 1)
    assert "does not fit the model --factory" in line and "strict=False" not in line


def test_export_records_the_step_its_tables_come_from_and_where_its_dense_weights_are(
        tmp_path):
    """So that a server following the training job moves only to newer steps: a package
    exported at step 80 once took the directory's step 25 at startup. And so that it
    serves each followed checkpoint's dense layers, not the export's under new tables."""
    import dynembed as de
    from dynembed.serving.package import read_manifest, source_step
    from tests.serving.helpers import make_model

    manager = de.checkpoint.CheckpointManager(tmp_path / "ckpt")
    manager.save(7, Model(*make_model(0)))
    result = _dynembed("export", "--factory", "tests.cli.test_errors:build", "--checkpoint",
                       str(tmp_path / "ckpt"), "--name", "m", "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "m")
    assert source_step(manifest) == 7
    assert manifest["dense"]["state_from_model"] == {
        name: f"dense.{name}" for name in build().dense.state_dict()}


def test_export_from_a_factory_with_other_dense_layers_says_which_in_one_line(tmp_path):
    """The tables fit but the dense layers do not: torch's RuntimeError came out of
    `dynembed export` as a traceback."""
    import dynembed as de
    from tests.serving.helpers import make_model

    de.checkpoint.CheckpointManager(tmp_path / "ckpt").save(3, Model(*make_model(0)))
    line = _error_line(_dynembed("export", "--factory", "tests.cli.test_errors:build_wider",
                                 "--checkpoint", str(tmp_path / "ckpt"), "--name", "m",
                                 "--out", str(tmp_path / "m")), 1)
    assert line.startswith(f"error: --checkpoint {tmp_path / 'ckpt' / 'step-0000000003'} "
                           "does not fit the model --factory tests.cli.test_errors:build_wider "
                           "builds: checkpoint ")
    assert "its dense state does not fit (RuntimeError: " in line
    assert "size mismatch for dense.0.weight" in line and not (tmp_path / "m").exists()


def test_export_of_a_damaged_checkpoint_says_so_and_takes_the_one_before(tmp_path):
    """It said the checkpoint "does not fit the model --factory builds", which sent users to
    their factory, and did not fall back to the sound checkpoint before (inspect does)."""
    import dynembed as de
    from dynembed.checkpoint.rows_file import RowsFile
    from tests.serving.helpers import make_model

    manager = de.checkpoint.CheckpointManager(tmp_path / "ckpt", max_chain=1)
    model = Model(*make_model(0))
    manager.save(1, model)
    manager.save(2, model)
    newest = tmp_path / "ckpt" / "step-0000000002"
    for rows in newest.rglob("*.rows"):
        offset, size = RowsFile(str(rows)).layout.offsets["records"]
        data = bytearray(rows.read_bytes())
        data[offset + size // 2] ^= 0x01
        rows.write_bytes(bytes(data))
    result = _dynembed("export", "--factory", "tests.cli.test_errors:build", "--checkpoint",
                       str(tmp_path / "ckpt"), "--name", "m", "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert f"warning: {newest} cannot be read" in result.stderr
    assert f"from {tmp_path / 'ckpt' / 'step-0000000001'}" in result.stdout
    line = _error_line(_dynembed("export", "--factory", "tests.cli.test_errors:build",
                                 "--checkpoint", str(newest), "--name", "m", "--out",
                                 str(tmp_path / "m2")), 1)
    assert line.startswith(f"error: --checkpoint {newest} cannot be read (") \
        and "no older checkpoint" in line, line


def test_train_checks_the_rendezvous_flags_before_torchrun_starts(tmp_path):
    from dynembed.train.launch import LaunchConfig

    script = tmp_path / "job.py"
    script.write_text("")
    logs = tmp_path / "logs"
    for flags, name in ((["--rdzv-conf", "garbage"], "--rdzv-conf"),
                        (["--rdzv-conf", "join_timeout=600,"], "--rdzv-conf"),
                        (["--rdzv-endpoint", "nohostport"], "--rdzv-endpoint"),
                        (["--rdzv-endpoint", "head:70000"], "--rdzv-endpoint"),
                        (["--rdzv-endpoint", "::1:29400"], "--rdzv-endpoint")):
        # once: a torchrun traceback, or torchrun waiting minutes for HOST:29400
        line = _error_line(_dynembed("train", "--log-dir", str(logs), *flags, str(script)), 1)
        assert line.startswith(f"error: {name}: "), line
        assert "KEY=VALUE" in line or "HOST:PORT" in line
    assert not logs.exists()  # refused before the launch
    for endpoint in ("head:29400", "10.0.0.1:1", "[::1]:29400"):
        argv = LaunchConfig(script="job.py", nnodes="1:2", rdzv_endpoint=endpoint,
                            rdzv_conf="join_timeout=600,last_call_timeout=5").torchrun_argv()
        assert f"--rdzv-endpoint={endpoint}" in argv


def test_export_checks_the_factory_and_out_before_loading_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "ck"
    _save_one(checkpoint / "step-0000000001")  # fits no model below: loading it would fail
    blocker = tmp_path / "file"
    blocker.write_text("")
    (tmp_path / "taken").mkdir()
    here = "tests.cli.test_errors"
    for factory, out, message in (
            ("os:getcwd", "o", "--factory os:getcwd: returned str, not a torch.nn.Module"),
            (f"{here}:needs_dim", "o", f"--factory {here}:needs_dim: missing a required"),
            (f"{here}:build", "file/m-1.0", f"--out {blocker}/m-1.0: cannot make its dir"),
            (f"{here}:build", "taken", f"--out {tmp_path}/taken: exists"),
            (f"{here}:build", "", "--out '': no name")):
        line = _error_line(_dynembed("export", "--factory", factory, "--checkpoint",
                                     str(checkpoint), "--name", "m", "--out",
                                     str(tmp_path / out) if out else ""), 1)
        assert line.startswith(f"error: {message}"), line
    assert not (tmp_path / "o").exists()


def test_serve_names_the_flag_of_the_store_key_file_and_graceful_timeout(store, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    absent = tmp_path / "absent"
    line = _error_line(_dynembed("serve", "--model-store", str(absent)), 1)
    assert line == f"error: --model-store: model_store {absent} is not a directory"
    for key_file, message in (("", "'': no name"),
                              (str(blocker / "k.json"), f"{blocker}/k.json: cannot make its "),
                              (str(tmp_path), f"{tmp_path}: is a directory")):
        line = _error_line(_dynembed("serve", "--model-store", str(store), "--key-file",
                                     key_file), 1)
        assert line.startswith(f"error: --key-file {message}"), line
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--graceful-timeout",
                                 "0"), 1)
    assert line.startswith("error: --graceful-timeout: graceful_timeout_s must be"), line


def _serve_until_bind(store, *flags: str) -> subprocess.CompletedProcess:
    """``dynembed serve`` up to its bind, which fails: the port is taken (so no server runs
    on, and every check before the bind has been made)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _dynembed("serve", "--model-store", str(store), "--disable-token-auth",
                           "--inference-address", f"127.0.0.1:{port}",
                           "--management-address", "127.0.0.1:0",
                           "--metrics-address", "127.0.0.1:0", *flags)
    assert "cannot listen on" in _error_line(result, 1)
    return result


def test_serve_warns_of_a_missing_follow_dir_and_an_unknown_custom_handler(store, tmp_path):
    absent = tmp_path / "not-yet"
    result = _serve_until_bind(store, "--models", "ctr=ctr-1.0", "--follow",
                               f"ctr={absent}", "--allow-custom-handler", "ctr", "nobody")
    assert f"warning: --follow ctr={absent}: no such directory" in result.stderr
    assert "warning: --allow-custom-handler nobody: no model of that name" in result.stderr
    assert "--allow-custom-handler ctr" not in result.stderr
    # a package of the store may be registered later: not a typo
    result = _serve_until_bind(store, "--allow-custom-handler", "ctr")
    assert "warning" not in result.stderr
    a_file = store / "ctr-1.0" / "MANIFEST.json"
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--models",
                                 "ctr=ctr-1.0", "--follow", f"ctr={a_file}"), 1)
    assert line.endswith("not a directory; give the training job's checkpoint directory")


def test_help_has_defaults_plain_text_and_the_version(capsys):
    from dynembed._version import __version__

    def output(*argv):
        with pytest.raises(SystemExit) as exit_:
            main(list(argv))
        assert exit_.value.code == 0
        return " ".join(capsys.readouterr().out.split())  # unwrapped

    assert output("--version") == f"dynembed {__version__}"
    assert "``" not in output("--help")  # once: the module docstring's markup
    serve = output("serve", "--help")
    assert "HOST:PORT of the inference API (default: 127.0.0.1:8080)" in serve
    assert "--graceful-timeout SECONDS" in serve
    assert "(default: runs/logs)" in output("train", "--help")


def test_usage_errors_show_the_subcommands_usage(capsys):
    for argv, usage in ((["inspect", "x", "--top", "-1"], "usage: dynembed inspect"),
                        (["train"], "usage: dynembed train")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(usage), err  # once: the top-level usage


@pytest.mark.parametrize("value", ["abc", "0", str(10**6)])
def test_a_bad_num_threads_variable_is_named_at_import(value):
    result = subprocess.run([sys.executable, "-c", "import dynembed"], capture_output=True,
                            text=True, timeout=120, check=False,
                            env={**os.environ, "DYNEMBED_NUM_THREADS": value})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"ValueError: environment variable DYNEMBED_NUM_THREADS must be an "
                        rf"int in \[1, \d+\] \(numba's thread count\), got '{value}'; fix "
                        "it or unset it", last), last
    assert "invalid literal" not in result.stderr


class Model(torch.nn.Module):
    def __init__(self, embeddings, dense):
        super().__init__()
        self.embeddings, self.dense = embeddings, dense


def build():
    from tests.serving.helpers import make_model
    return Model(*make_model(0))


def needs_dim(dim):
    from tests.serving.helpers import make_model
    return Model(*make_model(dim))


def build_wider():
    """The trained model's tables under wider dense layers than were trained."""
    from tests.serving.helpers import make_model
    return Model(make_model(0)[0], torch.nn.Sequential(
        torch.nn.Linear(11, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1), torch.nn.Flatten(0)))


def build_other():
    import dynembed as de
    return Model(de.EmbeddingCollection(tables={"other": de.TableConfig(dim=2)},
                                        features={"x": "other"}), torch.nn.Linear(2, 1))


def _small(admission=None) -> Model:
    import dynembed as de
    torch.manual_seed(0)
    return Model(de.EmbeddingCollection(
        tables={"t": de.TableConfig(dim=2, seed=1, admission=admission)},
        features={"x": "t"}), torch.nn.Linear(2, 1))


def build_without_admission():
    """The trained model's tables without their admission policy (of no use to serving)."""
    return _small()


def test_export_of_a_checkpoint_with_admission_state_does_not_warn(tmp_path):
    """Exporting a job whose tables admitted keys warned that the tables were 'built
    without ... an admission policy?': a package's tables never admit keys, so that state
    is dropped on purpose, and the warning blamed the user for it."""
    import dynembed as de

    trained = _small(de.policy.BloomAdmission(expected_keys=100))
    for _ in range(2):  # admitted when seen again
        trained.embeddings({"x": ["a", "b"]})
    assert len(trained.embeddings.tables["t"]) == 2
    de.checkpoint.save(tmp_path / "ckpt", trained)
    factory = "tests.cli.test_errors:build_without_admission"
    result = _dynembed("export", "--factory", factory, "--checkpoint", str(tmp_path / "ckpt"),
                       "--name", "m", "--out", str(tmp_path / "m-1.0"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warning" not in result.stderr and "no place for" not in result.stderr, \
        result.stderr[-2000:]
    package = de.serving.open_package(tmp_path / "m-1.0", preload=True)
    assert len(package.embeddings.tables["t"]) == 2  # the rows, without the admission state


def _save_one(path):
    import dynembed as de
    table = de.DynamicTable(de.TableConfig(dim=2))
    table.find_or_insert(torch.arange(3))
    de.checkpoint.save(path, tables={"t": table})


def _serve_with_a_taken_port(store, *flags: str) -> subprocess.CompletedProcess:
    """``dynembed serve`` that cannot start serving (its inference port is taken), so it
    ends either with a refusal of ``flags`` or at its bind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        return _dynembed("serve", "--model-store", str(store), "--disable-token-auth",
                         "--inference-address", f"127.0.0.1:{port}",
                         "--management-address", "127.0.0.1:0",
                         "--metrics-address", "127.0.0.1:0", *flags)


def test_serve_warns_of_a_custom_handler_allowance_naming_a_served_name(store):
    # ctr-1.0 served as "clicks": allowances name packages, so "clicks" allows nothing
    result = _serve_until_bind(store, "--models", "clicks=ctr-1.0",
                               "--allow-custom-handler", "clicks")
    assert ("warning: --allow-custom-handler clicks: no package of that name; --models "
            "clicks=ctr-1.0 serves package ctr (allow it with --allow-custom-handler ctr)"
            in result.stderr), result.stderr
    result = _serve_until_bind(store, "--models", "clicks=ctr-1.0",
                               "--allow-custom-handler", "ctr")
    assert "warning" not in result.stderr


def test_serve_keeps_every_repeated_list_flag_and_refuses_a_name_given_twice(store):
    # once: a repeated flag replaced the values before it, silently
    result = _serve_until_bind(store, "--allow-custom-handler", "nobody",
                               "--allow-custom-handler", "ctr")
    assert "warning: --allow-custom-handler nobody: no" in result.stderr, result.stderr
    line = _error_line(_serve_with_a_taken_port(store, "--models", "x=absent",
                                                "--models", "ctr=ctr-1.0"), 1)
    assert "absent" in line and "is not a model package" in line, line
    # once: the last of the two served, the first was dropped without a word
    for flags, message in (
            (["--models", "ctr=ctr-1.0", "ctr=absent"],
             "--models ctr: given twice (ctr=ctr-1.0, ctr=absent); give each name once"),
            (["--models", "ctr=ctr-1.0", "--follow", "ctr=a", "--follow", "ctr=b"],
             "--follow ctr: given twice (ctr=a, ctr=b); give each name once")):
        line = _error_line(_serve_with_a_taken_port(store, *flags), 1)
        assert line == f"error: {message}", line
    line = _error_line(_serve_with_a_taken_port(store, "--models", "ctr"), 1)
    assert line == "error: --models takes NAME=PACKAGE, got 'ctr'", line


def test_inspect_checks_where_the_plot_goes_before_printing(tmp_path):
    checkpoint = tmp_path / "ck"
    _save_one(checkpoint / "step-0000000001")
    blocker = tmp_path / "file"
    blocker.write_text("")
    (tmp_path / "dir.png").mkdir()
    for plot, message in ((blocker / "rows.png", "cannot make its directory"),
                          (tmp_path / "dir.png", "is a directory")):
        # once: the whole summary, then "error: [Errno 20] Not a directory: ..."
        result = _dynembed("inspect", str(checkpoint), "--plot", str(plot))
        line = _error_line(result, 2)
        assert line.startswith(f"error: --plot {plot}: {message}"), line
        assert result.stdout == ""
    plot = tmp_path / "new" / "rows.png"  # a missing directory is made, as for --out
    result = _dynembed("inspect", str(checkpoint), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert plot.is_file()


def test_train_refuses_an_empty_log_dir_or_rendezvous_id(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("raise SystemExit('the job ran')")
    # once: torchrun ran with its logs in a temporary directory ("worker logs in "), or
    # with a random rendezvous id per node (nodes of one job never met)
    for flags, message in ((["--log-dir", ""], "--log-dir: log_dir must be a directory"),
                           (["--rdzv-id", ""], "--rdzv-id: rdzv_id must be")):
        line = _error_line(_dynembed("train", "--max-restarts", "0", *flags, str(script),
                                     cwd=tmp_path), 1)
        assert line.startswith(f"error: {message}"), line


def test_export_names_a_model_package_given_as_the_checkpoint(tmp_path, store):
    line = _error_line(_dynembed("export", "--factory", "tests.cli.test_errors:build",
                                 "--checkpoint", str(store / "ctr-1.0"), "--name", "m",
                                 "--out", str(tmp_path / "o")), 1)
    # once: "... the manifest is damaged (bad JSON or checksum); load an earlier checkpoint"
    assert line == (f"error: --checkpoint {store / 'ctr-1.0'}: is a model package, not a "
                    "training checkpoint; give the training job's checkpoints"), line
    assert not (tmp_path / "o").exists()


def test_inspect_of_a_model_store_points_at_a_package(store):
    result = _dynembed("inspect", str(store))
    # once: "skipping .../ctr-1.0: ... the manifest is damaged (bad JSON or checksum)"
    assert "damaged" not in result.stderr, result.stderr
    line = _error_line(result, 2)
    assert line == (f"error: {store} is a model store; inspect a package's tables: "
                    f"{store / 'ctr-1.0' / 'tables'}"), line


def test_a_file_given_as_the_checkpoint_is_not_called_missing(tmp_path):
    """Once: a file given as the checkpoint was reported as "no such directory", which sent
    users looking for a missing path."""
    a_file = tmp_path / "MANIFEST.json"
    a_file.write_text("{}")
    line = _error_line(_dynembed("inspect", str(a_file)), 2)
    assert line == (f"error: checkpoint {a_file}: not a directory; give a checkpoint (a "
                    "directory with MANIFEST.json) or a directory of checkpoints"), line
    line = _error_line(_dynembed("export", "--factory", "tests.cli.test_errors:build",
                                 "--checkpoint", str(a_file), "--name", "m", "--out",
                                 str(tmp_path / "o")), 1)
    assert line.startswith(f"error: --checkpoint {a_file}: not a directory; "), line


def test_serve_names_a_followed_model_missing_from_models(store, tmp_path):
    """Once: "error: --follow: follow names models not in models: ['ctr']", which named
    neither the flag to add nor its value."""
    line = _error_line(_dynembed("serve", "--model-store", str(store), "--follow",
                                 f"ctr={tmp_path}"), 1)
    assert line == (f"error: --follow ctr={tmp_path}: no model ctr in --models; serve it at "
                    "startup with --models ctr=PACKAGE"), line
