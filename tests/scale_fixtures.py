"""Files for the --jobs, jsonl, progress and Dask tests, written with onnx.helper and safetensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx_builders import conv_model, save
from safetensors.numpy import save_file

MODEL_FILES = 12
"""Readable models in :func:`build_folder` (over the progress bar's threshold of 8 files)."""


def build_folder(root: Path) -> Path:
    """A folder of small models (tied, absent and strided ONNX convs, safetensors state dicts in a
    sub-folder) and one file that is not a model, so every run has a failure to report."""
    folder = root / "models"
    (folder / "nested").mkdir(parents=True)
    for index in range(8):
        channels = 4 + index
        model = conv_model(weight=(channels, 3, 3, 3), bias=index % 2 == 0, strides=[1 + index % 2] * 2)
        save(model, folder / f"conv_{index:02d}.onnx")
    for index in range(4):
        channels = 8 + index
        save_file(
            {
                "conv.weight": np.zeros((channels, 3, 3, 3), np.float32),
                "conv.bias": np.zeros((channels,), np.float32),
            },
            str(folder / "nested" / f"state_{index}.safetensors"),
        )
    (folder / "notes.pt").write_bytes(b"these are notes, not a model\n")
    return folder


def write_slow_pickle(path: Path, items: int = 2_400_000) -> Path:
    """A plain pickle of one long list of small ints: valid and harmless, but it keeps the inert
    unpickler busy for seconds of CPU time (about 2 s per million items here)."""
    path.write_bytes(b"\x80\x02]q\x00(" + b"K\x01" * items + b"e.")
    return path
