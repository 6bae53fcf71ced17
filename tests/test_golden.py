"""Golden outputs: the exact table and JSON for the committed samples, and rows that add up to totals.

After an intended change of output, regenerate with ``BIASINSPECT_REGEN_GOLDEN=1 pytest tests/test_golden.py``
and review the diff: these files are what users see and what scripts parse.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from biasinspect import __version__
from biasinspect.api import inspect
from biasinspect.cli import main

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
SAMPLE_NAMES = [
    "seed_tied.onnx", "seed_untied.onnx", "conv_bn.onnx", "conv_transpose.onnx", "depthwise.onnx",
    "quantized_conv.onnx", "seed_tied.safetensors", "small_cnn.pt", "separate_bias.pt",
]  # fmt: skip
REGENERATE = os.environ.get("BIASINSPECT_REGEN_GOLDEN") == "1"


def _cli_output(*argv: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    assert main(list(argv), stdout=out, stderr=err) == 0, err.getvalue()
    return out.getvalue()


def _check(name: str, actual: str) -> None:
    path = GOLDEN / name
    if REGENERATE:
        path.write_text(actual)
    assert path.exists(), f"missing golden file {name}; regenerate with BIASINSPECT_REGEN_GOLDEN=1"
    assert actual == path.read_text()


@pytest.mark.parametrize("fmt", ["table", "json", "markdown", "csv"])
def test_all_samples_golden(monkeypatch, fmt):
    monkeypatch.chdir(ROOT)
    output = _cli_output(*(f"samples/{name}" for name in SAMPLE_NAMES), "--format", fmt)
    if fmt == "json":
        output = output.replace(f'"version": "{__version__}"', '"version": "X"')
    _check(f"samples.{ {'table': 'txt', 'json': 'json', 'markdown': 'md', 'csv': 'csv'}[fmt] }", output)


def test_seed_untied_table_golden(monkeypatch):
    monkeypatch.chdir(ROOT)
    _check("seed_untied.txt", _cli_output("samples/seed_untied.onnx"))


def test_json_golden_is_valid_json_with_all_samples():
    data = json.loads((GOLDEN / "samples.json").read_text())
    assert [Path(model["path"]).name for model in data["models"]] == SAMPLE_NAMES


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_rows_add_up_to_totals(name):
    (model,) = inspect(ROOT / "samples" / name).models
    totals = model.totals
    assert totals.conv_layers == len(model.layers)
    assert totals.conv_weight_params == sum(layer.weight_params for layer in model.layers)
    assert totals.conv_bias_params == sum(layer.bias.params for layer in model.layers)
    kinds = [str(layer.bias.kind) for layer in model.layers]
    assert (totals.tied, totals.untied, totals.absent, totals.other) == tuple(
        kinds.count(kind) for kind in ("tied", "untied", "absent", "other")
    )
    for layer in model.layers:
        stated_total = int(layer.formula.rsplit("= ", 1)[1].replace(",", ""))
        assert stated_total == layer.weight_params + layer.bias.params
    assert totals.model_params >= totals.conv_weight_params + totals.conv_bias_params


@pytest.mark.parametrize(
    "argv",
    [
        ["samples/seed_untied.onnx"],
        ["samples/separate_bias.pt"],
        ["calc", "--input", "3x32x32", "--filters", "32x5x5"],
    ],
)
def test_readme_shows_the_real_output(monkeypatch, argv):
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    block = f"$ biasinspect {' '.join(argv)}\n" + _cli_output(*argv)
    assert block in readme
