"""biasinspect: classify every convolution's bias (tied, untied, absent) in model files.

Library use::

    import biasinspect
    report = biasinspect.inspect("model.onnx")
    for model in report.models:
        for layer in model.layers:
            print(layer.name, layer.bias.kind, layer.formula)

Nothing heavy is imported here: onnx is imported only when an ONNX file is read, and torch never.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    import os

    from biasinspect.model import Report

__all__ = ["__version__", "inspect"]


def inspect(*paths: str | os.PathLike[str], jobs: int = 1) -> Report:
    """Inspect model files or folders; see :func:`biasinspect.api.inspect`."""
    from biasinspect.api import inspect as _inspect

    return _inspect(*paths, jobs=jobs)
