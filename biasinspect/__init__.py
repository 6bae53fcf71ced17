"""biasinspect: classify every convolution's bias (tied, untied, absent) in model files.

Library use::

    import biasinspect
    report = biasinspect.inspect("model.onnx")
    for model in report.models:
        for layer in model.layers:
            print(layer.name, layer.bias.kind, layer.formula)

Nothing heavy is imported here: onnx is imported only when an ONNX file is read, and torch only by
:func:`inspect_module` (a live module: the caller's own object).

This module runs no import statement at all, not even ``from __future__``: under
``python -m biasinspect`` it is imported before ``__main__`` can take the current folder off
``sys.path``, so any module it imported could be a planted ``typing.py`` or ``__future__.py`` in
the model folder the command is run from.
"""

__version__ = "0.1.0"

TYPE_CHECKING = False  # mypy treats any name TYPE_CHECKING as true; typing is not imported
if TYPE_CHECKING:
    import os
    from collections.abc import Sequence
    from typing import Any

    from biasinspect.diff import DiffReport
    from biasinspect.model import ModelReport, Report

__all__ = ["__version__", "compare", "inspect", "inspect_module"]


def inspect(*paths: "str | os.PathLike[str]", jobs: int = 1, timeout: "float | None" = None) -> "Report":
    """Inspect model files, folders or URLs; see :func:`biasinspect.api.inspect`."""
    from biasinspect.api import inspect as _inspect

    return _inspect(*paths, jobs=jobs, timeout=timeout)


def inspect_module(module: "Any", input_size: "Sequence[int] | None" = None) -> "ModelReport":
    """Inspect a live ``torch.nn.Module``; see :func:`biasinspect.live.inspect_module`."""
    from biasinspect.live import inspect_module as _inspect_module

    return _inspect_module(module, input_size)


def compare(source: "str | os.PathLike[str]", export: "str | os.PathLike[str]") -> "DiffReport":
    """Compare the conv layers of two model files (the first weight set of each); raises a
    :class:`~biasinspect.errors.BiasInspectError` when either cannot be inspected."""
    from pathlib import Path

    from biasinspect.api import inspect_file
    from biasinspect.diff import diff_models
    from biasinspect.errors import UnsupportedFormatError

    sides = []
    for path in (source, export):
        models = inspect_file(Path(path))
        if not models:
            raise UnsupportedFormatError(f"{path}: no model found")
        sides.append(models[0])
    return diff_models(sides[0], sides[1])
