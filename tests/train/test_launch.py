"""`dynembed train`: the torchrun command it builds, and its argument checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dynembed import cli
from dynembed.train import launch as launch_module
from dynembed.train.launch import LaunchConfig


def test_torchrun_command_has_c10d_restarts_and_logs():
    argv = LaunchConfig(script="train.py", script_args=["--steps", "3"], nproc_per_node=2,
                        log_dir="L").torchrun_argv()
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    for flag in ("--nnodes=1", "--nproc-per-node=2", "--max-restarts=3",
                 "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "--log-dir=L",
                 "--redirects=3"):
        assert flag in argv
    assert argv[-4:] == ["--", "train.py", "--steps", "3"]
    elastic = LaunchConfig(script="m.train", module=True, nnodes="1:4",
                           rdzv_endpoint="head:29400", rdzv_id="job7").torchrun_argv()
    assert "--nnodes=1:4" in elastic and "--rdzv-endpoint=head:29400" in elastic
    assert elastic[-3:] == ["-m", "--", "m.train"]


@pytest.mark.parametrize("kwargs, message", [
    ({"nnodes": "0"}, "nnodes must be"),
    ({"nnodes": "3:2"}, "nnodes must be"),
    ({"nnodes": "a"}, "nnodes must be"),
    ({"nproc_per_node": 0}, "nproc_per_node must be"),
    ({"max_restarts": -1}, "max_restarts must be"),
    ({"stop_timeout": 0}, "stop_timeout must be"),
    ({"nnodes": "1:2"}, "needs --rdzv-endpoint"),
])
def test_bad_launch_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LaunchConfig(script="train.py", **kwargs)


def test_cli_passes_script_arguments_through(monkeypatch):
    seen = []
    monkeypatch.setattr(launch_module, "launch",
                        lambda config, show_progress: seen.append(config) or 0)
    assert cli.main(["train", "--nproc-per-node", "2", "-m", "pkg.job", "--steps", "5",
                     "-m", "x"]) == 0
    assert seen[0].module and seen[0].script == "pkg.job"
    assert seen[0].script_args == ["--steps", "5", "-m", "x"]
    assert cli.main(["train", "--nnodes", "1:2", "job.py"]) == 1  # no rendezvous endpoint


def test_a_script_that_is_not_a_file_is_refused_before_torchrun(tmp_path, capsys,
                                                               monkeypatch):
    """Every worker once failed at start, was restarted max_restarts times, and the CLI
    showed only torchrun's exit code."""
    missing = str(tmp_path / "no_such_script.py")
    with pytest.raises(ValueError, match="is not a file"):
        launch_module.launch(LaunchConfig(script=missing, log_dir=str(tmp_path / "logs")))
    assert cli.main(["train", missing]) == 1
    assert "is not a file" in capsys.readouterr().err
    package = tmp_path / "job"  # a directory python runs through its __main__.py passes
    package.mkdir()
    (package / "__main__.py").write_text("")
    seen = []
    monkeypatch.setattr(launch_module.subprocess, "Popen",
                        lambda argv, env, start_new_session: seen.append(argv) or _Done())
    assert launch_module.launch(LaunchConfig(script=str(package), log_dir=str(tmp_path / "l")),
                                show_progress=False) == 0
    assert seen and seen[0][-1] == str(package)


class _Done:
    """A torchrun that has already exited with 0."""

    returncode = 0

    def poll(self):
        return 0

    def wait(self, timeout=None):
        return 0

    def send_signal(self, signum):
        pass


def test_script_options_that_abbreviate_torchrun_options_reach_the_script(tmp_path):
    """torchrun read them as its own: --max was 'ambiguous' and the job never started."""
    script = tmp_path / "echo_args.py"
    script.write_text("import json, os, sys\n"
                      "if os.environ['RANK'] == '0':\n"
                      "    open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))\n")
    seen = tmp_path / "argv.json"
    args = ["--log", "x", "--max", "5", "--node", "3", "--run", "exp1", "-m", "y"]
    code = launch_module.launch(LaunchConfig(script=str(script), script_args=[str(seen), *args],
                                             max_restarts=0, log_dir=str(tmp_path / "logs")),
                                show_progress=False)
    assert code == 0 and json.loads(seen.read_text()) == args


def test_a_missing_module_or_a_log_dir_that_is_a_file_is_refused_before_torchrun(
        tmp_path, capsys, monkeypatch):
    """-m of a missing module ran 4 failing attempts, and the terminal said only FAILED."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--log-dir", "logs", "-m", "no_such_module_xyz"]) == 1
    assert "-m no_such_module_xyz: no such module importable from" in capsys.readouterr().err
    (tmp_path / "job.py").write_text("")
    (tmp_path / "afile").write_text("")
    assert cli.main(["train", "--log-dir", "afile", "job.py"]) == 1
    assert "--log-dir afile: is a file" in capsys.readouterr().err
    assert cli.main(["train", "--log-dir", "afile/logs", "job.py"]) == 1  # once a bare OSError
    assert "--log-dir afile/logs: cannot be made" in capsys.readouterr().err
    (tmp_path / "localjob.py").write_text("")  # a module in the working directory is found
    launch_module._check_script(LaunchConfig(script="localjob", module=True))


def test_the_stop_timeout_comes_from_the_flag_the_environment_or_120(monkeypatch):
    """torchrun gave the workers 30 s to checkpoint after a stop; an explicit default would
    also have overridden TORCH_ELASTIC_SHUTDOWN_TIMEOUT set by a deployment."""
    def timeout(**kwargs):
        argv = LaunchConfig(script="train.py", **kwargs).torchrun_argv()
        return [a for a in argv if a.startswith("--shutdown-timeout")]

    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert timeout() == ["--shutdown-timeout=120"]
    assert timeout(stop_timeout=600) == ["--shutdown-timeout=600"]
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "240")
    assert timeout() == []  # torchrun reads the variable
    assert timeout(stop_timeout=600) == ["--shutdown-timeout=600"]


@pytest.mark.parametrize("value", ["", "abc", "0", "-5", "1.5"])
def test_a_bad_shutdown_timeout_in_the_environment_is_refused_before_torchrun(
        monkeypatch, capsys, value):
    """Without --stop-timeout torchrun reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT itself: an
    empty or non-numeric one (a manifest's `value: ""`) failed it with a traceback ending in
    `invalid literal for int()`, naming no variable; 0 or less killed the workers before
    they could checkpoint."""
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", value)
    with pytest.raises(ValueError, match="TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a whole "
                                         "number of seconds >= 1"):
        LaunchConfig(script="train.py")
    assert cli.main(["train", "train.py"]) == 1
    err = capsys.readouterr().err
    assert f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a whole number of seconds >= 1 (the " \
           f"time the workers get to checkpoint after a stop), got {value!r}" in err
    assert "--stop-timeout" in err  # the other way to fix it
    # --stop-timeout takes its place: torchrun then never reads the variable
    argv = LaunchConfig(script="train.py", stop_timeout=60).torchrun_argv()
    assert "--shutdown-timeout=60" in argv


def test_a_failed_job_shows_the_worker_error(tmp_path):
    """torchrun reported only "exit code 1" and "error_file: <N/A>"; the cause was in a
    worker log under --log-dir."""
    script = tmp_path / "fails.py"
    script.write_text("raise ValueError('the real cause: bad feature spec')\n")
    logs = tmp_path / "logs"
    old = logs / "earlier" / "attempt_0" / "0" / "stderr.log"  # an earlier job's error
    old.parent.mkdir(parents=True)
    old.write_text("Traceback (most recent call last):\nKeyError: 'an old error'\n")
    os.utime(old, (1, 1))
    done = subprocess.run([sys.executable, "-m", "dynembed", "train", "--max-restarts", "0",
                           "--no-progress", "--log-dir", str(logs), str(script)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1
    tail = done.stderr.split("the last worker error, from ", 1)[1]
    assert "ValueError: the real cause: bad feature spec" in tail
    assert "an old error" not in tail and str(logs) in tail
