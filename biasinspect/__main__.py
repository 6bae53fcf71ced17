"""``python -m biasinspect``: the console script, made safe to run from inside a model folder.

Under ``-m`` Python puts the current folder first on ``sys.path``, so every module imported
from here on (``tabulate``, ``onnx``, ``json``, ``zlib``...) could come from a ``tabulate.py``
planted beside the models being inspected.  The folder is taken off ``sys.path`` before anything
else is imported; ``os`` and ``sys`` are already loaded by the interpreter's start-up, so these
two imports cannot be shadowed.  (No ``from __future__`` import here for the same reason.)
"""

import os
import sys


def _drop_working_folder_from_path() -> None:
    """Remove ``''`` and every ``sys.path`` entry that is the current folder."""
    try:
        here = os.path.realpath(os.getcwd())
    except OSError:  # the current folder was deleted: only '' can still point at it
        here = None
    kept = []
    for entry in sys.path:
        if not entry or entry == ".":
            continue
        if here is not None and os.path.realpath(entry) == here:
            continue
        kept.append(entry)
    sys.path[:] = kept


_drop_working_folder_from_path()

from biasinspect.cli import console_main  # noqa: E402  (only after the path is safe)

if __name__ == "__main__":
    console_main()
