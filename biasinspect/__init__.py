"""biasinspect: classify every convolution's bias (tied, untied, absent) in model files.

Library use::

    import biasinspect
    report = biasinspect.inspect("model.onnx")
    for model in report.models:
        for layer in model.layers:
            print(layer.name, layer.bias.kind, layer.formula)

Nothing heavy is imported here: onnx is imported only when an ONNX file is read, and torch never.

This module runs no import statement at all, not even ``from __future__``: under
``python -m biasinspect`` it is imported before ``__main__`` can take the current folder off
``sys.path``, so any module it imported could be a planted ``typing.py`` or ``__future__.py`` in
the model folder the command is run from.
"""

__version__ = "0.1.0"

TYPE_CHECKING = False  # mypy treats any name TYPE_CHECKING as true; typing is not imported
if TYPE_CHECKING:
    import os

    from biasinspect.model import Report

__all__ = ["__version__", "inspect"]


def inspect(*paths: "str | os.PathLike[str]") -> "Report":
    """Inspect model files or folders; see :func:`biasinspect.api.inspect`."""
    from biasinspect.api import inspect as _inspect

    return _inspect(*paths)
