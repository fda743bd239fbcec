"""The ``dynembed`` command line: ``dynembed inspect CKPT``."""

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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.top < 0:
        parser.error("--top must be >= 0")
    try:
        return _inspect(args)
    except DynembedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
