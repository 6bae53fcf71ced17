"""Loading the parts of onnx the ONNX reader uses (protobuf classes, C++ shape inference), cheaply."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------
# Importing onnx cheaply
#
# ``import onnx`` costs ~0.2 s, most of it numpy and helper modules this reader never uses; for a
# command-line run that is most of the wall time.  All the reader needs is the generated protobuf
# classes (onnx/onnx_ml_pb2.py) and the C++ shape inference (the onnx_cpp2py_export extension), so
# when onnx is not imported yet those two modules are loaded on their own, under their real names,
# so that a later ``import onnx`` in the same process reuses them (the extension cannot be
# initialised twice).  A one-shot import hook then sets them as attributes of the ``onnx``
# package once it is imported, as onnx's own __init__ would have.  Any failure falls back to a
# plain ``import onnx``.


@dataclass(frozen=True)
class _OnnxApi:
    """The parts of onnx the reader uses."""

    pb: Any
    """The onnx_ml_pb2 module (ModelProto, GraphProto, ...)."""
    infer: Any
    """onnx_cpp2py_export.shape_inference.infer_shapes(bytes, check_type, strict_mode, data_prop)."""

    def infer_shapes(self, model: Any, data_propagation: bool = True) -> Any:
        """ONNX shape inference (with data propagation unless told otherwise), non-strict; raises
        on failure."""
        result = self.pb.ModelProto()
        result.ParseFromString(self.infer(model.SerializeToString(), False, False, data_propagation))
        return result


_ONNX_CORE = ("onnx.onnx_ml_pb2", "onnx.onnx_cpp2py_export")
_onnx_api: _OnnxApi | None = None
_light_import_allowed = False


def allow_light_onnx_import() -> None:
    """Let the reader load only onnx's core modules (see above).

    Only the command line calls this: it owns its process, so nothing else there expects the full
    ``onnx`` package.  Library users get an ordinary ``import onnx``.
    """
    global _light_import_allowed
    _light_import_allowed = True


class _OnnxPackageHook(importlib.abc.MetaPathFinder):
    """Sets the light-loaded core modules as attributes of ``onnx`` when it is imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "onnx":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _AttributeRestoringLoader(spec.loader)
        return spec


class _AttributeRestoringLoader(importlib.abc.Loader):
    """Delegates to the real loader, then attaches the core submodules to the package."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        for name in _ONNX_CORE:
            if name in sys.modules:
                setattr(module, name.rsplit(".", 1)[1], sys.modules[name])
        self._inner.exec_module(module)


def _load_onnx_core() -> _OnnxApi | None:
    """Load onnx_ml_pb2 and the C++ extension without the onnx package; None if not possible."""
    spec = importlib.util.find_spec("onnx")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    extension = next(
        (
            folder / name
            for name in sorted(os.listdir(folder))
            if name.startswith("onnx_cpp2py_export.")
            and name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        ),
        None,
    )
    pb_path = folder / "onnx_ml_pb2.py"
    if extension is None or not pb_path.is_file():
        return None
    loaded = []
    for name, path, loader in (
        ("onnx.onnx_ml_pb2", pb_path, None),
        (
            "onnx.onnx_cpp2py_export",
            extension,
            importlib.machinery.ExtensionFileLoader("onnx.onnx_cpp2py_export", str(extension)),
        ),
    ):
        module_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
        if module_spec is None or module_spec.loader is None:
            return None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        loaded.append(module)
    sys.meta_path.insert(0, _OnnxPackageHook())
    return _OnnxApi(pb=loaded[0], infer=loaded[1].shape_inference.infer_shapes)


_onnx_lock = threading.Lock()
"""URLs are read in threads (``--jobs``): the first load must happen once, not half-way twice
(a second thread would otherwise see a partly imported ``onnx`` package)."""


def _onnx() -> _OnnxApi:
    """The onnx pieces the reader needs, loaded once (thread-safe)."""
    if _onnx_api is not None:
        return _onnx_api
    with _onnx_lock:
        return _load_once()


def _load_once() -> _OnnxApi:
    global _onnx_api
    if _onnx_api is None:
        api = None
        light_possible = "onnx" not in sys.modules and not any(name in sys.modules for name in _ONNX_CORE)
        if _light_import_allowed and light_possible:
            try:
                api = _load_onnx_core()
            except Exception:  # any surprise: fall back to the ordinary import below
                api = None
        if api is None:
            import onnx
            import onnx.onnx_cpp2py_export.shape_inference as inference

            api = _OnnxApi(pb=onnx.onnx_ml_pb2, infer=inference.infer_shapes)
        _onnx_api = api
    return _onnx_api
