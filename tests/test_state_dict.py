"""State-dict heuristics (biasinspect.readers.state_dict) on real torch modules' state dicts."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from biasinspect.analysis import analyze, classify_term
from biasinspect.model import BiasKind, BiasSource, BiasTerm, ConvNode, ModelDescription
from biasinspect.readers.state_dict import describe_state_dict, natural_sort_key
from biasinspect.readers.tensors import TensorInfo

ADD = BiasSource.ADD
CONV = BiasSource.CONV


def infos(state: Mapping[str, torch.Tensor], *, storage: bool = False) -> dict[str, TensorInfo]:
    """TensorInfo for each tensor; with ``storage``, keys name the tensor's storage like a torch zip."""
    keys: dict[int, str] = {}
    result = {}
    for name, tensor in state.items():
        key = None
        if storage:
            pointer = tensor.untyped_storage().data_ptr()
            key = keys.setdefault(pointer, str(len(keys)))
        dtype = str(tensor.dtype).removeprefix("torch.")
        result[name] = TensorInfo(
            tuple(tensor.shape), dtype, key, int(tensor.storage_offset()) if storage else 0
        )
    return result


def describe(module_or_state: nn.Module | Mapping[str, torch.Tensor], **kwargs: object) -> ModelDescription:
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return describe_state_dict(infos(state), path="model.pt", format="pytorch", **kwargs)  # type: ignore[arg-type]


def by_name(description: ModelDescription) -> dict[str, ConvNode]:
    return {conv.name: conv for conv in description.convs}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- model zoo used by several tests -------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )


class ResNetish(nn.Module):
    """torchvision-style ResNet naming: conv1/bn1, layerN.i.convK/bnK, downsample.0/.1, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.fc = nn.Linear(32, 10)


RESNET_CONVS = [
    "conv1",
    "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
    "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv1", "layer2.1.conv2",
]  # fmt: skip


def vggish() -> nn.Module:
    """torchvision-style VGG with BN: features.N indices past 10, biased convs, classifier."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (8, "M", 16, 16, "M", 32, 32):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            assert isinstance(width, int)
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
    model = nn.Module()
    model.features = nn.Sequential(*layers)
    model.classifier = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 10))
    return model


# --- conv detection ------------------------------------------------------------------------------


def test_conv_ranks_3_4_5_with_bias_are_convs() -> None:
    model = nn.Module()
    model.c1 = nn.Conv1d(3, 8, 5)
    model.c2 = nn.Conv2d(3, 8, (3, 5))
    model.c3 = nn.Conv3d(3, 8, 3)
    model.fc = nn.Linear(4, 4)  # rank 2: not a conv
    model.emb = nn.Embedding(10, 4)
    description = describe(model)
    assert [c.name for c in description.convs] == ["c1", "c2", "c3"]
    c1, c2, c3 = description.convs
    assert (c1.op, c2.op, c3.op) == ("Conv1d", "Conv2d", "Conv3d")
    assert c2.weight_name == "c2.weight"
    assert c2.weight_shape == (8, 3, 3, 5)
    assert c2.kernel_shape == (3, 5)
    assert c3.kernel_shape == (3, 3, 3)
    assert all(c.transposed is False and c.groups is None and c.output_spatial is None for c in (c1, c2, c3))
    assert c1.bias_terms == (BiasTerm("c1.bias", (8,), CONV),)
    assert all(c.notes == () and c.followed_by is None for c in (c1, c2, c3))
    assert description.model_params == n_params(model)
    assert description.path == "model.pt" and description.format == "pytorch"


@pytest.mark.parametrize(
    ("layer", "op"),
    [
        (nn.ConvTranspose1d(4, 6, 3), "ConvTranspose1d"),
        (nn.ConvTranspose2d(4, 6, 3), "ConvTranspose2d"),
        (nn.ConvTranspose3d(4, 6, 3), "ConvTranspose3d"),
    ],
)
def test_transposed_detected_from_bias_length_equal_to_dim1(layer: nn.Module, op: str) -> None:
    model = nn.Module()
    model.up = layer
    (conv,) = describe(model).convs
    assert conv.op == op
    assert conv.transposed is True
    assert conv.groups == 1  # C_out = dim1 x groups = bias length = dim1
    assert conv.weight_shape is not None and conv.weight_shape[:2] == (4, 6)
    assert conv.bias_terms == (BiasTerm("up.bias", (6,), CONV),)
    assert conv.notes == ("ConvTranspose inferred: bias length 6 = weight dim1 (groups 1)",)


def test_equal_dims_and_bias_is_undetermined() -> None:
    model = nn.Module()
    model.mid = nn.Conv2d(8, 8, 3)
    (conv,) = describe(model).convs
    assert conv.transposed is None
    assert conv.op == "Conv2d?"
    assert conv.bias_terms == (BiasTerm("mid.bias", (8,), CONV),)
    assert conv.notes == ("undetermined: Conv or ConvTranspose (weight dims 0, 1 and the bias all 8)",)


def test_no_bias_is_undetermined() -> None:
    model = nn.Module()
    model.body = nn.Conv2d(3, 8, 3, bias=False)
    model.square = nn.Conv2d(8, 8, 3, bias=False)
    body, square = describe(model).convs
    assert body.transposed is None and body.op == "Conv2d?" and body.bias_terms == ()
    assert body.notes == ("undetermined: no bias to tell Conv from ConvTranspose",)
    assert square.transposed is None
    assert square.notes == (
        "undetermined: Conv or ConvTranspose (weight dims 0 and 1 are equal and there is no bias)",
    )


def test_name_hints_transposed_and_says_so() -> None:
    model = nn.Module()
    model.deconv1 = nn.ConvTranspose2d(8, 4, 3, bias=False)
    model.decoder_upconv = nn.ConvTranspose2d(8, 8, 3)
    model.ConvTranspose = nn.ConvTranspose2d(4, 4, 1, bias=False)
    convs = by_name(describe(model))
    assert convs["deconv1"].transposed is True and convs["deconv1"].op == "ConvTranspose2d"
    assert convs["deconv1"].notes == ("ConvTranspose inferred from the module name (no bias to confirm it)",)
    assert convs["decoder_upconv"].transposed is True
    assert convs["decoder_upconv"].notes == (
        "ConvTranspose inferred from the module name (weight dims 0, 1 and the bias all 8)",
    )
    assert convs["ConvTranspose"].transposed is True


def test_name_hint_does_not_override_a_conv_shaped_bias_without_saying_so() -> None:
    model = nn.Module()
    model.deconv = nn.Conv2d(3, 8, 3)  # the bias matches dim0: a Conv (or a grouped ConvTranspose)
    model.upconv = nn.Conv2d(6, 8, 3)
    convs = by_name(describe(model))
    # 8 % 3 and 8 % 6 != 0: no grouped ConvTranspose has these shapes, the bias proves a Conv.
    assert convs["deconv"].transposed is False and convs["deconv"].notes == ()
    assert convs["upconv"].transposed is False and convs["upconv"].notes == ()
    # A depthwise-like shape (dim1 divides dim0) stays undetermined:
    depthwise = nn.Module()
    depthwise.deconv = nn.ConvTranspose2d(8, 8, 3, groups=8)  # weight [8, 1, 3, 3], bias [8]
    (conv,) = describe(depthwise).convs
    assert conv.transposed is None
    assert conv.notes == (
        "undetermined: the name suggests ConvTranspose but bias length 8 = weight dim0 fits a Conv"
        " (or a grouped ConvTranspose)",
    )


@pytest.mark.parametrize(
    ("layer", "weight", "bias", "groups"),
    [
        (nn.ConvTranspose2d(4, 6, 3, groups=2), (4, 3, 3, 3), 6, 2),
        (nn.ConvTranspose2d(8, 4, 2, groups=2), (8, 2, 2, 2), 4, 2),
        (nn.ConvTranspose1d(12, 6, 1, groups=3), (12, 2, 1), 6, 3),
    ],
)
def test_bias_length_dim1_times_groups_proves_a_grouped_conv_transpose(
    layer: nn.Module, weight: tuple[int, ...], bias: int, groups: int
) -> None:
    # A Conv's bias length is always dim0; L != dim0 with L = dim1 x g (g dividing dim0) is a
    # ConvTranspose with groups g, and C_out = L.
    model = nn.Module()
    model.up = layer
    (conv,) = describe(model).convs
    assert conv.weight_shape == weight
    assert conv.transposed is True and conv.groups == groups
    assert conv.bias_terms == (BiasTerm("up.bias", (bias,), CONV),)
    assert conv.notes == (
        f"ConvTranspose inferred: bias length {bias} = weight dim1 ({weight[1]}) x groups {groups}",
    )
    (layer_report,) = analyze(describe(model)).layers
    assert layer_report.out_channels == bias and layer_report.groups == groups


@pytest.mark.parametrize(
    ("weight", "bias"),
    [
        ((4, 3, 3, 3), 5),  # 5 is no multiple of dim1
        ((4, 3, 3, 3), 9),  # 9 = 3 x 3, but 3 groups do not divide C_in = 4
        ((4, 0, 3, 3), 6),  # an empty dim1 proves nothing (and must not divide by zero)
    ],
)
def test_bias_matching_neither_dim_is_undetermined(weight: tuple[int, ...], bias: int) -> None:
    state = {"up.weight": torch.zeros(weight), "up.bias": torch.zeros(bias)}
    (conv,) = describe(state).convs
    assert conv.transposed is None and conv.groups is None
    assert conv.notes == (
        f"undetermined: bias length {bias} matches neither weight dim0 ({weight[0]}) nor dim1 ({weight[1]})"
        " (a grouped ConvTranspose has bias length dim1 x groups)",
    )


def test_name_hint_without_bias_leaves_groups_unknown() -> None:
    # A depthwise ConvTranspose without bias: weight [8, 1, 4, 4], groups 8 in reality.  The
    # name says ConvTranspose but nothing says how many groups, so groups stays unknown.
    model = nn.Module()
    model.dec = nn.Module()
    model.dec.deconv = nn.ConvTranspose2d(8, 8, 4, groups=8, bias=False)
    (conv,) = describe(model).convs
    assert conv.weight_shape == (8, 1, 4, 4)
    assert conv.transposed is True and conv.groups is None
    assert conv.notes == ("ConvTranspose inferred from the module name (no bias to confirm it)",)
    (layer_report,) = analyze(describe(model)).layers
    assert layer_report.out_channels is None  # not the wrong "1"


def test_name_hint_with_equal_dims_and_bias_proves_groups_1() -> None:
    model = nn.Module()
    model.upconv = nn.ConvTranspose2d(8, 8, 3)  # weight [8, 8, 3, 3], bias [8]
    (conv,) = describe(model).convs
    # Taking the hint: C_out = dim1 x groups = 8 = dim1, so groups is 1.
    assert conv.transposed is True and conv.groups == 1


def test_empty_dims_with_a_hint_do_not_divide_by_zero() -> None:
    state = {"deconv.weight": torch.zeros(4, 0, 3, 3), "deconv.bias": torch.zeros(4)}
    (conv,) = describe(state).convs
    assert conv.transposed is False and conv.notes == ()


# --- re-parametrized weights ---------------------------------------------------------------------


def test_weight_norm_old_api_is_one_conv() -> None:
    model = nn.Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.conv = nn.utils.weight_norm(nn.Conv2d(3, 8, 3))
    description = describe(model)
    (conv,) = description.convs
    assert conv.name == "conv"
    assert conv.weight_name == "conv.weight_v"
    assert conv.weight_shape == (8, 3, 3, 3)
    assert conv.transposed is False
    assert conv.bias_terms == (BiasTerm("conv.bias", (8,), CONV),)
    assert description.model_params == n_params(model) == 8 + 8 * 27 + 8


def test_weight_norm_parametrize_api_is_one_conv() -> None:
    model = nn.Module()
    model.pos_conv = nn.Module()
    model.pos_conv.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 16, 5, groups=4), dim=2)
    description = describe(model)
    (conv,) = description.convs
    assert conv.name == "pos_conv.conv"
    assert conv.op == "Conv1d"  # the bias (16) equals dim0 and not dim1 (4): a Conv
    assert conv.weight_name == "pos_conv.conv.parametrizations.weight.original1"
    assert conv.weight_shape == (16, 4, 5)
    assert description.model_params == n_params(model)


def test_weight_norm_parametrize_conv_is_a_conv() -> None:
    model = nn.Module()
    model.conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3))
    description = describe(model)
    (conv,) = description.convs
    assert (conv.name, conv.op, conv.transposed) == ("conv", "Conv2d", False)
    assert conv.weight_name == "conv.parametrizations.weight.original1"
    assert description.model_params == n_params(model)


def test_spectral_norm_both_apis_exclude_their_buffers() -> None:
    model = nn.Module()
    model.old = nn.utils.spectral_norm(nn.Conv2d(3, 8, 3))
    model.new = nn.utils.parametrizations.spectral_norm(nn.Conv2d(8, 4, 3))
    description = describe(model)
    convs = by_name(description)
    assert set(convs) == {"old", "new"}
    assert convs["old"].weight_name == "old.weight_orig" and convs["old"].weight_shape == (8, 3, 3, 3)
    assert convs["new"].weight_name == "new.parametrizations.weight.original"
    assert convs["new"].transposed is False
    assert description.model_params == n_params(model)


# --- untied and other bias terms -----------------------------------------------------------------


class OwnUntied(nn.Module):
    """A locally-biased conv that owns its weight and a [C, H, W] bias."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(8, 3, 5, 5))
        self.bias = nn.Parameter(torch.zeros(8, 28, 28))


class ParentUntied(nn.Module):
    def __init__(self, leading_one: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, bias=False)
        shape = (1, 8, 28, 28) if leading_one else (8, 28, 28)
        self.untied_bias = nn.Parameter(torch.zeros(shape))


def test_non_1d_own_bias_is_an_add_term() -> None:
    model = nn.Module()
    model.local = OwnUntied()
    description = describe(model)
    (conv,) = description.convs
    assert conv.name == "local"
    assert conv.bias_terms == (BiasTerm("local.bias", (8, 28, 28), ADD),)
    assert conv.followed_by is None
    assert description.model_params == n_params(model)


@pytest.mark.parametrize("leading_one", [False, True])
def test_untied_bias_in_parent_module(leading_one: bool) -> None:
    model = nn.Module()
    model.block = ParentUntied(leading_one)
    model.bn = nn.BatchNorm2d(8)  # would be followed_by, but the bias is not absent
    (conv,) = describe(model).convs
    shape = (1, 8, 28, 28) if leading_one else (8, 28, 28)
    assert conv.name == "block.conv"
    assert conv.bias_terms == (BiasTerm("block.untied_bias", shape, ADD),)
    assert conv.followed_by is None
    # The [C_out, ...] shape settles the transposition question the no-bias note would raise.
    assert conv.transposed is False and conv.notes == ()


def test_parent_bias_with_wrong_spatial_rank_or_width_is_unaligned_or_unattached() -> None:
    model = nn.Module()
    model.block = nn.Module()
    model.block.conv = nn.Conv2d(3, 8, 5, bias=False)
    model.block.bias_1d = nn.Parameter(torch.zeros(8, 28))  # spatial rank 1 for a Conv2d
    model.block.bias_wrong = nn.Parameter(torch.zeros(5, 28, 28))  # width 5 is neither 8 nor 3
    description = describe(model)
    (conv,) = description.convs
    # The block's only conv: the tensors are its, but not laid out as [C_out, *spatial].
    assert conv.bias_terms == (
        BiasTerm("block.bias_1d", (8, 28), ADD, aligned=False),
        BiasTerm("block.bias_wrong", (5, 28, 28), ADD, aligned=False),
    )
    assert analyze(description).layers[0].bias.kind == BiasKind.OTHER
    # With two convs in the block nothing says which one they would belong to.
    model.block.other = nn.Conv2d(3, 8, 5, bias=False)
    assert all(conv.bias_terms == () for conv in describe(model).convs)


def test_parent_bias_prefers_the_conv_without_its_own_bias() -> None:
    model = nn.Module()
    model.block = nn.Module()
    model.block.a = nn.Conv2d(3, 8, 3)
    model.block.b = nn.Conv2d(8, 8, 3, bias=False)
    model.block.bias = nn.Parameter(torch.zeros(8, 26, 26))
    convs = by_name(describe(model))
    assert convs["block.a"].bias_terms == (BiasTerm("block.a.bias", (8,), CONV),)
    assert convs["block.b"].bias_terms == (BiasTerm("block.bias", (8, 26, 26), ADD),)


def test_ambiguous_parent_bias_is_attached_to_no_conv() -> None:
    model = nn.Module()
    model.block = nn.Module()
    model.block.a = nn.Conv2d(3, 8, 3, bias=False)
    model.block.b = nn.Conv2d(4, 8, 3, bias=False)
    model.block.bias = nn.Parameter(torch.zeros(8, 26, 26))
    description = describe(model)
    assert all(conv.bias_terms == () for conv in description.convs)
    assert description.warnings == (
        "block.bias: shape [8, 26, 26] fits several convs (block.a, block.b); not attached",
    )


def test_parent_bias_that_settles_a_conv_frees_its_other_width() -> None:
    # block.a [8, 4, 3, 3] could be a Conv (C_out 8) or a ConvTranspose (C_out 4).  The first
    # parent bias (width 4) fits only a, which makes it a ConvTranspose; the second (width 8)
    # then fits only b instead of being ambiguous between a and b.
    state = {
        "block.a.weight": TensorInfo((8, 4, 3, 3), "float32"),
        "block.b.weight": TensorInfo((8, 6, 3, 3), "float32"),
        "block.bias_a": TensorInfo((4, 5, 5), "float32"),
        "block.bias_b": TensorInfo((8, 5, 5), "float32"),
    }
    description = describe_state_dict(state, path="m", format="pytorch")
    convs = by_name(description)
    assert convs["block.a"].bias_terms == (BiasTerm("block.bias_a", (4, 5, 5), ADD),)
    assert convs["block.a"].transposed is True
    assert convs["block.b"].bias_terms == (BiasTerm("block.bias_b", (8, 5, 5), ADD),)
    assert convs["block.b"].transposed is False
    assert description.warnings == ()


def test_parent_bias_waits_for_a_later_tensor_that_settles_a_conv() -> None:
    # The same question the other way round (the order of model.state_dict() for
    # conv_a, conv_b, bias_a, bias_b): bias_a [8, 14, 14] first fits conv_a [8, 3] and, as a
    # ConvTranspose, conv_b [4, 8]; bias_b [4, 12, 12] then makes conv_b a Conv, so bias_a is
    # conv_a's.  Decided in key order only, conv_a was reported absent (the module says untied).
    model = nn.Module()
    model.conv_a = nn.Conv2d(3, 8, 3, bias=False)
    model.conv_b = nn.Conv2d(8, 4, 3, bias=False)
    model.bias_a = nn.Parameter(torch.zeros(8, 14, 14))
    model.bias_b = nn.Parameter(torch.zeros(4, 12, 12))
    description = describe(model)
    convs = by_name(description)
    assert convs["conv_a"].bias_terms == (BiasTerm("bias_a", (8, 14, 14), ADD),)
    assert convs["conv_a"].transposed is False
    assert convs["conv_b"].bias_terms == (BiasTerm("bias_b", (4, 12, 12), ADD),)
    assert convs["conv_b"].transposed is False
    assert description.warnings == ()
    report = analyze(description)
    assert [layer.bias.kind for layer in report.layers] == [BiasKind.UNTIED, BiasKind.UNTIED]
    assert report.totals.conv_bias_params == 8 * 14 * 14 + 4 * 12 * 12
    assert description.model_params == n_params(model)


def test_parent_biases_settle_a_chain_of_convs_backwards() -> None:
    # c1 [8, 3], c2 [4, 8], c3 [2, 4]: bias8 fits c1 and (transposed) c2, bias4 fits c2 and c3, bias2
    # fits only c3.  Settling c3 frees bias4 for c2, which frees bias8 for c1; bias5 fits no conv of
    # the three (it could be none of theirs) and stays unattached without a warning.
    state = {
        "p.c1.weight": TensorInfo((8, 3, 3, 3), "float32"),
        "p.c2.weight": TensorInfo((4, 8, 3, 3), "float32"),
        "p.c3.weight": TensorInfo((2, 4, 3, 3), "float32"),
        "p.bias8": TensorInfo((8, 6, 6), "float32"),
        "p.bias4": TensorInfo((4, 4, 4), "float32"),
        "p.bias5": TensorInfo((5, 4, 4), "float32"),
        "p.bias2": TensorInfo((1, 2, 2, 2), "float32"),
    }
    description = describe_state_dict(state, path="m", format="pytorch")
    assert [(conv.name, conv.bias_terms, conv.transposed) for conv in description.convs] == [
        ("p.c1", (BiasTerm("p.bias8", (8, 6, 6), ADD),), False),
        ("p.c2", (BiasTerm("p.bias4", (4, 4, 4), ADD),), False),
        ("p.c3", (BiasTerm("p.bias2", (1, 2, 2, 2), ADD),), False),
    ]
    assert description.warnings == ()
    assert [conv.notes for conv in description.convs] == [(), (), ()]


@pytest.mark.timeout(30)
def test_many_same_width_convs_and_parent_biases_stay_linear() -> None:
    # 20,000 bias-less convs of one width in one parent, and as many bias-named parent tensors
    # of that width: each tensor is ambiguous.  The old per-tensor loop over the convs was
    # quadratic (8,000 of each took 22 s); the decision is now O(1) per tensor.
    count = 20_000
    state: dict[str, TensorInfo] = {}
    for index in range(count):
        state[f"p.c{index}.weight"] = TensorInfo((8, 3, 3, 3), "float32")
    for index in range(count):
        state[f"p.bias{index}"] = TensorInfo((8, 4, 4), "float32")
    description = describe_state_dict(state, path="m", format="safetensors", registration_order=False)
    assert len(description.convs) == count
    assert all(conv.bias_terms == () for conv in description.convs)
    assert len(description.warnings) == count
    assert description.warnings[0] == (
        "p.bias0: shape [8, 4, 4] fits several convs (p.c0, p.c1, p.c2, p.c3, p.c4, ...); not attached"
    )


def test_other_bias_named_params_in_own_module_are_add_terms() -> None:
    model = nn.Module()
    model.conv = nn.Conv2d(3, 8, 3)
    model.conv.register_parameter("extra_bias", nn.Parameter(torch.zeros(())))
    model.conv.register_parameter("bias_scale", nn.Parameter(torch.zeros(8)))
    model.conv.register_parameter("untied_bias", nn.Parameter(torch.zeros(1, 8, 26, 26)))
    description = describe(model)
    (conv,) = description.convs
    # Only the [(1,) C_out, *spatial] one is aligned with the output; the rest are "other".
    assert conv.bias_terms == (
        BiasTerm("conv.bias", (8,), CONV),
        BiasTerm("conv.extra_bias", (), ADD, aligned=False),
        BiasTerm("conv.bias_scale", (8,), ADD, aligned=False),
        BiasTerm("conv.untied_bias", (1, 8, 26, 26), ADD),
    )
    kinds = [classify_term(term, 8, 2, (26, 26)) for term in conv.bias_terms]
    # Broadcast, the [8] term would have looked like an untied [1, 1, 1, 8]: it is "other".
    assert kinds == [BiasKind.TIED, BiasKind.OTHER, BiasKind.OTHER, BiasKind.UNTIED]


def test_own_untied_extra_settles_conv_vs_transpose() -> None:
    model = nn.Module()
    model.local = nn.Conv2d(4, 6, 3, bias=False)  # weight [6, 4, 3, 3]: undetermined by itself
    model.local.register_parameter("bias_map", nn.Parameter(torch.zeros(4, 5, 5)))  # width dim1
    (conv,) = describe(model).convs
    assert conv.bias_terms == (BiasTerm("local.bias_map", (4, 5, 5), ADD),)
    assert conv.transposed is True and conv.groups == 1
    assert conv.notes == ("ConvTranspose inferred from local.bias_map (width 4 = weight dim1)",)


def test_weight_normed_bias_is_one_conv_term() -> None:
    # weight_norm(conv, name="bias") replaces conv.bias by bias_g/bias_v (old API) or by
    # parametrizations.bias.original0/original1 (new API): ONE bias of the shape of v.
    model = nn.Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.old = nn.utils.weight_norm(nn.Conv2d(3, 8, 3), name="bias")
    model.new = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3), name="bias")
    description = describe(model)
    convs = by_name(description)
    assert convs["old"].bias_terms == (BiasTerm("old.bias_v", (8,), CONV),)
    assert convs["new"].bias_terms == (BiasTerm("new.parametrizations.bias.original1", (8,), CONV),)
    assert all(conv.transposed is False for conv in convs.values())
    assert description.model_params == n_params(model)  # g counted, as model.parameters() does
    report = analyze(description)
    assert [layer.bias.kind for layer in report.layers] == [BiasKind.TIED, BiasKind.TIED]


def test_parametrized_bias_counts_as_own_bias() -> None:
    model = nn.Module()
    model.conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 8, 3), name="weight")
    nn.utils.parametrize.register_parametrization(model.conv, "bias", nn.Identity())
    (conv,) = describe(model).convs
    assert conv.bias_terms == (BiasTerm("conv.parametrizations.bias.original", (8,), CONV),)
    assert conv.transposed is False


# --- followed_by ---------------------------------------------------------------------------------


def test_resnet_registration_order_batchnorm_follow_and_params() -> None:
    model = ResNetish()
    description = describe(model)
    assert [c.name for c in description.convs] == RESNET_CONVS
    assert all(c.followed_by == "BatchNorm" for c in description.convs)
    assert all(c.bias_terms == () for c in description.convs)
    convs = by_name(description)
    # dims differ: the BatchNorm's width (dim0) settles Conv without a note
    assert convs["conv1"].transposed is False and convs["conv1"].notes == ()
    assert convs["layer2.0.downsample.0"].transposed is False
    # equal dims: nothing can settle it
    assert convs["layer1.0.conv1"].transposed is None and convs["layer1.0.conv1"].op == "Conv2d?"
    assert description.model_params == n_params(model)
    assert description.warnings == ()


def test_sorted_keys_fall_back_to_name_pairing() -> None:
    model = ResNetish()
    state = dict(sorted(model.state_dict().items()))
    description = describe(state)
    assert [c.name for c in description.convs] == RESNET_CONVS  # natural order, not key order
    assert all(c.followed_by == "BatchNorm" for c in description.convs)
    assert description.model_params == n_params(model)


def test_unordered_source_uses_name_pairing() -> None:
    description = describe(ResNetish(), registration_order=False)
    assert all(c.followed_by == "BatchNorm" for c in description.convs)
    # Name pairing never settles transposition: conv1 (16, 3) stays undetermined here.
    assert by_name(description)["conv1"].transposed is None


def test_vgg_batchnorm_and_natural_order() -> None:
    model = vggish()
    description = describe(model, registration_order=False)
    assert [c.name for c in description.convs] == [
        "features.0", "features.4", "features.7", "features.11", "features.14",
    ]  # fmt: skip
    # Biased convs are never "followed_by": the bias is not absent.
    assert all(c.followed_by is None for c in description.convs)
    # 16 -> 16 and 32 -> 32 convs with a bias of the same width stay undetermined.
    assert [c.transposed for c in description.convs] == [False, False, None, False, None]
    assert description.model_params == n_params(model)


def test_biasless_sequential_next_index_and_transposed_inference() -> None:
    generator = nn.Sequential(
        nn.ConvTranspose2d(100, 64, 4, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.ConvTranspose2d(64, 3, 4, bias=False), nn.Tanh(),
    )  # fmt: skip
    for order in (True, False):
        first, last = describe(generator, registration_order=order).convs
        assert first.followed_by == "BatchNorm"
        assert first.transposed is True and first.op == "ConvTranspose2d"
        assert first.notes == (
            "ConvTranspose inferred from the BatchNorm that follows"
            f" ({'registration order' if order else 'next in Sequential'}) (width 64 = weight dim1)",
        )
        assert last.followed_by is None and last.transposed is None


def test_group_norm_follow_is_norm_and_wrong_width_is_nothing() -> None:
    model = nn.Module()
    model.conv = nn.Conv2d(3, 8, 3, bias=False)
    model.gn = nn.GroupNorm(2, 8)
    model.conv2 = nn.Conv2d(8, 4, 3, bias=False)
    model.bn2 = nn.BatchNorm2d(6)  # width 6 is not conv2's
    convs = by_name(describe(model))
    assert convs["conv"].followed_by == "Norm"
    assert convs["conv2"].followed_by is None


def test_unique_width_pairing_only_without_registration_order() -> None:
    model = nn.Module()
    model.conv_stem = nn.Conv2d(3, 8, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(8)
    model.conv_head = nn.Conv2d(8, 32, 1, bias=False)
    model.act = nn.ReLU()
    model.pool = nn.Identity()
    model.bn2 = nn.BatchNorm2d(32)
    convs = by_name(describe(model, registration_order=False))
    assert convs["conv_stem"].followed_by == "BatchNorm"
    assert convs["conv_head"].followed_by == "BatchNorm"
    # With registration order conv_stem -> bn1 and conv_head -> bn2 follow directly too.
    ordered = by_name(describe(model))
    assert ordered["conv_head"].followed_by == "BatchNorm"


def test_preact_pairing_does_not_claim_an_input_norm() -> None:
    model = nn.Module()
    model.bn1 = nn.BatchNorm2d(16)  # normalises conv1's input (16 channels), not its output
    model.conv1 = nn.Conv2d(16, 32, 3, bias=False)
    convs = by_name(describe(model, registration_order=False))
    assert convs["conv1"].followed_by is None
    assert convs["conv1"].transposed is None  # the input norm's width must not imply ConvTranspose


class DenseLayer(nn.Module):
    """torchvision's _DenseLayer: BN-ReLU-Conv pre-activation, the norm BEFORE each conv."""

    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)


def test_densenet_next_layers_input_norm_does_not_make_a_conv_transposed() -> None:
    # DenseNet-121's first block (64 input channels, growth 32, bn_size 4): denselayer2.conv2
    # [32, 128, 3, 3] is followed in registration order by denselayer3.norm1, which normalises
    # the 64 + 2 x 32 = 128 concatenated channels.  Width 128 = weight dim1 once made the conv
    # a "ConvTranspose2d" with in and out swapped; a norm from another module settles nothing.
    block = nn.Module()
    for index in range(4):
        block.add_module(f"denselayer{index + 1}", DenseLayer(64 + 32 * index, 32, 4))
    description = describe(block)
    convs = by_name(description)
    assert len(description.convs) == 8
    assert not any(conv.transposed for conv in description.convs)
    conv2 = convs["denselayer2.conv2"]
    assert (conv2.op, conv2.transposed, conv2.followed_by) == ("Conv2d?", None, None)
    assert conv2.notes == ("undetermined: no bias to tell Conv from ConvTranspose",)
    # A sibling norm still settles the question: conv1 [128, C_in] -> norm2 (128).
    assert [convs[f"denselayer{i}.conv1"].followed_by for i in (1, 2, 3, 4)] == ["BatchNorm"] * 4
    assert [convs[f"denselayer{i}.conv1"].transposed for i in (1, 2, 4)] == [False] * 3
    report = analyze(description)
    assert [layer.out_channels for layer in report.layers] == [128, 32] * 4
    assert description.model_params == n_params(block)


def test_batchnorm_needs_running_stats_of_the_conv_width() -> None:
    model = nn.Module()
    model.conv = nn.Conv2d(3, 8, 3, bias=False)
    model.bn = nn.BatchNorm2d(8, affine=False)  # running stats only
    assert describe(model).convs[0].followed_by == "BatchNorm"
    model.bn = nn.BatchNorm2d(8, track_running_stats=False)  # weight + bias only: a "Norm"
    assert describe(model).convs[0].followed_by == "Norm"


# --- model_params and odd inputs -----------------------------------------------------------------


def test_tied_weights_sharing_storage_count_once() -> None:
    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    model.head = nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight
    state = model.state_dict()
    assert list(state) == ["embed.weight", "head.weight"]
    description = describe_state_dict(infos(state, storage=True), path="m", format="pytorch")
    assert description.model_params == n_params(model) == 40
    assert describe_state_dict(infos(state), path="m", format="pytorch").model_params == 80


class QatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.conv2(self.relu(self.bn(self.conv(self.quant(x))))))


@pytest.mark.filterwarnings("ignore")  # torch.ao.quantization deprecation notices
def test_qat_checkpoint_observers_are_buffers_and_the_convbn_child_follows() -> None:
    # A QAT training checkpoint (eager prepare_qat, fused conv+bn+relu): observer and
    # fake-quantize state (scale, zero_point, min_val, max_val, eps) is all buffers, and
    # ConvBnReLU2d keeps its BatchNorm as the conv's child ``conv.bn``.  Both were missed:
    # model_params 574 instead of 524, and conv reported with nothing following.
    import torch.ao.quantization as tq

    model = QatNet().train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    model = tq.prepare_qat(tq.fuse_modules_qat(model, [["conv", "bn", "relu"]]))
    model(torch.randn(2, 3, 8, 8))
    state = model.state_dict()
    assert (
        "conv.weight_fake_quant.activation_post_process.min_val" in state and "conv.bn.running_mean" in state
    )
    description = describe(state)
    conv, conv2 = description.convs
    assert (conv.name, conv.bias_terms, conv.followed_by, conv.transposed) == ("conv", (), "BatchNorm", False)
    assert conv.notes == ()
    assert (conv2.name, conv2.followed_by) == ("conv2", None)
    assert description.model_params == n_params(model) == 216 + 8 + 8 + 288 + 4

    # A learnable fake-quantize (LSQ) trains its scale and zero_point: parameters, counted.
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    lsq = nn.Module()
    lsq.conv = nn.Conv2d(3, 8, 3)
    lsq.conv.weight_fake_quant = _LearnableFakeQuantize(
        tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255
    )
    assert [name for name, _ in lsq.named_parameters()] == [
        "conv.weight", "conv.bias", "conv.weight_fake_quant.scale", "conv.weight_fake_quant.zero_point",
    ]  # fmt: skip
    assert describe(lsq).model_params == n_params(lsq) == 216 + 8 + 1 + 1


def test_buffers_and_integer_tensors_are_not_parameters() -> None:
    tensors = {
        "bn.weight": TensorInfo((4,), "float32"),
        "bn.running_mean": TensorInfo((4,), "float32"),
        "bn.running_var": TensorInfo((4,), "float32"),
        "bn.num_batches_tracked": TensorInfo((), "int64"),
        "emb.position_ids": TensorInfo((1, 512), "float32"),
        "q.weight": TensorInfo((4, 4), "qint8"),
        "mask": TensorInfo((4, 4), "bool"),
    }
    assert describe_state_dict(tensors, path="m", format="pytorch").model_params == 4 + 16


def test_integer_conv_weight_is_skipped_with_a_warning() -> None:
    tensors = {"q.weight": TensorInfo((8, 3, 3, 3), "int8"), "q.bias": TensorInfo((8,), "float32")}
    description = describe_state_dict(tensors, path="m", format="safetensors")
    assert description.convs == ()
    assert description.model_params == 8
    assert description.warnings == (
        "q.weight: int8 tensor of shape [8, 3, 3, 3] skipped: integer tensors are not parameters"
        " (possibly a packed quantized conv weight)",
    )


def test_quantized_conv_weight_is_a_conv() -> None:
    tensors = {"q.weight": TensorInfo((8, 3, 3, 3), "qint8"), "q.bias": TensorInfo((8,), "float32")}
    (conv,) = describe_state_dict(tensors, path="m", format="pytorch").convs
    assert conv.op == "Conv2d"


def test_stacked_expert_matrices_are_not_conv1d() -> None:
    tensors = {"layers.0.moe.experts.weight": TensorInfo((8, 32, 16), "bfloat16")}
    description = describe_state_dict(tensors, path="m", format="safetensors")
    assert description.convs == ()
    assert description.model_params == 8 * 32 * 16
    assert description.warnings[0].startswith("layers.0.moe.experts.weight: rank-3 tensor under an experts")


def test_junk_entries_are_ignored() -> None:
    tensors: dict[object, object] = {
        "conv.weight": TensorInfo((8, 3, 3, 3), "float32"),
        "conv.bias": TensorInfo((8,), "float32"),
        "junk": "not a tensor",
        "none": None,
        3: TensorInfo((2,), "float32"),
        "negative.weight": TensorInfo((-1, 3, 3, 3), "float32"),
        "floaty.weight": TensorInfo((2.0, 3, 3, 3), "float32"),  # type: ignore[arg-type]
        "listy.weight": TensorInfo([2, 3, 3, 3], "float32"),  # type: ignore[arg-type]
    }
    description = describe_state_dict(tensors, path="m", format="pytorch")  # type: ignore[arg-type]
    assert [c.name for c in description.convs] == ["conv"]
    assert description.model_params == 8 * 27 + 8


def test_root_conv_and_empty_state_dict() -> None:
    (conv,) = describe(nn.Conv2d(3, 8, 3)).convs
    assert conv.name == "(root)" and conv.weight_name == "weight" and conv.op == "Conv2d"
    empty = describe_state_dict({}, path="m", format="pytorch")
    assert empty.convs == () and empty.model_params == 0


def test_pass_through_fields() -> None:
    description = describe_state_dict(
        {"conv.weight": TensorInfo((8, 3, 3, 3), "float32")},
        path="ckpt.pt",
        format="pytorch",
        location="ema",
        warnings=("earlier warning",),
        unsafe_callables=("os.system",),
    )
    assert description.location == "ema"
    assert description.warnings == ("earlier warning",)
    assert description.unsafe_callables == ("os.system",)


def test_natural_sort_key() -> None:
    names = ["features.10", "features.2", "layer1.10.conv", "layer1.9.conv", "a.b", "a"]
    assert sorted(names, key=natural_sort_key) == [
        "a", "a.b", "features.2", "features.10", "layer1.9.conv", "layer1.10.conv",
    ]  # fmt: skip
    huge = "9" * 5000  # int() refuses strings over 4300 digits
    assert sorted([f"x.{huge}", "x.10", "x.007", "x.8"], key=natural_sort_key) == [
        "x.007", "x.8", "x.10", f"x.{huge}",
    ]  # fmt: skip


@pytest.mark.parametrize("index", ["\u00b2", "\u0663", "1" * 5000])
def test_non_ascii_and_huge_digit_names_are_not_indexes(index: str) -> None:
    # '²'.isdigit() is True but int('²') fails; '٣' is a decimal digit int() reads as 3.
    state = {
        f"seq.{index}.weight": TensorInfo((8, 3, 3, 3), "float32"),
        "seq.4.weight": TensorInfo((8,), "float32"),
        "seq.4.bias": TensorInfo((8,), "float32"),
        "seq.4.running_mean": TensorInfo((8,), "float32"),
        "seq.4.running_var": TensorInfo((8,), "float32"),
    }
    description = describe_state_dict(state, path="m", format="safetensors", registration_order=False)
    (conv,) = description.convs  # no ValueError from int()
    assert conv.name == f"seq.{index}"
    assert [c.name for c in describe_state_dict(state, path="m", format="pytorch").convs] == [f"seq.{index}"]
