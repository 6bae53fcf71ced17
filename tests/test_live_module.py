"""inspect_module on live torch modules: the same report as their saved files, plus output sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import biasinspect
from biasinspect.model import BiasKind, Report
from biasinspect.render import render

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
sys.path.insert(0, str(SAMPLES))
import make_samples as ms  # noqa: E402  (the sample models' own definitions)


def _conv_totals(model: biasinspect.model.ModelReport) -> tuple[object, ...]:
    t = model.totals
    return (t.conv_layers, t.tied, t.untied, t.absent, t.other, t.conv_weight_params, t.conv_bias_params)


@pytest.mark.parametrize(
    ("factory", "sample", "input_size"),
    [
        (ms.SeedTied, "seed_tied.onnx", (1, 3, 32, 32)),
        (ms.SeedUntied, "seed_untied.onnx", (1, 3, 32, 32)),
        (ms.ConvBN, "conv_bn.onnx", (1, 3, 16, 16)),
        (ms.ConvTranspose, "conv_transpose.onnx", (1, 16, 8, 8)),
        (ms.Depthwise, "depthwise.onnx", (1, 8, 16, 16)),
        (ms.SmallCNN, "small_cnn.pt", (1, 3, 16, 16)),
        (
            lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 32, 5, bias=False), ms.SpatialBias(32, 28, 28)),
            "separate_bias.pt",
            (1, 3, 32, 32),
        ),
    ],
)
def test_same_totals_as_the_sample_file(factory, sample, input_size):
    torch.manual_seed(0)
    live = biasinspect.inspect_module(factory().eval(), input_size=input_size)
    (saved,) = biasinspect.inspect(SAMPLES / sample).models
    assert _conv_totals(live) == _conv_totals(saved)
    assert [layer.bias.kind for layer in live.layers] == [layer.bias.kind for layer in saved.layers]
    if saved.format == "onnx" or sample == "separate_bias.pt":
        # Output sizes come from the forward pass and agree with ONNX shape inference (and with
        # the size the state dict's untied bias fixes).
        assert [layer.output_spatial for layer in live.layers] == [
            layer.output_spatial for layer in saved.layers
        ]
    if saved.format == "pytorch":
        assert live.totals.model_params == saved.totals.model_params


def test_same_report_as_its_own_saved_file(tmp_path):
    model = ms.SmallCNN().eval()
    torch.save(model, tmp_path / "model.pt")
    (saved,) = biasinspect.inspect(tmp_path / "model.pt").models
    live = biasinspect.inspect_module(model)
    assert live.layers == saved.layers
    assert live.totals == saved.totals
    assert live.path == "<module SmallCNN>"
    assert live.totals.model_params == sum(p.numel() for p in model.parameters())


def test_output_sizes_from_the_meta_pass():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1)
    )
    report = biasinspect.inspect_module(model, input_size=(1, 3, 33, 33))
    assert [layer.output_spatial for layer in report.layers] == [(15, 15), (15, 15)]
    assert report.layers[0].bias.kind is BiasKind.TIED


def test_a_forward_that_fails_is_one_clear_error():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(
        biasinspect.errors.UsageError, match=r"forward pass failed for input_size \(1, 5, 8, 8\)"
    ):
        biasinspect.inspect_module(model, input_size=(1, 5, 8, 8))


def test_notebook_representations():
    report = biasinspect.inspect(SAMPLES / "seed_untied.onnx")
    html = report._repr_html_()
    assert html.startswith('<div class="biasinspect"><style>')
    assert "1 conv layer: 0 tied (one bias per output channel), 1 untied" in html
    assert html.count('<g class="layer"') == 1
    assert report._repr_markdown_() == render(report, "markdown")
    assert report.models[0]._repr_markdown_() == render(Report(models=report.models), "markdown")
    diff = biasinspect.compare(SAMPLES / "seed_untied.onnx", SAMPLES / "seed_tied.onnx")
    assert "1 matched, 1 changed" in diff._repr_markdown_()
    assert "<!DOCTYPE html>" in diff._repr_html_()
