"""Tests for biasinspect.readers.torch_export: real torch.export archives, then broken ones."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from biasinspect.errors import (  # noqa: E402
    BiasInspectError,
    MalformedModelError,
    ResourceLimitError,
    UnsupportedFormatError,
)
from biasinspect.limits import MAX_JSON_BYTES  # noqa: E402
from biasinspect.model import BiasSource, BiasTerm, ConvNode, ModelDescription  # noqa: E402
from biasinspect.readers.safe_zip import SafeZip  # noqa: E402
from biasinspect.readers.torch_export import read_torch_export  # noqa: E402

CONV = BiasSource.CONV
ADD = BiasSource.ADD


class ZipArchive:
    """A minimal Archive over zipfile, for tests that inject adapter behaviour (sizes, failures,
    recording); everything else reads through the real SafeZip."""

    def __init__(self, path: Path) -> None:
        self._zip = zipfile.ZipFile(path)

    def names(self) -> list[str]:
        return self._zip.namelist()

    def size(self, name: str) -> int:
        return self._zip.getinfo(name).file_size

    def read(self, name: str, limit: int) -> bytes:
        if self._zip.getinfo(name).file_size > limit:
            raise ResourceLimitError(f"{name}: over {limit} bytes")
        return self._zip.read(name)


def read(path: Path) -> list[ModelDescription]:
    with SafeZip(path) as archive:
        return read_torch_export(path, archive)


def read_one(path: Path) -> ModelDescription:
    descriptions = read(path)
    assert len(descriptions) == 1
    return descriptions[0]


def export(model: Any, path: Path, *inputs: Any, decompose: bool = False, **kwargs: Any) -> Path:
    program = torch.export.export(model, inputs, **kwargs)
    if decompose:
        program = program.run_decompositions()
    torch.export.save(program, path)
    return path


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def by_name(description: ModelDescription) -> dict[str, ConvNode]:
    return {conv.name: conv for conv in description.convs}


# ---------------------------------------------------------------------------------------------
# Models


class Mixed(nn.Module):
    """Tied bias, no bias + BN, untied bias added after a bias-free conv, grouped transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)
        )
        self.c3 = nn.Conv2d(8, 4, 3, bias=False)
        self.ub = nn.Parameter(torch.zeros(4, 10, 10))
        self.tc = nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2)

    def forward(self, x: Any) -> Any:
        y = self.features(x)
        y = self.c3(y) + self.ub
        return self.tc(y)


MIXED_EXPECTED = [
    ConvNode(
        name="features.0",
        op="aten.conv2d",
        weight_name="features.0.weight",
        weight_shape=(8, 3, 3, 3),
        transposed=False,
        groups=1,
        kernel_shape=(3, 3),
        output_spatial=(14, 14),
        bias_terms=(BiasTerm("features.0.bias", (8,), CONV),),
    ),
    ConvNode(
        name="features.2",
        op="aten.conv2d",
        weight_name="features.2.weight",
        weight_shape=(8, 8, 3, 3),
        transposed=False,
        groups=1,
        kernel_shape=(3, 3),
        output_spatial=(12, 12),
        followed_by="BatchNorm2d",
    ),
    ConvNode(
        name="c3",
        op="aten.conv2d",
        weight_name="c3.weight",
        weight_shape=(4, 8, 3, 3),
        transposed=False,
        groups=1,
        kernel_shape=(3, 3),
        output_spatial=(10, 10),
        bias_terms=(BiasTerm("ub", (4, 10, 10), ADD),),
    ),
    ConvNode(
        name="tc",
        op="aten.conv_transpose2d",
        weight_name="tc.weight",
        weight_shape=(4, 1, 2, 2),
        transposed=True,
        groups=2,
        kernel_shape=(2, 2),
        output_spatial=(20, 20),
        bias_terms=(BiasTerm("tc.bias", (2,), CONV),),
    ),
]


@pytest.fixture(scope="module")
def mixed_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(Mixed().eval(), tmp_path_factory.mktemp("mixed") / "mixed.pt2", torch.randn(1, 3, 14, 14))


@pytest.fixture(scope="module")
def mixed_document(mixed_path: Path) -> tuple[str, dict[str, Any]]:
    with zipfile.ZipFile(mixed_path) as archive:
        member = next(name for name in archive.namelist() if name.endswith("/models/model.json"))
        return member, json.loads(archive.read(member))


def rewrite(source: Path, target: Path, replace: dict[str, bytes | None]) -> Path:
    """Copy a zip, replacing (bytes) or dropping (None) members, adding new ones."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            if info.filename in replace:
                continue
            new.writestr(info, old.read(info.filename))
        for name, data in replace.items():
            if data is not None:
                new.writestr(name, data)
    return target


# ---------------------------------------------------------------------------------------------
# Real archives


def test_mixed_model_facts(mixed_path: Path) -> None:
    description = read_one(mixed_path)
    assert description.format == "torch-export"
    assert description.path == str(mixed_path)
    assert description.location is None
    assert description.warnings == ()
    assert list(description.convs) == MIXED_EXPECTED
    # Parameters only: BN running stats and num_batches_tracked are buffers.
    assert description.model_params == n_params(Mixed()) == 1522


def test_mixed_model_analyses_as_expected(mixed_path: Path) -> None:
    from biasinspect.analysis import analyze

    report = analyze(read_one(mixed_path))
    kinds = [(layer.name, str(layer.bias.kind), layer.bias.params) for layer in report.layers]
    assert kinds == [
        ("features.0", "tied", 8),
        ("features.2", "absent", 0),
        ("c3", "untied", 400),
        ("tc", "tied", 2),
    ]
    assert report.layers[2].formula == "8x3x3 x 4 + 4x10x10 = 688"
    assert (report.totals.tied, report.totals.untied, report.totals.absent) == (2, 1, 1)
    assert report.totals.model_params == 1522


def test_decomposed_program_reads_the_same(tmp_path: Path) -> None:
    path = export(Mixed().eval(), tmp_path / "d.pt2", torch.randn(1, 3, 14, 14), decompose=True)
    description = read_one(path)
    # run_decompositions turns every conv into aten.convolution (transposed as an argument)
    # and the BN into _native_batch_norm_legit_no_training.
    expected = [ConvNode(**{**conv.__dict__, "op": "aten.convolution"}) for conv in MIXED_EXPECTED]
    assert list(description.convs) == expected
    assert description.model_params == 1522


def test_training_mode_with_dynamic_batch(tmp_path: Path) -> None:
    batch = torch.export.Dim("batch", min=2, max=64)
    path = export(
        Mixed().train(), tmp_path / "t.pt2", torch.randn(2, 3, 14, 14), dynamic_shapes=({0: batch},)
    )
    description = read_one(path)
    # A symbolic batch does not hide the static spatial sizes.
    assert list(description.convs) == MIXED_EXPECTED
    assert description.model_params == 1522


def test_dynamic_spatial_size_is_unknown_not_guessed(tmp_path: Path) -> None:
    side = torch.export.Dim("side", min=8, max=64)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).eval()
    path = export(model, tmp_path / "s.pt2", torch.randn(1, 3, 16, 16), dynamic_shapes=({2: side, 3: side},))
    (conv,) = read_one(path).convs
    assert conv.output_spatial == (None, None)
    assert conv.weight_shape == (4, 3, 3, 3)
    assert conv.bias_terms == (BiasTerm("0.bias", (4,), CONV),)


class Assorted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(6, 6, 3, groups=6, padding=1, bias=False)
        self.gn = nn.GroupNorm(3, 6)
        self.c1 = nn.Conv1d(6, 5, 3, stride=2)
        self.c3d = nn.Conv3d(1, 2, (1, 2, 2))
        self.t1 = nn.ConvTranspose1d(5, 4, 4, bias=False)

    def forward(self, x: Any) -> Any:
        y = self.gn(self.dw(x))  # [1, 6, 8, 8]
        z = self.c1(y.flatten(2))  # [1, 5, 31]
        t = self.t1(z)  # [1, 4, 34]
        v = self.c3d(y[:, :1].unsqueeze(1))  # [1, 2, 1, 7, 7]
        return t, v


def test_depthwise_conv1d_conv3d_transpose1d(tmp_path: Path) -> None:
    model = Assorted().eval()
    description = read_one(export(model, tmp_path / "a.pt2", torch.randn(1, 6, 8, 8)))
    convs = by_name(description)
    assert list(convs) == ["dw", "c1", "t1", "c3d"]
    dw = convs["dw"]
    assert (dw.weight_shape, dw.groups, dw.transposed, dw.output_spatial) == ((6, 1, 3, 3), 6, False, (8, 8))
    assert dw.bias_terms == () and dw.followed_by == "GroupNorm"
    c1 = convs["c1"]
    assert (c1.op, c1.weight_shape, c1.groups, c1.output_spatial) == ("aten.conv1d", (5, 6, 3), 1, (31,))
    assert c1.bias_terms == (BiasTerm("c1.bias", (5,), CONV),)
    t1 = convs["t1"]
    assert (t1.op, t1.weight_shape, t1.transposed, t1.output_spatial) == (
        "aten.conv_transpose1d",
        (5, 4, 4),
        True,
        (34,),
    )
    assert t1.bias_terms == () and t1.followed_by is None
    c3d = convs["c3d"]
    assert (c3d.op, c3d.weight_shape, c3d.kernel_shape, c3d.output_spatial) == (
        "aten.conv3d",
        (2, 1, 1, 2, 2),
        (1, 2, 2),
        (1, 7, 7),
    )
    assert description.model_params == n_params(model)


class Functional(nn.Module):
    """Hand-written convs: a bias viewed to [1, C, 1, 1], a reused module, an affine Mul+Add,
    a computed weight, an unbatched input, and a tied (shared) parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.b = nn.Parameter(torch.zeros(4))
        self.shared = nn.Conv2d(4, 4, 1, bias=False)
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))
        self.shift = nn.Parameter(torch.zeros(1, 4, 1, 1))
        self.g = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.alias = self.shared  # the same module under two names: its weight is one parameter

    def forward(self, x: Any) -> Any:
        y = F.conv2d(x, self.w) + self.b.view(1, -1, 1, 1)
        y = self.shared(self.shared(y))
        y = self.alias(y) * self.scale + self.shift
        y = F.conv2d(y, self.g * 2.0)
        return F.conv2d(y[0], self.w[:, :1].reshape(4, 1, 3, 3).expand(4, 4, 3, 3).contiguous())


def test_functional_convs(tmp_path: Path) -> None:
    model = Functional().eval()
    description = read_one(export(model, tmp_path / "f.pt2", torch.randn(1, 3, 10, 10)))
    names = [conv.name for conv in description.convs]
    # nn_module_stack names convs run by modules (a module called twice gets a numbered second
    # entry; the same module under another attribute name is named as called); functional
    # convs in the root module keep their node names.
    assert names == ["conv2d", "shared", "shared#2", "alias", "conv2d_4", "conv2d_5"]
    first, shared, shared2, alias, computed, unbatched = description.convs
    assert first.weight_name == "w"
    assert first.bias_terms == (BiasTerm("b", (1, 4, 1, 1), ADD),)  # the shape actually added
    assert first.output_spatial == (8, 8)
    # torch.export lifts a tied parameter under both names and feeds the graph the last one.
    assert shared.weight_name == shared2.weight_name == alias.weight_name == "alias.weight"
    assert shared.bias_terms == () and shared.followed_by is None  # output goes to another conv
    assert alias.bias_terms == () and alias.followed_by == "Mul+Add"
    assert computed.weight_name == "mul_1" and computed.weight_shape == (4, 4, 1, 1)
    assert computed.notes == ("weight 'mul_1' is computed in the graph, not a stored tensor",)
    # Unbatched [C, H, W] input: spatial dims are the trailing ones.  The weight went through
    # slice/expand, which changes its element count, so it is not traced back to 'w'.
    assert unbatched.weight_name == "contiguous" and unbatched.weight_shape == (4, 4, 3, 3)
    assert unbatched.output_spatial == (6, 6) and unbatched.bias_terms == ()
    # The tied weight counts once, like model.parameters() (weights config dedupes it).
    assert description.model_params == n_params(model) == 108 + 4 + 4 + 4 + 16 + 16


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d: all four tensors are buffers, and the affine scale
    and shift are computed from them in the graph (conv -> mul -> add)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: Any) -> Any:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + bias


def test_frozen_batchnorm_and_computed_affine_follow_a_biasless_conv(tmp_path: Path) -> None:
    # Detection backbones (torchvision Faster R-CNN, detectron2) freeze their BatchNorms: the
    # pickled module says FrozenBatchNorm2d, the state dict BatchNorm, ONNX Mul+Add; the
    # exported graph's scale and shift are computed from buffers, once missed (None).
    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
            self.bn1 = FrozenBatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
            self.g = nn.Parameter(torch.zeros(1, 8, 1, 1))
            self.s = nn.Parameter(torch.zeros(8))
            self.conv3 = nn.Conv2d(8, 8, 1, bias=False)
            self.conv4 = nn.Conv2d(8, 4, 1, bias=False)

        def forward(self, x: Any) -> Any:
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.conv2(x) * self.g.exp() + self.s.view(1, -1, 1, 1) * 2.0  # computed from parameters
            y = self.conv3(x)
            y = y * x.mean() + self.s.view(1, -1, 1, 1)  # a scale from the input: not a norm
            return self.conv4(y)

    model = Backbone().eval()
    description = read_one(export(model, tmp_path / "frozen.pt2", torch.randn(1, 3, 12, 12)))
    assert [(conv.name, conv.bias_terms, conv.followed_by) for conv in description.convs] == [
        ("conv1", (), "FrozenBatchNorm2d"),
        ("conv2", (), "Mul+Add"),
        ("conv3", (), None),
        ("conv4", (), None),
    ]
    assert description.model_params == n_params(model) == 216 + 576 + 8 + 8 + 64 + 32


def test_constant_added_bias_counts_buffer_does_not(tmp_path: Path) -> None:
    class Constants(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(2, 3, 1, bias=False)
            self.b = nn.Conv2d(3, 3, 1, bias=False)
            self.const = torch.zeros(3, 4, 4)  # a plain tensor attribute: lifted as a constant
            self.register_buffer("buf", torch.zeros(3, 1, 1))

        def forward(self, x: Any) -> Any:
            return self.b(self.a(x) + self.const) + self.buf

    model = Constants().eval()
    description = read_one(export(model, tmp_path / "k.pt2", torch.randn(1, 2, 4, 4)))
    a, b = description.convs
    assert a.bias_terms == (BiasTerm("const", (3, 4, 4), ADD),)
    assert b.bias_terms == () and b.followed_by is None  # buffers are state, not a learned bias
    assert description.model_params == n_params(model) == 6 + 9


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1, bias=False)

    def forward(self, x: Any) -> Any:
        return torch.cond(x.sum() > 0, lambda t: self.a(t).relu(), lambda t: self.b(t).relu(), (x,))


def test_convs_inside_cond_subgraphs(tmp_path: Path) -> None:
    model = Branches().eval()
    description = read_one(export(model, tmp_path / "c.pt2", torch.randn(1, 3, 8, 8)))
    a, b = description.convs
    # Subgraph placeholders are mapped back to the lifted parameters passed into cond.
    assert (a.name, a.weight_name, a.bias_terms) == ("a", "a.weight", (BiasTerm("a.bias", (4,), CONV),))
    assert (b.name, b.weight_name, b.bias_terms) == ("b", "b.weight", ())
    assert a.notes == ("inside subgraph true_graph_0 of higher_order.cond",)
    assert b.notes == ("inside subgraph false_graph_0 of higher_order.cond",)
    assert a.output_spatial == b.output_spatial == (8, 8)
    assert description.model_params == n_params(model) == 112 + 108


# ---------------------------------------------------------------------------------------------
# Archive layouts


def test_legacy_layout_and_several_programs(mixed_path: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(mixed_path) as archive:
        member = next(name for name in archive.namelist() if name.endswith("/models/model.json"))
        data = archive.read(member)
    legacy = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(legacy, "w") as archive:
        archive.writestr("serialized_exported_program.json", data)
        archive.writestr("serialized_state_dict.pt", b"\x80\x02 not read")
        archive.writestr("version", "5.1")
    assert list(read_one(legacy).convs) == MIXED_EXPECTED

    root = member.split("/", 1)[0]
    several = rewrite(mixed_path, tmp_path / "several.pt2", {f"{root}/models/second.json": data})
    first, second = read(several)
    assert (first.location, second.location) == ("model", "second")
    assert list(first.convs) == list(second.convs) == MIXED_EXPECTED


def test_dequantize_and_dtype_hops_keep_the_weight_name(tmp_path: Path, mixed_document: Any) -> None:
    class Cast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 3, 1, 1))

        def forward(self, x: Any) -> Any:
            return F.conv2d(x, self.w.half().float())

    path = export(Cast(), tmp_path / "cast.pt2", torch.randn(1, 3, 4, 4))
    (conv,) = read_one(path).convs
    assert (conv.weight_name, conv.notes) == ("w", ())
    # Quantized programs feed the conv through dequantize_* nodes; patch the casts into one.
    with zipfile.ZipFile(path) as archive:
        member = next(name for name in archive.namelist() if name.endswith("/models/model.json"))
        document = json.loads(archive.read(member))
    for node in document["graph_module"]["graph"]["nodes"]:
        if "_to_copy" in node["target"]:
            node["target"] = "torch.ops.quantized_decomposed.dequantize_per_channel.default"
    patched = rewrite(path, tmp_path / "q.pt2", {member: json.dumps(document).encode()})
    (conv,) = read_one(patched).convs
    assert (conv.weight_name, conv.notes) == ("w", ())


def test_old_style_module_stack_paths(tmp_path: Path, mixed_path: Path, mixed_document: Any) -> None:
    member, document = mixed_document
    document = copy.deepcopy(document)
    nodes = document["graph_module"]["graph"]["nodes"]
    nodes[0]["metadata"]["nn_module_stack"] = (
        "L__self__,,__main__.M;"
        "L__self___features_0,getattr(L['self'].features, '0'),torch.nn.modules.conv.Conv2d"
    )
    nodes[2]["metadata"]["nn_module_stack"] = "L__self___c3,L['self'].blocks[1]['c3'],torch.nn.Conv2d"
    del nodes[4]["metadata"]["nn_module_stack"]  # c3: no metadata -> the weight's module
    path = rewrite(mixed_path, tmp_path / "o.pt2", {member: json.dumps(document).encode()})
    assert [conv.name for conv in read_one(path).convs] == ["features.0", "blocks.1.c3", "c3", "tc"]


@pytest.mark.timeout(20)
def test_huge_getattr_module_paths_fall_back_quickly(
    tmp_path: Path, mixed_path: Path, mixed_document: Any
) -> None:
    # 50,000 nested getattr( made one re.sub pass per getattr: quadratic (20,000 took 32 s).
    # Paths over MAX_MODULE_PATH_CHARS are not cleaned up; the layer is named from its weight.
    member, document = mixed_document
    document = copy.deepcopy(document)
    nodes = document["graph_module"]["graph"]["nodes"]
    depth = 50_000
    path = "getattr(" * depth + "L['self']" + ", 'a')" * depth
    nodes[0]["metadata"]["nn_module_stack"] = f"L__self___features_0,{path},torch.nn.Conv2d"
    # Just under the cap, nested getattr are still reduced (innermost first).
    nested = "getattr(getattr(L['self'].features, '0'), 'inner')"
    nodes[2]["metadata"]["nn_module_stack"] = f"L__self___c3,{nested},torch.nn.Conv2d"
    rewritten = rewrite(mixed_path, tmp_path / "g.pt2", {member: json.dumps(document).encode()})
    assert [conv.name for conv in read_one(rewritten).convs] == ["features.0", "features.0.inner", "c3", "tc"]


def test_unknown_conv_like_operator_is_reported(
    tmp_path: Path, mixed_path: Path, mixed_document: Any
) -> None:
    member, document = mixed_document
    document = copy.deepcopy(document)
    document["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.onednn.qconv2d_pointwise.default"
    path = rewrite(mixed_path, tmp_path / "u.pt2", {member: json.dumps(document).encode()})
    description = read_one(path)
    assert [conv.name for conv in description.convs] == ["features.2", "c3", "tc"]
    assert description.warnings == (
        "node 'conv2d': convolution-like operator onednn.qconv2d_pointwise.default is not recognised; "
        "not analysed",
    )


# ---------------------------------------------------------------------------------------------
# Broken archives


def with_member(tmp_path: Path, mixed_path: Path, member: str, data: bytes | None) -> Path:
    return rewrite(mixed_path, tmp_path / "broken.pt2", {member: data})


def test_missing_program_json(tmp_path: Path, mixed_path: Path, mixed_document: Any) -> None:
    member, _ = mixed_document
    path = with_member(tmp_path, mixed_path, member, None)
    with pytest.raises(MalformedModelError) as caught:
        read(path)
    assert str(caught.value) == (
        "torch.export archive has no models/*.json or serialized_exported_program.json member"
    )


def test_aoti_package_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "aoti.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("package/archive_format", "pt2")
        archive.writestr("package/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(UnsupportedFormatError, match="AOTInductor package"):
        read(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "{member} is not valid JSON: Expecting property name enclosed in double quotes"),
        (b"\xff\xfe\x00", "{member} is not valid UTF-8 (byte 0)"),
        (b"[1, 2]", "{member} is not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "{member} JSON is nested too deeply"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a' in {member}"),
        (
            b'{"graph_module\\ud800": {}}',
            "{member} is not valid JSON: lone surrogate in string 'graph_module\\ud800'",
        ),
        (
            b'{"graph_module": {"x": ["\\udfff"]}}',
            "{member} is not valid JSON: lone surrogate in string '\\udfff'",
        ),
        (b"{}", "{member}: top level has no 'graph_module'"),
        (b'{"graph_module": []}', "{member}: graph_module is an array, expected an object"),
    ],
)
def test_bad_json(tmp_path: Path, mixed_path: Path, mixed_document: Any, data: bytes, message: str) -> None:
    member, _ = mixed_document
    path = with_member(tmp_path, mixed_path, member, data)
    with pytest.raises(MalformedModelError) as caught:
        read(path)
    assert str(caught.value).startswith(message.format(member=member))
    assert "\n" not in str(caught.value)


def test_json_over_the_cap(mixed_path: Path) -> None:
    class Huge(ZipArchive):
        def size(self, name: str) -> int:
            return MAX_JSON_BYTES + 1 if name.endswith(".json") else super().size(name)

    with pytest.raises(ResourceLimitError) as caught:
        read_torch_export(mixed_path, Huge(mixed_path))
    assert str(caught.value) == (
        f"mixed/models/model.json: {MAX_JSON_BYTES + 1:,} bytes exceeds the torch.export JSON cap "
        f"of {MAX_JSON_BYTES:,} bytes"
    )


def test_archive_adapter_errors_become_bias_inspect_errors(tmp_path: Path, mixed_path: Path) -> None:
    class Failing(ZipArchive):
        def read(self, name: str, limit: int) -> bytes:
            raise zipfile.BadZipFile("Bad CRC-32 for file 'x'")

    with pytest.raises(MalformedModelError, match=r"cannot read member: Bad CRC-32"):
        read_torch_export(mixed_path, Failing(mixed_path))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["graph_module"]["graph"].__setitem__("nodes", {}),
            "graph.nodes is an object, expected an array",
        ),
        (
            lambda d: d["graph_module"]["graph"]["nodes"][0]["inputs"][1].__setitem__(
                "arg", {"as_none": True}
            ),
            "node 'conv2d' (aten.conv2d.default) has no weight tensor argument",
        ),
        (
            lambda d: d["graph_module"]["graph"]["tensor_values"]["p_ub"]["sizes"].__setitem__(
                0, {"as_int": -3}
            ),
            "tensor_values['p_ub'].sizes[0] is not a non-negative integer",
        ),
        (
            lambda d: d["graph_module"]["graph"]["tensor_values"].pop("p_ub"),
            "parameter 'ub' (placeholder 'p_ub') has no entry in graph.tensor_values",
        ),
        (
            lambda d: d["graph_module"]["signature"]["input_specs"][0].__setitem__("parameter", {"arg": 3}),
            "signature.input_specs[0].parameter.arg is a number, expected an object",
        ),
    ],
)
def test_wrong_structure_is_named(
    tmp_path: Path, mixed_path: Path, mixed_document: Any, mutate: Callable[[Any], None], message: str
) -> None:
    member, document = mixed_document
    document = copy.deepcopy(document)
    mutate(document)
    path = with_member(tmp_path, mixed_path, member, json.dumps(document).encode())
    with pytest.raises(MalformedModelError) as caught:
        read(path)
    assert message in str(caught.value)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def test_every_deleted_or_retyped_field_fails_cleanly(mixed_document: Any) -> None:
    """Delete or retype each field of a real program in turn: the reader either copes or
    raises a BiasInspectError -- never KeyError/TypeError/AttributeError."""
    member, document = mixed_document

    class Memory:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def names(self) -> list[str]:
            return [member]

        def size(self, name: str) -> int:
            return len(self.data)

        def read(self, name: str, limit: int) -> bytes:
            return self.data

    paths = [p for p in _paths(document) if p and "stack_trace" not in p]
    outcomes = {"ok": 0, "error": 0}
    for path in paths:
        for replacement in (None, 7, "x", [], {}):
            mutated = copy.deepcopy(document)
            parent = mutated
            for key in path[:-1]:
                parent = parent[key]
            if replacement is None:
                del parent[path[-1]]
            else:
                parent[path[-1]] = replacement
            try:
                read_torch_export(Path("m.pt2"), Memory(json.dumps(mutated).encode()))
                outcomes["ok"] += 1
            except BiasInspectError as error:
                assert "\n" not in str(error)
                outcomes["error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


# ---------------------------------------------------------------------------------------------
# Safety


def test_reader_never_imports_torch(mixed_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, zipfile
        from pathlib import Path
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        from biasinspect.readers.torch_export import read_torch_export

        class Z:
            def __init__(self, p): self.z = zipfile.ZipFile(p)
            def names(self): return self.z.namelist()
            def size(self, n): return self.z.getinfo(n).file_size
            def read(self, n, limit): return self.z.read(n)

        (d,) = read_torch_export(Path({str(mixed_path)!r}), Z({str(mixed_path)!r}))
        loaded = sorted(m for m in sys.modules if m.startswith("torch") and sys.modules[m] is not None)
        print(len(d.convs), d.model_params, loaded)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4 1522 []"


def test_only_the_json_member_is_read(mixed_path: Path) -> None:
    reads: list[str] = []

    class Recording(ZipArchive):
        def read(self, name: str, limit: int) -> bytes:
            reads.append(name)
            assert limit == MAX_JSON_BYTES
            return super().read(name, limit)

    read_torch_export(mixed_path, Recording(mixed_path))
    # The program graph and the weights' name index; never weight_*, sample inputs or pickles.
    assert reads == ["mixed/models/model.json", "mixed/data/weights/model_weights_config.json"]


def test_malformed_weights_config(tmp_path: Path, mixed_path: Path) -> None:
    member = "mixed/data/weights/model_weights_config.json"
    path = with_member(tmp_path, mixed_path, member, b'{"config": {"ub": {"path_name": 0}}}')
    with pytest.raises(MalformedModelError) as caught:
        read(path)
    assert str(caught.value) == f"{member}: config['ub'].path_name is a number, expected a string"
