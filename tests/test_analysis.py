"""Classification, formulas, totals and calc: the pure rules of biasinspect.analysis."""

from __future__ import annotations

import pytest

from biasinspect.analysis import analyze, analyze_conv, calc, classify_term, layer_kind, totals_sentence
from biasinspect.errors import UsageError
from biasinspect.model import BiasKind, BiasSource, BiasTerm, ConvNode, ModelDescription

ADD = BiasSource.ADD
CONV = BiasSource.CONV


def conv(weight, *terms, groups=1, transposed=False, output=(28, 28), name="conv"):
    return ConvNode(
        name=name,
        op="ConvTranspose" if transposed else "Conv",
        weight_name=f"{name}.weight",
        weight_shape=weight,
        transposed=transposed,
        groups=groups,
        output_spatial=output,
        bias_terms=tuple(BiasTerm(f"b{i}", shape, source) for i, (shape, source) in enumerate(terms)),
    )


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((32,), BiasKind.OTHER),  # right-aligned against [N, 32, 28, 28]: 32 cannot broadcast onto W=28
        ((32, 1, 1), BiasKind.TIED),
        ((1, 32, 1, 1), BiasKind.TIED),
        ((32, 28, 28), BiasKind.UNTIED),
        ((1, 32, 28, 28), BiasKind.UNTIED),
        ((1, 1, 28, 28), BiasKind.UNTIED),  # any spatial extent > 1 is untied, whatever the channel extent
        ((28,), BiasKind.UNTIED),
        ((), BiasKind.OTHER),  # one scalar for every channel
        ((1,), BiasKind.OTHER),
        ((16, 1, 1), BiasKind.OTHER),  # wrong channel count
        ((4, 32, 1, 1), BiasKind.OTHER),  # batch-sized term
        ((1, 1, 32, 1, 1), BiasKind.OTHER),  # more dims than the output
        ((32, None, 28), BiasKind.OTHER),  # unknown spatial extent: not guessed
        (None, BiasKind.OTHER),
    ],
)
def test_add_terms_are_classified_by_broadcasting(shape, expected):
    term = BiasTerm("b", shape, ADD)
    assert classify_term(term, out_channels=32, spatial_rank=2, output_spatial=(28, 28)) is expected


def test_without_output_size_a_spatial_extent_still_means_untied():
    # The output size may be symbolic; the rule then rests on the term's own extents.
    assert classify_term(BiasTerm("b", (32,), ADD), 32, 2, output_spatial=None) is BiasKind.UNTIED
    assert (
        classify_term(BiasTerm("b", (32, 28, 28), ADD), 32, 2, output_spatial=(None, None)) is BiasKind.UNTIED
    )


def test_own_bias_input_is_always_tied_whatever_its_shape():
    assert classify_term(BiasTerm("b", (7,), CONV), out_channels=32, spatial_rank=2) is BiasKind.TIED


def test_channel_extent_needs_known_out_channels():
    assert classify_term(BiasTerm("b", (32, 1, 1), ADD), out_channels=None, spatial_rank=2) is BiasKind.OTHER


def test_one_dimensional_conv_terms():
    assert classify_term(BiasTerm("b", (16, 1), ADD), out_channels=16, spatial_rank=1) is BiasKind.TIED
    assert classify_term(BiasTerm("b", (16, 100), ADD), out_channels=16, spatial_rank=1) is BiasKind.UNTIED


def test_layer_kind_precedence():
    assert layer_kind([]) is BiasKind.ABSENT
    assert layer_kind([BiasKind.OTHER]) is BiasKind.OTHER
    assert layer_kind([BiasKind.OTHER, BiasKind.TIED]) is BiasKind.TIED
    assert layer_kind([BiasKind.TIED, BiasKind.UNTIED, BiasKind.OTHER]) is BiasKind.UNTIED


def test_seed_example_tied():
    layer = analyze_conv(conv((32, 3, 5, 5), ((32,), CONV)))
    assert layer.bias.kind is BiasKind.TIED
    assert (layer.in_channels, layer.out_channels, layer.weight_params, layer.bias.params) == (
        3,
        32,
        2400,
        32,
    )
    assert layer.bias.source is CONV
    assert layer.formula == "(3x5x5 + 1) x 32 = 2,432"


def test_seed_example_untied():
    layer = analyze_conv(conv((32, 3, 5, 5), ((32, 28, 28), ADD)))
    assert layer.bias.kind is BiasKind.UNTIED
    assert layer.bias.params == 25_088
    assert layer.bias.shape == (32, 28, 28)
    assert layer.formula == "3x5x5 x 32 + 32x28x28 = 27,488"


def test_untied_term_with_leading_batch_dim_reads_the_same():
    layer = analyze_conv(conv((32, 3, 5, 5), ((1, 32, 28, 28), ADD)))
    assert layer.formula == "3x5x5 x 32 + 32x28x28 = 27,488"


def test_absent_keeps_followed_by_and_formula():
    node = conv((64, 32, 3, 3))
    node = ConvNode(**{**node.__dict__, "followed_by": "BatchNormalization"})
    layer = analyze_conv(node)
    assert layer.bias.kind is BiasKind.ABSENT
    assert layer.bias.params == 0
    assert layer.bias.source is None
    assert layer.followed_by == "BatchNormalization"
    assert layer.formula == "32x3x3 x 64 = 18,432"


def test_followed_by_is_dropped_when_a_bias_exists():
    node = ConvNode(**{**conv((8, 4, 3, 3), ((8,), CONV)).__dict__, "followed_by": "BatchNormalization"})
    assert analyze_conv(node).followed_by is None


def test_grouped_conv_uses_in_over_groups():
    layer = analyze_conv(conv((32, 1, 3, 3), ((32,), CONV), groups=32))
    assert (layer.in_channels, layer.out_channels, layer.groups) == (32, 32, 32)
    assert layer.formula == "(1x3x3 + 1) x 32 = 320"


def test_conv_transpose_out_channels_are_dim1_times_group():
    layer = analyze_conv(conv((16, 4, 4, 4), ((8,), CONV), groups=2, transposed=True))
    assert (layer.in_channels, layer.out_channels) == (16, 8)
    assert layer.weight_params == 16 * 4 * 4 * 4
    assert layer.formula == "(8x4x4 + 1) x 8 = 1,032"


def test_conv_transpose_with_unknown_groups_writes_the_weight_shape():
    layer = analyze_conv(conv((16, 8, 4, 4), ((8,), CONV), groups=None, transposed=True))
    assert layer.out_channels is None
    assert layer.formula == "16x8x4x4 + 8 = 2,056"


def test_scalar_add_is_other_and_counted():
    layer = analyze_conv(conv((32, 3, 5, 5), ((), ADD)))
    assert layer.bias.kind is BiasKind.OTHER
    assert layer.bias.params == 1
    assert layer.formula == "3x5x5 x 32 + 1 = 2,401"


def test_own_bias_plus_untied_add_sum_both_terms():
    layer = analyze_conv(conv((32, 3, 5, 5), ((32,), CONV), ((32, 28, 28), ADD)))
    assert layer.bias.kind is BiasKind.UNTIED
    assert layer.bias.params == 32 + 25_088
    assert layer.bias.shape == (32, 28, 28)
    assert layer.formula == "3x5x5 x 32 + 32 + 32x28x28 = 27,520"


def test_unknown_dims_are_reported_not_guessed():
    layer = analyze_conv(conv((None, 3, 5, 5), ((32,), CONV)))
    assert layer.out_channels is None
    assert layer.weight_params is None
    assert layer.bias.kind is BiasKind.TIED
    assert layer.formula == "3x5x5 x ? + 32 = ?"


def test_unknown_weight_shape_entirely():
    layer = analyze_conv(conv(None))
    assert layer.weight_params is None
    assert layer.formula == "? = ?"


def test_totals_add_up_and_unknowns_propagate():
    description = ModelDescription(
        path="m.onnx",
        format="onnx",
        convs=(
            conv((32, 3, 5, 5), ((32,), CONV), name="a"),
            conv((32, 3, 5, 5), ((32, 28, 28), ADD), name="b"),
            conv((32, 3, 5, 5), name="c"),
            conv((32, 3, 5, 5), ((), ADD), name="d"),
        ),
        model_params=12345,
    )
    report = analyze(description)
    totals = report.totals
    assert (totals.conv_layers, totals.tied, totals.untied, totals.absent, totals.other) == (4, 1, 1, 1, 1)
    assert totals.conv_weight_params == sum(layer.weight_params for layer in report.layers) == 4 * 2400
    assert totals.conv_bias_params == sum(layer.bias.params for layer in report.layers) == 32 + 25_088 + 0 + 1
    assert totals.model_params == 12345
    assert totals_sentence(totals) == (
        "4 conv layers: 1 tied (one bias per output channel), 1 untied (one bias per channel and location), "
        "1 absent, 1 other"
    )
    unknown = analyze(ModelDescription("m", "onnx", (conv(None, name="x"),), None))
    assert unknown.totals.conv_weight_params is None
    assert any("unknown weight shape" in warning for warning in unknown.warnings)


def test_node_notes_become_model_warnings():
    node = ConvNode(**{**conv((8, 8, 3, 3)).__dict__, "notes": ("undetermined: no bias",)})
    report = analyze(ModelDescription("m", "safetensors", (node,), 576))
    assert report.warnings == ("conv: undetermined: no bias",)


def test_calc_seed_question():
    result = calc((3, 32, 32), (32, 5, 5))
    assert result.output_spatial == (28, 28)
    assert (result.tied_total, result.untied_total, result.weight_params) == (2432, 27488, 2400)
    assert result.tied_formula == "(3x5x5 + 1) x 32 = 2,432"
    assert result.untied_formula == "3x5x5 x 32 + 32x28x28 = 27,488"


def test_calc_stride_padding_dilation_groups():
    result = calc((8, 32, 32), (16, 3, 3), stride=(2,), padding=(1,), dilation=(1,), groups=2)
    assert result.output_spatial == (16, 16)
    assert result.weight_params == 4 * 3 * 3 * 16
    assert result.untied_bias_params == 16 * 16 * 16
    dilated = calc((3, 32, 32), (4, 3, 3), dilation=(2,))
    assert dilated.output_spatial == (28, 28)
    assert calc((3, 32, 31), (4, 3, 3), stride=(2,), padding="same").output_spatial == (16, 16)
    assert calc((3, 100), (4, 5)).output_spatial == (96,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (3, 32, 32), "filters": (32, 5)}, "--filters needs a count and 2 kernel size(s)"),
        ({"input_shape": (3,), "filters": (32, 5)}, "--input needs channels"),
        ({"input_shape": (3, 4, 4), "filters": (2, 5, 5)}, "does not fit"),
        ({"input_shape": (3, 32, 32), "filters": (32, 5, 5), "groups": 2}, "must divide"),
        ({"input_shape": (3, 32, 32), "filters": (32, 5, 5), "stride": (1, 1, 1)}, "--stride has 3 values"),
        ({"input_shape": (0, 32, 32), "filters": (32, 5, 5)}, "must be positive"),
    ],
)
def test_calc_rejects_bad_shapes(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        calc(**kwargs)


def test_a_note_shared_by_many_layers_is_one_warning():
    def noted(name):
        return ConvNode(**{**conv((8, 8, 3, 3), name=name).__dict__, "notes": ("undetermined: no bias",)})

    report = analyze(ModelDescription("m", "safetensors", tuple(noted(f"l{i}") for i in range(7)), None))
    assert report.warnings == ("7 layers: undetermined: no bias: l0, l1, l2, l3, l4 ...",)


def test_a_term_whose_alignment_is_unknown_is_other():
    # A state dict's extra bias-named [C] parameter: torch would broadcast it along W, but how the
    # model adds it is unknown, so it is reported, not interpreted.
    term = BiasTerm("extra_bias", (32,), ADD, aligned=False)
    assert classify_term(term, 32, 2, (32, 32)) is BiasKind.OTHER
