"""``model_params`` of a state dict (names, shapes and dtypes only).

Sum of elements of every floating/quantized tensor except buffers: names whose last
component is ``running_mean``, ``running_var``, ``num_batches_tracked`` or
``position_ids``; old spectral-norm ``X.weight_u``/``X.weight_v`` (when ``X.weight_orig``
exists); new spectral-norm ``X.parametrizations.<p>.<i>._u``/``._v``.  Names that share
one storage (same ``storage_key``, offset, shape and dtype) are counted once, as
``model.parameters()`` does for tied weights.  The ``scale`` / ``zero_point`` of an
eager-mode quantized module (beside a quantized weight, or alone in a converted QuantStub)
are buffers too; the quantized weights and biases themselves count, as for pickled modules.
So are the tensors of torch.ao.quantization observers and fake-quantize modules (modules
named ``activation_post_process*`` or ``weight_fake_quant`` by ``prepare``/``prepare_qat``:
``scale``, ``zero_point``, ``min_val``, ``max_val``, ``eps``...), except the ``scale`` and
``zero_point`` of a learnable fake-quantize (it has ``learning_enabled``): parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from biasinspect.readers.tensors import QUANTIZED_DTYPES, TensorInfo, split_name

BUFFER_LEAVES = frozenset({"running_mean", "running_var", "num_batches_tracked", "position_ids"})
"""Last name components that are buffers, never parameters (excluded from model_params)."""

_Leaves = Mapping[str, Mapping[str, str]]
"""module -> {leaf: full name} for the module's direct tensors."""


def count_model_params(names: Sequence[str], infos: Mapping[str, TensorInfo], leaves: _Leaves) -> int:
    """Elements of every floating/quantized tensor in ``names`` that is not a buffer, names that
    share one storage (same key, offset, shape and dtype) once."""
    buffers = _buffer_names(names, infos, leaves)
    seen: set[tuple[str, int, tuple[int, ...], str]] = set()
    total = 0
    for name in names:
        info = infos[name]
        if name in buffers or not info.is_parameter_dtype:
            continue
        if info.storage_key is not None:
            alias = (info.storage_key, info.storage_offset, info.shape, info.dtype)
            if alias in seen:
                continue
            seen.add(alias)
        total += info.numel()
    return total


def _buffer_names(names: Sequence[str], infos: Mapping[str, TensorInfo], leaves: _Leaves) -> set[str]:
    """Names of floating buffers that must not count as parameters."""
    buffers: set[str] = set()
    for name in names:
        module, leaf = split_name(name)
        spectral_old = leaf in ("weight_u", "weight_v") and "weight_orig" in leaves.get(module, {})
        spectral_new = leaf in ("_u", "_v") and ".parametrizations." in f".{name}"
        if (
            leaf in BUFFER_LEAVES
            or spectral_old
            or spectral_new
            or _is_quantization_param(infos, leaves, module, leaf)
            or _is_observer_state(leaves, module, leaf)
        ):
            buffers.add(name)
    return buffers


def _is_observer_state(leaves: _Leaves, module: str, leaf: str) -> bool:
    """A tensor of a torch.ao.quantization observer or fake-quantize module, which hold only
    buffers (a QAT or calibrated checkpoint: ``conv.weight_fake_quant.scale``,
    ``conv.activation_post_process.activation_post_process.min_val``; FX mode names them
    ``activation_post_process_3``).  ``prepare``/``prepare_qat`` fix these module names.  The
    exception is the learnable fake-quantize (LSQ, it has a ``learning_enabled`` flag), whose
    ``scale`` and ``zero_point`` are parameters."""
    owner = split_name(module)[1]
    if owner != "weight_fake_quant" and not owner.startswith("activation_post_process"):
        return False
    return not (leaf in ("scale", "zero_point") and "learning_enabled" in leaves.get(module, {}))


def _is_quantization_param(infos: Mapping[str, TensorInfo], leaves: _Leaves, module: str, leaf: str) -> bool:
    """``X.scale`` / ``X.zero_point`` of an eager-mode quantized module (a quantized conv or
    linear beside a quantized weight, or a converted QuantStub holding only those two): its
    output quantization parameters, a buffer in PyTorch, not a parameter."""
    if leaf not in ("scale", "zero_point"):
        return False
    own = leaves.get(module, {})
    if set(own) <= {"scale", "zero_point"}:
        return "zero_point" in own
    return any(infos[name].dtype in QUANTIZED_DTYPES for name in own.values())
