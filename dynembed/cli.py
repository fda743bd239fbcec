"""The ``dynembed`` command line: ``inspect``, ``train``, ``export`` and ``serve``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from dynembed._version import __version__
from dynembed.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    DynembedError,
)

_DESCRIPTION = ("dynembed: dynamic embedding tables for PyTorch. Inspect checkpoints, train "
                "on torchrun, export model packages and serve them.")
"""The top-level --help text (plain: the module docstring is reStructuredText)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, an off
    switch, an empty list)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_summary(info: dict, out) -> None:
    print(f"checkpoint {info['path']}", file=out)
    print(f"  id {info['id']}  kind {info['kind']}  chain length {info['chain_length']}"
          f"  world size {info['world_size']}  buckets {info['num_buckets']}", file=out)
    if info["parent"]:
        print(f"  parent {info['parent']}", file=out)
    if info["extra"]:
        print(f"  extra {info['extra']}", file=out)
    for name, t in info["tables"].items():
        print(f"  table {name}: {t['rows']:,} rows, dim {t['dim']}, optimizer state "
              f"{t['state_width']} floats/row, {_human(t['bytes'])} in this checkpoint "
              f"({t['rows_in_files']:,} rows, {t['deleted']:,} deletions)", file=out)
        print(f"    optimizer {t['optimizer']}", file=out)
        if t["top_keys"]:
            keys = ", ".join(f"{_shown_key(k)} ({k['count']})" for k in t["top_keys"])
            print(f"    top keys by count: {keys}", file=out)


_SHOWN_KEY_CHARS = 60
"""Longer logged keys are cut in summaries (a whole query or document may be a key)."""


def _shown_key(entry: dict) -> str:
    """A top key as the summary shows it: the id if the key is not logged, else its repr
    (so "" and keys holding ", " or control characters read unambiguously; a bytes key
    comes as its literal already), cut short."""
    if entry["key"] is None:
        return str(entry["id"])
    shown = entry["key"] if entry.get("key_is_bytes") else repr(entry["key"])
    if len(shown) > _SHOWN_KEY_CHARS:
        shown = f"{shown[:_SHOWN_KEY_CHARS - 3]}... ({len(shown):,} chars)"
    return shown


def _is_model_package(path: Path) -> bool:
    from dynembed.serving.package import FORMAT, MANIFEST

    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):  # absent, not JSON, not an object
        return False


def _inspect(args) -> int:
    """``dynembed inspect``."""
    from dynembed.checkpoint import manifest as mf
    from dynembed.checkpoint.inspect import describe, history, history_of, plot_history

    path = Path(args.checkpoint)
    if not path.is_dir():
        print(f"error: checkpoint {path}: {_not_a_directory(path)}", file=sys.stderr)
        return 2
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        print(f"error: --plot {args.plot}: give a .png file", file=sys.stderr)
        return 2
    if args.plot:  # else writing it fails after the whole summary, naming no flag
        try:
            plot = _new_path(args.plot, "--plot", "rows.png")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if plot.is_dir():
            print(f"error: --plot {args.plot}: is a directory; give a file path (e.g. "
                  f"{plot / 'rows.png'})", file=sys.stderr)
            return 2
    if _is_model_package(path):
        print(f"error: {path} is a model package; inspect its tables: {path / 'tables'}",
              file=sys.stderr)
        return 2
    if not (path / mf.MANIFEST).exists():
        # a model store: else each package is reported as a damaged checkpoint
        packages = sorted(child for child in path.iterdir() if _is_model_package(child))
        if packages:
            print(f"error: {path} is a model store; inspect a package's tables: "
                  f"{packages[0] / 'tables'}", file=sys.stderr)
            return 2
    if (path / mf.MANIFEST).exists():
        info = describe(path, top=args.top)
    else:  # a directory of checkpoints: show the newest that is whole
        points = history(path)
        if not points:
            print(f"error: {path} is neither a checkpoint nor a directory of checkpoints",
                  file=sys.stderr)
            return 2
        info = _newest_whole(points, args.top)
        if info is None:
            print(f"error: every checkpoint in {path} is damaged (see above)", file=sys.stderr)
            return 1
    if args.json:
        info["history"] = history_of(path)
        # allow_nan=False: never NaN / Infinity, which are not JSON (describe spells them)
        print(json.dumps(info, indent=1, allow_nan=False))
    else:
        _print_summary(info, sys.stdout)
        for point in history_of(path):
            rows = ", ".join(f"{n} {r:,}" for n, r in point["rows"].items())
            print(f"  {Path(point['path']).name} ({point['kind']}): {rows}")
    if args.plot:
        plot_history(path, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _not_a_directory(path: Path) -> str:
    """Why ``path``, given as a checkpoint, cannot be one: it is absent, or not a directory
    (a file was once reported as "no such directory", which sent users looking for a
    missing path)."""
    if path.exists():
        return ("not a directory; give a checkpoint (a directory with MANIFEST.json) or a "
                "directory of checkpoints")
    return "no such directory"


def _newest_whole(points: list[dict], top: int) -> dict | None:
    """``describe`` of the newest of ``points`` (oldest first) whose files are whole; the
    damaged ones after it are reported on stderr (a restore skips them too)."""
    from dynembed.checkpoint.inspect import describe

    for point in reversed(points):
        try:
            return describe(point["path"], top=top)
        except CheckpointError as e:
            print(f"warning: skipping damaged checkpoint {point['path']}: {e}",
                  file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dynembed`` command."""
    parser = argparse.ArgumentParser(prog="dynembed", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"dynembed {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect", help="what a checkpoint holds, and rows per table over a directory",
        formatter_class=_HelpFormatter)
    inspect.add_argument("checkpoint", help="a checkpoint, or a directory of checkpoints")
    inspect.add_argument("--top", type=int, default=10, help="top keys by count per table")
    inspect.add_argument("--plot", metavar="PNG",
                         help="draw rows per table across the directory's checkpoints")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=_inspect)
    train = _add_train(commands)
    _add_export(commands)
    _add_serve(commands)
    args = parser.parse_args(argv)
    level = logging.INFO if args.command == "serve" else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # the subcommand's parser: its usage line is the one that helps
    if args.command == "inspect" and args.top < 0:
        inspect.error(f"--top must be >= 0 (0: no top keys), got {args.top}")
    if args.command == "train" and args.script is None:
        train.error("give the training script (or -m and a module)")
    try:
        code = args.run(args)
        sys.stdout.flush()  # here, where a reader gone is caught, not in the exit's flush
        return code
    except BrokenPipeError:
        # the reader left (`dynembed inspect ... | head`): not an error of this command.
        # stdout goes to /dev/null, so that the interpreter's final flush fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (DynembedError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _add_train(commands) -> argparse.ArgumentParser:
    train = commands.add_parser(
        "train", help="run a training script on torchrun (elastic, restarts on failure)",
        formatter_class=_HelpFormatter,
        description="Runs SCRIPT with torchrun: c10d rendezvous, restarts on failure, worker "
                    "logs in --log-dir, and a progress bar fed by the script's "
                    "dynembed.train.Runtime. Arguments after the script go to it.")
    train.add_argument("--nnodes", default="1", help="nodes: N, or MIN:MAX (elastic)")
    train.add_argument("--nproc-per-node", type=int, default=1, help="workers per node")
    train.add_argument("--max-restarts", type=int, default=3,
                       help="restarts of the workers after failures before giving up")
    train.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                       help="HOST:PORT of the rendezvous (needed with several nodes)")
    train.add_argument("--rdzv-id", default="dynembed", help="job id shared by its nodes")
    train.add_argument("--rdzv-conf", default=None, metavar="KEY=VALUE[,...]",
                       help="more rendezvous settings, e.g. join_timeout=600,last_call_timeout=5")
    train.add_argument("--stop-timeout", type=int, default=None,
                       help="seconds the workers get to checkpoint after a stop before they "
                            "are killed (default: TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 120)")
    train.add_argument("--log-dir", default="runs/logs", help="worker logs and progress")
    train.add_argument("--tee", action="store_true", help="also show the workers' output")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("-m", dest="module", action="store_true",
                       help="SCRIPT is a module to run as python -m SCRIPT")
    train.add_argument("script", nargs="?", default=None, help="the training script")
    train.add_argument("script_args", nargs=argparse.REMAINDER,
                       help="arguments of the script")
    train.set_defaults(run=_train)
    return train


def _train(args) -> int:
    from dynembed.train.launch import LaunchConfig, last_failure, launch

    try:
        config = LaunchConfig(script=args.script, script_args=list(args.script_args),
                              module=args.module, nnodes=args.nnodes,
                              nproc_per_node=args.nproc_per_node,
                              max_restarts=args.max_restarts,
                              rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                              rdzv_conf=args.rdzv_conf, log_dir=args.log_dir, tee=args.tee,
                              stop_timeout=args.stop_timeout)
    except ValueError as e:
        raise _with_flag(e, {"nnodes": "--nnodes", "nproc_per_node": "--nproc-per-node",
                             "max_restarts": "--max-restarts",
                             "stop_timeout": "--stop-timeout",
                             "rdzv_endpoint": "--rdzv-endpoint",
                             "rdzv_conf": "--rdzv-conf", "rdzv_id": "--rdzv-id",
                             "log_dir": "--log-dir"}) from None
    started = time.time()
    code = launch(config, show_progress=not args.no_progress)
    print(f"dynembed train: torchrun exited with code {code}; worker logs in "
          f"{config.log_dir}", file=sys.stderr)
    failure = last_failure(config.log_dir, started) if code not in (0, 130, 143) else None
    if failure is not None:  # the cause, which torchrun's own report leaves out
        print(f"dynembed train: the last worker error, from {failure[0]}:\n{failure[1]}",
              file=sys.stderr)
    return code


def _pairs(values: list[str] | None, flag: str, metavar: str) -> dict[str, str]:
    """``NAME=VALUE`` arguments of ``flag`` as a dict.

    Args:
        values: the arguments given (None: the flag was not given).
        flag: the option, for errors.
        metavar: its ``NAME=...`` form, for errors.

    Raises:
        ValueError: an argument is not ``NAME=VALUE``, or a name is given twice (a dict
            would keep only the last, silently).
    """
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, target = value.partition("=")
        if not sep or not name or not target:
            raise ValueError(f"{flag} takes {metavar}, got {value!r}")
        if name in out:
            raise ValueError(f"{flag} {name}: given twice ({name}={out[name]}, {value}); "
                             "give each name once")
        out[name] = target
    return out


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export", help="write a model package for dynembed serve",
        formatter_class=_HelpFormatter,
        description="Builds the model with FACTORY (module:function, your code), restores "
                    "a training checkpoint into it, and writes a package: the dense part as "
                    "a torch.export program, the tables as a checkpoint. The model must have "
                    "serving_parts() returning a dict with embeddings, dense and optionally "
                    "feature_types and output (else attributes embeddings and dense).")
    export.add_argument("--factory", required=True, help="module:function building the model")
    export.add_argument("--checkpoint", required=True,
                        help="a checkpoint, or a directory of checkpoints (the newest)")
    export.add_argument("--name", required=True, help="model name")
    export.add_argument("--version", default="1.0", help="model version")
    export.add_argument("--out", required=True, help="the package directory to create "
                                                     "(e.g. model-store/NAME-VERSION)")
    export.add_argument("--output", default=None, choices=["identity", "sigmoid", "softmax"],
                        help="transform of the dense output (default: the model's choice)")
    export.set_defaults(run=_export)


def _new_path(value: str, flag: str, example: str) -> Path:
    """``value``, a path this command will create, checked before any work: it has a name,
    and its directory exists or is made now (as writing it would, a moment too late to say
    which flag was wrong).

    Args:
        value: the path given.
        flag: the option that gave it, for the error.
        example: an example of a good value, for the error.

    Raises:
        ValueError: no name, or its directory cannot be made (named with ``flag``).
    """
    path = Path(value)
    if not path.name:
        raise ValueError(f"{flag} {value!r}: no name; give a path such as {example}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = ("a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError))
               else e.strerror)
        raise ValueError(f"{flag} {value}: cannot make its directory {path.parent} ({why}); "
                         "give a path in a directory this user may write") from None
    return path


def _export(args) -> int:
    import importlib
    from inspect import signature

    import torch

    from dynembed.checkpoint import manifest as mf
    from dynembed.checkpoint.api import load
    from dynembed.checkpoint.inspect import history
    from dynembed.checkpoint.manager import CheckpointManager, step_of
    from dynembed.serving.package import check_name, export_package

    check_name(args.name, "--name")  # before any work
    check_name(args.version, "--version")
    module_name, _, function = args.factory.partition(":")
    if not module_name or not function:
        raise ValueError(f"--factory must be module:function, got {args.factory!r}")
    if os.getcwd() not in sys.path:  # as `python -m`: the factory's module may live here
        sys.path.insert(0, os.getcwd())
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"--checkpoint {checkpoint}: {_not_a_directory(checkpoint)}")
    if _is_model_package(checkpoint):  # else read as a checkpoint: "manifest is damaged"
        raise ValueError(f"--checkpoint {checkpoint}: is a model package, not a training "
                         "checkpoint; give the training job's checkpoints")
    try:
        factory = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--factory {args.factory}: {e}") from None
    if not callable(factory):
        raise ValueError(  # noqa: TRY004 - a bad --factory value, printed by main
            f"--factory {args.factory}: not a function that builds the model")
    try:  # the arguments, checked without calling: a TypeError raised inside the factory
        signature(factory).bind()  # is a bug in it, which its traceback shows best
    except TypeError as e:
        raise ValueError(f"--factory {args.factory}: {e}; give a function that builds the "
                         "model without arguments") from None
    except ValueError:  # no signature to read (some builtins): calling it will tell
        pass
    out = _new_path(args.out, "--out", "model-store/NAME-VERSION")
    if out.exists():
        raise ValueError(f"--out {out}: exists; packages are never overwritten: give a new "
                         "directory (e.g. with another --version)")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(  # noqa: TRY004 - a bad --factory value, printed by main
            f"--factory {args.factory}: returned {type(model).__name__}, not a "
            "torch.nn.Module; give a function that builds the model")
    _refuse_stores(model, args.factory)
    if (checkpoint / mf.MANIFEST).exists():
        candidates = [checkpoint]
    else:  # a directory: its newest checkpoint, and the ones before if that is damaged
        # a CheckpointManager's step-N folders, else (as inspect) any others
        candidates = CheckpointManager(checkpoint).checkpoints()[::-1] \
            or [Path(found["path"]) for found in history(checkpoint)][::-1]
        if not candidates:
            raise ValueError(f"--checkpoint {checkpoint}: no checkpoint there")
    for checkpoint in candidates:
        try:  # strict: every table and weight of the model must be there
            # a factory may build the tables without the admission policy they trained
            # with: the package's tables never admit keys, so that state is dropped
            # without a warning
            load(checkpoint, model, dropped=("admission",))
            break
        except (CheckpointCorruptError, CheckpointNotFoundError) as e:
            # damage is no misfit ("does not fit the model" sent users to their factory)
            if checkpoint == candidates[-1]:
                raise ValueError(f"--checkpoint {checkpoint} cannot be read ({e}) and there "
                                 "is no older checkpoint to export; export another") from None
            print(f"warning: {checkpoint} cannot be read ({e}); trying the one before",
                  file=sys.stderr)
        except CheckpointError as e:
            raise ValueError(f"--checkpoint {checkpoint} does not fit the model --factory "
                             f"{args.factory} builds: "
                             + str(e).replace("; pass strict=False to ignore them", "")
                             + "; the factory must build the model that was trained") \
                from None
    if hasattr(model, "serving_parts"):
        parts = model.serving_parts()
    elif hasattr(model, "embeddings") and hasattr(model, "dense"):
        parts = {"embeddings": model.embeddings, "dense": model.dense}
    else:
        raise ValueError(f"--factory {args.factory}: the model needs serving_parts() or "
                         "embeddings and dense attributes")
    path = export_package(args.out, embeddings=parts["embeddings"], dense=parts["dense"],
                          name=args.name, version=args.version,
                          feature_types=parts.get("feature_types"),
                          output=args.output or parts.get("output", "identity"),
                          source_step=step_of(checkpoint), model=model)
    print(f"wrote {path} from {checkpoint}")
    return 0


def _refuse_stores(model, factory: str) -> None:
    """Raises ValueError if the factory built tables over stores: loading the checkpoint
    empties each table's store and writes the checkpoint's rows into it, so an export from
    a factory that reuses the training job's store paths once replaced the rows (and the
    clock) of that job's stores, silently."""
    from dynembed.nn._base import named_tables

    stored = sorted(name for name, table in named_tables(model).items()
                    if table.tier is not None)
    if stored:
        raise ValueError(
            f"--factory {factory}: builds tables {stored} over stores; loading the checkpoint "
            "into them would replace the rows those stores hold with the checkpoint's. Give a "
            "factory that builds the model without store= (the package takes every row from "
            "the checkpoint)")


def _add_serve(commands) -> None:
    serve = commands.add_parser(
        "serve", help="serve model packages (TorchServe, KServe v1 and v2 APIs)",
        formatter_class=_HelpFormatter,
        description="Serves packages of --model-store: inference API (TorchServe, KServe v1, "
                    "Open Inference Protocol v2), management API (TorchServe's) and "
                    "Prometheus metrics, on loopback by default. The management API needs "
                    "the token written to --key-file.")
    serve.add_argument("--model-store", required=True, help="directory of model packages")
    # action="extend": a repeated flag adds to the list (by default it replaced it)
    serve.add_argument("--models", nargs="*", action="extend", metavar="NAME=PACKAGE",
                       help="models to serve at startup (package paths in the store)")
    serve.add_argument("--inference-address", default="127.0.0.1:8080",
                       help="HOST:PORT of the inference API")
    serve.add_argument("--management-address", default="127.0.0.1:8081",
                       help="HOST:PORT of the management API")
    serve.add_argument("--metrics-address", default="127.0.0.1:8082",
                       help="HOST:PORT of the Prometheus metrics API")
    serve.add_argument("--disable-token-auth", action="store_true",
                       help="no token on the management API (anyone who reaches the port "
                            "can register and remove models)")
    serve.add_argument("--inference-token-auth", action="store_true",
                       help="require the inference token on the inference API")
    serve.add_argument("--key-file", default="key_file.json",
                       help="where the tokens are written (mode 0600)")
    serve.add_argument("--workers", type=int, default=1, help="workers per model")
    serve.add_argument("--processes", type=int, default=1,
                       help="processes answering the inference API on its port (Linux): "
                            "more cores for HTTP and JSON work, a copy of the models each")
    serve.add_argument("--preload", action="store_true",
                       help="read the tables into memory at registration instead of opening "
                            "them lazily (slower start, faster lookups)")
    serve.add_argument("--batch-size", type=int, default=1, help="most examples per batch")
    serve.add_argument("--max-batch-delay", type=int, default=100,
                       help="ms a batch waits to fill up")
    serve.add_argument("--response-timeout", type=int, default=120, help="seconds")
    serve.add_argument("--graceful-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="seconds a shutdown (SIGTERM, Ctrl-C) waits for accepted "
                            "requests")
    serve.add_argument("--max-request-size", type=int, default=6_553_500, help="bytes")
    serve.add_argument("--job-queue-size", type=int, default=100,
                       help="requests that may wait for a worker per model version and "
                            "process; more get 503 at once (TorchServe's job_queue_size)")
    serve.add_argument("--follow", nargs="*", action="extend",
                       metavar="NAME=CHECKPOINT_DIR",
                       help="apply newer checkpoints of a training job to a model's tables")
    serve.add_argument("--follow-interval", type=float, default=5.0, help="seconds")
    serve.add_argument("--allow-custom-handler", nargs="*", action="extend", metavar="NAME",
                       default=[],
                       help="packages that may run their own handler code, by their "
                            "name (model.name in MANIFEST.json), whatever name they are "
                            "served under; repeatable")
    serve.set_defaults(run=_serve)


def _with_flag(error: ValueError, flags: dict[str, str]) -> ValueError:
    """``error`` of a config field (its message starts with the field's name), naming the
    command-line flag the user gave instead."""
    field = str(error).split(" ", 1)[0].split("=", 1)[0]  # also "processes=2 needs ..."
    return ValueError(f"{flags[field]}: {error}") if field in flags else error


_SERVE_FLAGS = {"default_workers": "--workers", "batch_size": "--batch-size",
                "inference_address": "--inference-address",
                "management_address": "--management-address",
                "metrics_address": "--metrics-address",
                "max_batch_delay_ms": "--max-batch-delay",
                "response_timeout_s": "--response-timeout",
                "max_request_bytes": "--max-request-size", "processes": "--processes",
                "job_queue_size": "--job-queue-size",
                "follow_interval_s": "--follow-interval", "follow": "--follow",
                "model_store": "--model-store", "graceful_timeout_s": "--graceful-timeout"}


def _check_follow(config) -> None:
    """Refuses a ``--follow`` path that is not a directory; warns of one that does not
    exist: the server waits for it (training may not have started), so a typo would
    otherwise go unnoticed forever."""
    for name, directory in config.follow.items():
        path = Path(directory)
        if path.exists() and not path.is_dir():
            raise ValueError(f"--follow {name}={directory}: not a directory; give the "
                             "training job's checkpoint directory")
        if not path.exists():
            print(f"warning: --follow {name}={directory}: no such directory (yet); model "
                  f"{name} serves its package's tables until checkpoints appear there",
                  file=sys.stderr)


def _check_custom_handlers(config, store: Path) -> None:
    """Warns of an ``--allow-custom-handler`` name that no package in the store (nor in
    ``--models``) has: allowances name packages (``model.name`` in MANIFEST.json), so a
    typo, or the name a package is served under (``--models NAME=...``), allows nothing.
    Not an error: such a package may be added and registered later.

    Args:
        config: the server's config (``allow_custom_handlers``, ``models``).
        store: the model store, resolved.
    """
    from dynembed.serving.package import read_manifest

    def package_name(folder: Path) -> str | None:
        try:
            return read_manifest(folder)["model"]["name"]
        except (ValueError, OSError):  # not a package
            return None

    # --models may name packages in subfolders, which iterdir does not see
    served = {name: package_name(store / url) for name, url in config.models.items()}
    packaged = {package_name(folder) for folder in store.iterdir()} | set(served.values())
    for name in config.allow_custom_handlers:
        if name in packaged:
            continue
        if name in served:
            print(f"warning: --allow-custom-handler {name}: no package of that name; "
                  f"--models {name}={config.models[name]} serves package {served[name]} "
                  f"(allow it with --allow-custom-handler {served[name]})", file=sys.stderr)
        else:
            print(f"warning: --allow-custom-handler {name}: no model of that name in "
                  "--model-store (allowances name packages: model.name in their "
                  "MANIFEST.json); it applies only if one is added later", file=sys.stderr)


def _serve(args) -> int:
    from dynembed.serving.package import read_manifest
    from dynembed.serving.server import ModelServer, ServerConfig

    models = _pairs(args.models, "--models", "NAME=PACKAGE")
    follow = _pairs(args.follow, "--follow", "NAME=CHECKPOINT_DIR")
    # checked here: ServerConfig's "follow names models not in models: [...]" named neither
    # the flag to add nor its value
    for name, directory in follow.items():
        if name not in models:
            raise ValueError(f"--follow {name}={directory}: no model {name} in --models; "
                             f"serve it at startup with --models {name}=PACKAGE")
    try:
        config = ServerConfig(
            model_store=args.model_store, models=models,
            inference_address=args.inference_address,
            management_address=args.management_address,
            metrics_address=args.metrics_address,
            management_auth=not args.disable_token_auth,
            inference_auth=args.inference_token_auth, key_file=args.key_file,
            default_workers=args.workers, batch_size=args.batch_size, preload=args.preload,
            processes=args.processes, max_batch_delay_ms=args.max_batch_delay,
            response_timeout_s=args.response_timeout, max_request_bytes=args.max_request_size,
            job_queue_size=args.job_queue_size,
            follow=follow,
            follow_interval_s=args.follow_interval,
            allow_custom_handlers=tuple(args.allow_custom_handler),
            graceful_timeout_s=args.graceful_timeout)
        server = ModelServer(config)  # checks model_store
    except ValueError as e:
        raise _with_flag(e, _SERVE_FLAGS) from None
    tokens = config.management_auth or config.inference_auth  # else no key file is written
    if tokens and _new_path(config.key_file, "--key-file", "key_file.json").is_dir():
        raise ValueError(f"--key-file {config.key_file}: is a directory; give a file path "
                         f"(e.g. {Path(config.key_file) / 'key_file.json'})")
    store = Path(config.model_store).resolve()
    for name, url in config.models.items():  # before the server starts: a clear error
        package = (store / url).resolve()
        if store not in package.parents:
            raise ValueError(f"--models {name}={url}: not a package inside --model-store")
        read_manifest(package)  # PackageError (a ValueError) naming what is wrong
    _check_follow(config)
    _check_custom_handlers(config, store)
    addresses = server.bind()
    for api, (host, port) in addresses.items():
        print(f"{api} API on http://{host}:{port}", file=sys.stderr)
    if config.management_auth:
        print(f"management token in {config.key_file}", file=sys.stderr)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again with
    # the handlers found at start: a finished graceful shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
