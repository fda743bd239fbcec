"""Warnings that point at the user's line, behind dynembed's and torch's own frames."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_LIBRARY_DIRS = tuple(os.path.dirname(path) + os.sep for path in (__file__, torch.__file__))
"""dynembed's package directory and torch's."""


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside dynembed and torch: a lookup or a
    backward reaches the code that warns through a varying number of module and autograd
    frames, so no fixed ``stacklevel`` names the user's line. Generated code between
    them (a dataclass's ``__init__``, whose file is ``<string>``) is skipped too."""
    frame, level = sys._getframe(0), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_LIBRARY_DIRS)
                                 or frame.f_code.co_filename == "<string>"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
