"""Inspect a live ``torch.nn.Module`` (the user's own object, in the user's own process).

The module is saved with ``torch.save`` to a temporary file and that file is read by the same
inert readers as any checkpoint, so the report is exactly the one its saved file gives: the same
layers, bias kinds (separate bias modules included) and totals.  Running the module is fine here,
since it is the caller's code: with ``input_size`` a forward pass on the meta device (no memory,
no arithmetic; on the CPU with zeros if the module cannot run on meta) records every conv's
output size through forward hooks, which a saved module does not hold.

torch is imported only when this module's function is called.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from biasinspect.analysis import analyze
from biasinspect.errors import UsageError
from biasinspect.model import ModelDescription, ModelReport


def _torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise UsageError("inspect_module needs torch installed (pip install torch)") from error
    return torch


def _output_sizes(module: Any, input_size: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Conv output spatial sizes by module path, from forward hooks on a meta (or CPU) pass."""
    torch = _torch()
    conv_types = (torch.nn.modules.conv._ConvNd,)
    last_error: Exception | None = None
    for device in ("meta", "cpu"):
        sizes: dict[str, tuple[int, ...]] = {}
        try:
            clone = copy.deepcopy(module).to(device).eval()
        except Exception as error:  # the user's module may refuse the device
            last_error = error
            continue
        handles = []
        for name, child in clone.named_modules():
            if isinstance(child, conv_types):

                def record(
                    _module: Any, _inputs: Any, output: Any, name: str = name, sizes: dict[str, Any] = sizes
                ) -> None:
                    if hasattr(output, "shape") and len(output.shape) > 2:
                        sizes[name] = tuple(int(d) for d in output.shape[2:])

                handles.append(child.register_forward_hook(record))
        try:
            with torch.no_grad():
                clone(torch.zeros(tuple(input_size), device=device))
            return sizes
        except Exception as error:  # an op without a meta kernel: try the CPU
            last_error = error
        finally:
            for handle in handles:
                handle.remove()
    raise UsageError(f"the module's forward pass failed for input_size {tuple(input_size)}: {last_error}")


def _with_sizes(description: ModelDescription, sizes: dict[str, tuple[int, ...]]) -> ModelDescription:
    convs = tuple(
        dataclasses.replace(conv, output_spatial=sizes[conv.name]) if conv.name in sizes else conv
        for conv in description.convs
    )
    return dataclasses.replace(description, convs=convs)


def inspect_module(
    module: Any, input_size: Sequence[int] | None = None, *, name: str | None = None
) -> ModelReport:
    """The report of a live ``torch.nn.Module``, as its ``torch.save`` file would give it.

    ``input_size`` (e.g. ``(1, 3, 32, 32)``) adds every conv's output size, from a forward pass
    on the meta device.  ``name`` is the path shown in the report (default ``<module ClassName>``).
    """
    torch = _torch()
    from biasinspect.api import read_file

    label = name or f"<module {type(module).__name__}>"
    handle, temp_path = tempfile.mkstemp(suffix=".pt", prefix="biasinspect-module-")
    os.close(handle)
    try:
        torch.save(module, temp_path)
        descriptions = read_file(Path(temp_path))
    finally:
        os.unlink(temp_path)
    description = dataclasses.replace(descriptions[0], path=label)
    if input_size is not None:
        description = _with_sizes(description, _output_sizes(module, input_size))
    return analyze(description)


__all__ = ["inspect_module"]
