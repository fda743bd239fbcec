"""The ``dynembed`` command line: ``dynembed inspect CKPT``, ``dynembed train SCRIPT``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dynembed.errors import DynembedError


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
            keys = ", ".join(f"{k['key'] if k['key'] is not None else k['id']} ({k['count']})"
                             for k in t["top_keys"])
            print(f"    top keys by count: {keys}", file=out)


def _inspect(args) -> int:
    """``dynembed inspect``."""
    from dynembed.checkpoint import manifest as mf
    from dynembed.checkpoint.inspect import describe, history, plot_history

    path = Path(args.checkpoint)
    directory = path if not (path / mf.MANIFEST).exists() else path.parent
    if not (path / mf.MANIFEST).exists():  # a directory of checkpoints: show the newest
        points = history(path)
        if not points:
            print(f"error: {path} is neither a checkpoint nor a directory of checkpoints",
                  file=sys.stderr)
            return 2
        path = Path(points[-1]["path"])
    info = describe(path, top=args.top)
    if args.json:
        info["history"] = history(directory)
        print(json.dumps(info, indent=1))
    else:
        _print_summary(info, sys.stdout)
        for point in history(directory):
            rows = ", ".join(f"{n} {r:,}" for n, r in point["rows"].items())
            print(f"  {Path(point['path']).name} ({point['kind']}): {rows}")
    if args.plot:
        plot_history(directory, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dynembed`` command."""
    parser = argparse.ArgumentParser(prog="dynembed", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect", help="what a checkpoint holds, and rows per table over a directory")
    inspect.add_argument("checkpoint", help="a checkpoint, or a directory of checkpoints")
    inspect.add_argument("--top", type=int, default=10, help="top keys by count per table")
    inspect.add_argument("--plot", metavar="PNG",
                         help="draw rows per table across the directory's checkpoints")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=_inspect)
    _add_train(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "inspect" and args.top < 0:
        parser.error("--top must be >= 0")
    if args.command == "train" and args.script is None:
        parser.error("give the training script (or -m and a module)")
    try:
        return args.run(args)
    except (DynembedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train", help="run a training script on torchrun (elastic, restarts on failure)",
        description="Runs SCRIPT with torchrun: c10d rendezvous, restarts on failure, worker "
                    "logs in --log-dir, and a progress bar fed by the script's "
                    "dynembed.train.Runtime. Arguments after the script go to it.")
    train.add_argument("--nnodes", default="1", help="nodes: N, or MIN:MAX (elastic)")
    train.add_argument("--nproc-per-node", type=int, default=1, help="workers per node")
    train.add_argument("--max-restarts", type=int, default=3,
                       help="restarts of the workers after failures before giving up")
    train.add_argument("--rdzv-endpoint", default=None,
                       help="HOST:PORT of the rendezvous (needed with several nodes)")
    train.add_argument("--rdzv-id", default="dynembed", help="job id shared by its nodes")
    train.add_argument("--rdzv-conf", default=None,
                       help="more rendezvous settings, e.g. join_timeout=600,last_call_timeout=5")
    train.add_argument("--log-dir", default="runs/logs", help="worker logs and progress")
    train.add_argument("--tee", action="store_true", help="also show the workers' output")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("-m", dest="module", action="store_true",
                       help="SCRIPT is a module to run as python -m SCRIPT")
    train.add_argument("script", nargs="?", default=None, help="the training script")
    train.add_argument("script_args", nargs=argparse.REMAINDER,
                       help="arguments of the script")
    train.set_defaults(run=_train)


def _train(args) -> int:
    from dynembed.train.launch import LaunchConfig, launch

    config = LaunchConfig(script=args.script, script_args=list(args.script_args),
                          module=args.module, nnodes=args.nnodes,
                          nproc_per_node=args.nproc_per_node,
                          max_restarts=args.max_restarts, rdzv_endpoint=args.rdzv_endpoint,
                          rdzv_id=args.rdzv_id, rdzv_conf=args.rdzv_conf,
                          log_dir=args.log_dir, tee=args.tee)
    return launch(config, show_progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
