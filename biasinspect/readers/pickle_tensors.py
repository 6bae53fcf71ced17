"""Tensor rebuild helpers: torch's ``torch._utils._rebuild_*`` calls turned into
:class:`~biasinspect.readers.pickle_values.TensorRef` objects (argument layouts from
torch/_utils.py; nothing here calls torch, and no storage byte is read).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from biasinspect.errors import MalformedModelError
from biasinspect.readers.pickle_globals import NUMPY_DTYPES, TORCH_DTYPES
from biasinspect.readers.pickle_values import Call, GlobalRef, StorageRef, TensorRef, tensor_of
from biasinspect.readers.tensors import TensorInfo

if TYPE_CHECKING:
    from biasinspect.readers.pickle_inert import InertUnpickler

__all__ = ["NUMPY_RECONSTRUCT", "REBUILDERS", "Rebuilder", "numpy_tensor"]

NUMPY_RECONSTRUCT = frozenset({"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"})


def _shape(value: object, what: str) -> tuple[int, ...]:
    if isinstance(value, Call) and value.func_name == "torch.Size" and len(value.args) == 1:
        value = value.args[0]
    if not isinstance(value, (tuple, list)):
        raise MalformedModelError(f"malformed pickle: {what} of a tensor is not a tuple")
    dims: list[int] = []
    for dim in value:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0 or dim >= 1 << 62:
            raise MalformedModelError(f"malformed pickle: {what} of a tensor holds a non-size value")
        dims.append(dim)
    count = 1
    for dim in dims:
        count *= dim
    if count >= 1 << 63:
        raise MalformedModelError(f"malformed pickle: tensor shape {dims} has more than 2**63 elements")
    return tuple(dims)


def _offset(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedModelError("malformed pickle: tensor storage offset is not a non-negative int")
    return value


def _dtype_of_ref(value: object) -> str:
    if isinstance(value, GlobalRef) and value.module == "torch" and value.name in TORCH_DTYPES:
        return TORCH_DTYPES[value.name]
    return "unknown"


def _from_storage(
    storage: object, offset: object, size: object, what: str
) -> tuple[TensorInfo, StorageRef | None]:
    shape = _shape(size, what)
    off = _offset(offset)
    if isinstance(storage, StorageRef):
        dtype = storage.dtype or "unknown"
        return TensorInfo(shape, dtype, storage.key, off + storage.view_offset), storage
    # Storage we could not model (opaque blob, nested too deep): the shape is still a fact.
    return TensorInfo(shape, "unknown", None, off), None


def _rb_tensor_v2(u: InertUnpickler, args: tuple[object, ...]) -> object:
    if len(args) < 4:
        raise MalformedModelError("malformed pickle: _rebuild_tensor_v2 needs at least 4 arguments")
    info, storage = _from_storage(args[0], args[1], args[2], "size")
    _shape(args[3], "stride")
    return TensorRef(info, False, storage)


def _rb_tensor_v3(u: InertUnpickler, args: tuple[object, ...]) -> object:
    # (storage [untyped], storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])
    if len(args) < 7:
        raise MalformedModelError("malformed pickle: _rebuild_tensor_v3 needs at least 7 arguments")
    info, storage = _from_storage(args[0], args[1], args[2], "size")
    _shape(args[3], "stride")
    dtype = _dtype_of_ref(args[6])
    return TensorRef(TensorInfo(info.shape, dtype, info.storage_key, info.storage_offset), False, storage)


def _rb_device_tensor(u: InertUnpickler, args: tuple[object, ...]) -> object:
    # (data [cpu tensor or numpy array], dtype, device, requires_grad)
    data = tensor_of(args[0]) if args else None
    if data is None or len(args) < 2:
        return Call(GlobalRef("torch._utils", "_rebuild_device_tensor"), args)
    dtype = _dtype_of_ref(args[1])
    info = TensorInfo(
        data.info.shape,
        dtype if dtype != "unknown" else data.info.dtype,
        data.info.storage_key,
        data.info.storage_offset,
    )
    return TensorRef(info, False, data.storage)


def _rb_qtensor(u: InertUnpickler, args: tuple[object, ...]) -> object:
    if len(args) < 4:
        raise MalformedModelError("malformed pickle: _rebuild_qtensor needs at least 4 arguments")
    info, storage = _from_storage(args[0], args[1], args[2], "size")
    return TensorRef(info, False, storage)


def _rb_parameter(u: InertUnpickler, args: tuple[object, ...]) -> object:
    if not args:
        raise MalformedModelError("malformed pickle: _rebuild_parameter without data")
    data = tensor_of(args[0])
    if data is None:
        return Call(GlobalRef("torch._utils", "_rebuild_parameter"), args)
    return TensorRef(data.info, True, data.storage)


def _rb_wrapper_subclass(u: InertUnpickler, args: tuple[object, ...]) -> object:
    # (cls, dtype, size, stride, storage_offset, layout, device, requires_grad)
    if len(args) < 5:
        raise MalformedModelError("malformed pickle: _rebuild_wrapper_subclass needs at least 5 arguments")
    info = TensorInfo(_shape(args[2], "size"), _dtype_of_ref(args[1]), None, _offset(args[4]))
    return TensorRef(info, False, None)


def _rb_meta(u: InertUnpickler, args: tuple[object, ...]) -> object:
    # (dtype, size, stride, requires_grad)
    if len(args) < 2:
        raise MalformedModelError("malformed pickle: _rebuild_meta_tensor_no_storage needs 2 arguments")
    return TensorRef(TensorInfo(_shape(args[1], "size"), _dtype_of_ref(args[0])), False, None)


def _rb_from_type(u: InertUnpickler, args: tuple[object, ...]) -> object:
    # (func, new_type, args, state): emulate only when func is itself a known rebuilder.
    if len(args) >= 3 and isinstance(args[0], GlobalRef) and isinstance(args[2], tuple):
        handler = REBUILDERS.get(args[0].dotted)
        if handler is not None and handler is not _rb_from_type:
            inner = tensor_of(handler(u, args[2]))
            if inner is not None:
                is_param = isinstance(args[1], GlobalRef) and args[1].dotted in (
                    "torch.nn.parameter.Parameter",
                    "torch.nn.parameter.UninitializedParameter",
                )
                return TensorRef(inner.info, inner.is_parameter or is_param, inner.storage)
    # The helper calls func(*args): whatever func is, it runs under torch.load.
    if args:
        u.note_indirect_call(args[0])
    return Call(GlobalRef("torch._tensor", "_rebuild_from_type_v2"), args)


Rebuilder = Callable[["InertUnpickler", tuple[object, ...]], object]

REBUILDERS: dict[str, Rebuilder] = {
    "torch._utils._rebuild_tensor_v2": _rb_tensor_v2,
    "torch._utils._rebuild_tensor": _rb_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rb_tensor_v3,
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rb_device_tensor,
    "torch._utils._rebuild_device_tensor_from_numpy": _rb_device_tensor,
    "torch._utils._rebuild_qtensor": _rb_qtensor,
    "torch._utils._rebuild_parameter": _rb_parameter,
    "torch._utils._rebuild_parameter_with_state": _rb_parameter,
    "torch._utils._rebuild_wrapper_subclass": _rb_wrapper_subclass,
    "torch._utils._rebuild_meta_tensor_no_storage": _rb_meta,
    "torch._tensor._rebuild_from_type_v2": _rb_from_type,
    "torch._tensor._rebuild_from_type": _rb_from_type,
    "numpy.core.numeric._frombuffer": lambda u, args: _numpy_from_buffer("numpy.core.numeric", args),
    "numpy._core.numeric._frombuffer": lambda u, args: _numpy_from_buffer("numpy._core.numeric", args),
}


def _numpy_dtype_name(dtype_obj: object) -> str:
    if isinstance(dtype_obj, Call) and dtype_obj.args and isinstance(dtype_obj.args[0], str):
        return NUMPY_DTYPES.get(dtype_obj.args[0], "unknown")
    return "unknown"


def _numpy_from_buffer(module: str, args: tuple[object, ...]) -> Call:
    """numpy's protocol-5 array pickle, ``_frombuffer(buffer, dtype, shape, order)``: an array stub."""
    stub = Call(GlobalRef(module, "_frombuffer"), args)
    if len(args) == 4:
        try:
            shape = _shape(args[2], "shape")
        except MalformedModelError:
            return stub
        stub.tensor = TensorRef(TensorInfo(shape, _numpy_dtype_name(args[1])), False, None)
    return stub


def numpy_tensor(state: object) -> TensorRef | None:
    """numpy ``ndarray.__setstate__`` state: (version, shape, dtype, is_fortran, rawdata)."""
    if not isinstance(state, tuple) or len(state) != 5:
        return None
    shape_obj, dtype_obj = state[1], state[2]
    try:
        shape = _shape(shape_obj, "shape")
    except MalformedModelError:
        return None
    return TensorRef(TensorInfo(shape, _numpy_dtype_name(dtype_obj)), False, None)
