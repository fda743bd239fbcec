"""Argument checks shared by the examples' command lines.

A bad number is refused while the arguments are parsed, so the error names the flag
(``argument --batch-size: must be an int >= 1, got '0'``) instead of surfacing later as a
``ZeroDivisionError`` or as an error about a library parameter (``every_steps``,
``max_rows``) that the user never typed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` that accepts ints >= ``low`` and refuses anything else.

    Args:
        low: the smallest value accepted.

    Returns:
        A function of the flag's text that returns the int or raises
        ``argparse.ArgumentTypeError`` (which argparse reports with the flag's name).
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int >= {low}"  # what argparse names the type in its messages
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type`` that accepts finite floats > 0 (learning rates, temperatures).

    Args:
        text: the flag's text.

    Returns:
        The float.

    Raises:
        argparse.ArgumentTypeError: not a finite number > 0 (argparse names the flag).
    """
    try:
        value = float(text)
    except ValueError:
        value = None
    # `not 0 < value < inf` also refuses NaN
    if value is None or not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


positive_float.__name__ = "number > 0"
