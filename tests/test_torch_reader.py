"""PyTorch readers on real files written by torch 2.13: torch.save zips, legacy files, plain
pickles, TorchScript (script and trace), nested checkpoints, quantized/fused modules -- plus the
hostile side: code-running pickles, zip bombs, lying zip headers, truncation."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch_builders import (
    KeywordWrapper,
    ReducedWrapper,
    deep_list_pickle,
    deflate_bomb_member,
    deflated_zip,
    dup_bomb_pickle,
    make_models,
    p0_call,
    p4_call,
    zip_bytes,
)

from biasinspect import limits
from biasinspect.analysis import analyze
from biasinspect.errors import (
    BiasInspectError,
    MalformedModelError,
    ResourceLimitError,
    UnsupportedFormatError,
)
from biasinspect.model import BiasKind, BiasSource, BiasTerm, ModelDescription
from biasinspect.readers.safe_zip import SafeZip
from biasinspect.readers.torch_reader import (
    classify_zip,
    read_pickle_file,
    read_torch_zip,
    tensors_from_torch_file,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")

INPUTS = {"resnet": (1, 3, 32, 32), "vgg": (1, 3, 16, 16), "untied": (1, 3, 32, 32), "mixed": (1, 8, 16, 16)}
MAIN = Path(__file__).resolve().parents[1]


def add_term(name: str, shape: tuple[int, ...]) -> BiasTerm:
    return BiasTerm(name, shape, BiasSource.ADD)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def read(path: Path) -> list[ModelDescription]:
    """Dispatch like the lead's detector: zip by magic, pickle otherwise."""
    with open(path, "rb") as handle:
        zipped = handle.read(4) == b"PK\x03\x04"
    return read_torch_zip(path) if zipped else read_pickle_file(path)


def only(path: Path) -> ModelDescription:
    found = read(path)
    assert len(found) == 1, [d.location for d in found]
    return found[0]


def totals(desc: ModelDescription) -> tuple[Any, ...]:
    t = analyze(desc).totals
    return (t.conv_layers, t.conv_weight_params, t.conv_bias_params, t.tied, t.untied, t.absent, t.other)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return make_models()


@pytest.fixture(scope="module")
def saved(models: dict[str, nn.Module], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model as state_dict / full module / legacy / TorchScript script / trace."""
    root = tmp_path_factory.mktemp("saved")
    out: dict[str, Path] = {}
    for name, model in models.items():
        example = torch.zeros(INPUTS[name])
        out[f"{name}.sd"] = root / f"{name}_sd.pt"
        torch.save(model.state_dict(), out[f"{name}.sd"])
        out[f"{name}.full"] = root / f"{name}_full.pt"
        torch.save(model, out[f"{name}.full"])
        out[f"{name}.legacy"] = root / f"{name}_legacy.pt"
        torch.save(model, out[f"{name}.legacy"], _use_new_zipfile_serialization=False)
        out[f"{name}.script"] = root / f"{name}_script.pt"
        torch.jit.script(model).save(str(out[f"{name}.script"]))
        out[f"{name}.trace"] = root / f"{name}_trace.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(model, example).save(str(out[f"{name}.trace"]))
    return out


# --------------------------------------------------------------------------------------------
# Architectures: every serialisation gives the same conv totals and model.parameters() count

EXPECTED_TOTALS = {
    # (convs, weight params, bias params, tied, untied, absent, other)
    "resnet": (10, 11672, 0, 0, 0, 10, 0),
    "vgg": (3, 1944, 16, 2, 0, 1, 0),
    "untied": (1, 2400, 25088, 0, 1, 0, 0),
    "mixed": (6, 3736, 54, 4, 0, 2, 0),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_TOTALS))
@pytest.mark.parametrize("kind", ["sd", "full", "legacy", "script", "trace"])
def test_same_totals_from_every_serialisation(
    saved: dict[str, Path], models: dict[str, nn.Module], arch: str, kind: str
) -> None:
    desc = only(saved[f"{arch}.{kind}"])
    assert totals(desc) == EXPECTED_TOTALS[arch]
    assert desc.model_params == n_params(models[arch])
    expected_format = {"script": "torchscript", "trace": "torchscript"}.get(kind, "pytorch")
    assert desc.format == expected_format
    assert desc.location is None
    assert desc.unsafe_callables == ()


@pytest.mark.parametrize("kind", ["full", "legacy", "script", "trace"])
def test_resnet_module_facts(saved: dict[str, Path], kind: str) -> None:
    desc = only(saved[f"resnet.{kind}"])
    names = [c.name for c in desc.convs]
    assert names == [
        "conv1",
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.1.conv1",
        "layer1.1.conv2",
        "layer2.0.conv1",
        "layer2.0.conv2",
        "layer2.0.downsample.0",
        "layer2.1.conv1",
        "layer2.1.conv2",
    ]
    for conv in desc.convs:
        assert conv.bias_terms == ()
        assert conv.followed_by == "BatchNorm2d"
        assert conv.groups == 1 and conv.transposed is False and conv.op == "Conv2d"
    stem = desc.convs[0]
    assert stem.weight_shape == (8, 3, 7, 7) and stem.kernel_shape == (7, 7)
    assert stem.weight_name == "conv1.weight"


@pytest.mark.parametrize("kind", ["full", "script", "trace"])
def test_mixed_groups_transposed_ranks(saved: dict[str, Path], kind: str) -> None:
    desc = only(saved[f"mixed.{kind}"])
    facts = {c.name: (c.op, c.groups, c.transposed, c.weight_shape) for c in desc.convs}
    # A traced module only has code for what forward() ran: c1/c3 were never called, so their
    # groups are unknown (reported as None, not guessed).
    unused_groups = None if kind == "trace" else 1
    assert facts == {
        "dw": ("Conv2d", 8, False, (8, 1, 3, 3)),
        "pw": ("Conv2d", 1, False, (16, 8, 1, 1)),
        "grouped": ("Conv2d", 4, False, (32, 4, 3, 3)),
        "up": ("ConvTranspose2d", 2, True, (32, 4, 4, 4)),
        "c1": ("Conv1d", unused_groups, False, (6, 4, 5)),
        "c3": ("Conv3d", unused_groups, False, (4, 2, 3, 3, 3)),
    }
    layers = {layer.name: layer for layer in analyze(desc).layers}
    assert layers["up"].out_channels == 8
    assert layers["up"].bias.kind is BiasKind.TIED
    assert layers["dw"].in_channels == 8


@pytest.mark.parametrize("kind", ["sd", "full", "legacy", "script", "trace"])
def test_untied_bias_parameter(saved: dict[str, Path], kind: str) -> None:
    desc = only(saved[f"untied.{kind}"])
    (conv,) = desc.convs
    assert conv.bias_terms == (add_term("bias", (32, 28, 28)),)
    (layer,) = analyze(desc).layers
    assert layer.bias.kind is BiasKind.UNTIED
    assert layer.bias.params == 25_088
    assert layer.formula == "3x5x5 x 32 + 32x28x28 = 27,488"


def test_full_module_names_its_classes_as_unknown_globals(saved: dict[str, Path]) -> None:
    desc = only(saved["vgg.full"])
    assert desc.warnings == (
        "pickle references globals outside the known-safe set (torch.load(weights_only=False) would "
        "import them): torch_builders.TinyVGG",
    )
    assert only(saved["vgg.script"]).warnings == ()


# --------------------------------------------------------------------------------------------
# Nested checkpoints


def _trained_vgg() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_models()["vgg"].train()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    return model.eval(), optimizer


def test_lightning_checkpoint_ignores_optimizer(tmp_path: Path) -> None:
    model, optimizer = _trained_vgg()
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 10,
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [],
            "hyper_parameters": {"lr": 0.1},
        },
        path,
    )
    desc = only(path)
    assert desc.location == "state_dict"
    assert desc.model_params == n_params(model)
    assert totals(desc) == EXPECTED_TOTALS["vgg"]
    assert [c.name for c in desc.convs] == ["model.features.0", "model.features.2", "model.features.5"]


def test_model_optimizer_and_distinct_ema(tmp_path: Path) -> None:
    model, optimizer = _trained_vgg()
    ema = copy.deepcopy(model)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()}, path
    )
    found = read(path)
    assert [d.location for d in found] == ["model", "ema"]
    for desc in found:
        assert desc.model_params == n_params(model)
        assert totals(desc) == EXPECTED_TOTALS["vgg"]


def test_aliased_ema_is_reported_once(tmp_path: Path) -> None:
    model, optimizer = _trained_vgg()
    path = tmp_path / "ckpt.pt"
    state = model.state_dict()
    torch.save({"model": state, "model_ema": dict(state), "optim": optimizer.state_dict()}, path)
    found = read(path)
    assert [d.location for d in found] == ["model"]


def test_module_objects_inside_a_dict(tmp_path: Path) -> None:
    model, optimizer = _trained_vgg()
    path = tmp_path / "yolo_style.pt"
    torch.save(
        {"epoch": 1, "model": model, "ema": copy.deepcopy(model), "optimizer": optimizer.state_dict()}, path
    )
    found = read(path)
    assert [d.location for d in found] == ["model", "ema"]
    assert all(d.model_params == n_params(model) for d in found)
    assert found[0].convs[2].followed_by == "BatchNorm2d"


def test_module_passed_as_a_reduce_argument(tmp_path: Path, models: dict[str, nn.Module]) -> None:
    # torch.save(torch.compile(model)) pickles OptimizedModule(model, dynamo_ctx) through
    # __reduce__: the model is an argument of the REDUCE, not BUILD state.  It was once not
    # searched ("no weights found" for a complete model).
    model = models["untied"]
    path = tmp_path / "compiled.pt"
    torch.save(ReducedWrapper(model, {"backend": "inductor"}), path)
    desc = only(path)
    assert desc.location is None
    assert [(conv.name, conv.bias_terms) for conv in desc.convs] == [
        ("conv", (add_term("bias", (32, 28, 28)),))
    ]
    assert desc.model_params == n_params(model) == 2400 + 25088
    assert "no weights (state dict or module) found in the pickle" not in desc.warnings
    # Keyword arguments (NEWOBJ_EX) are searched too, named by their key.
    path = tmp_path / "kwargs.pt"
    torch.save({"outer": KeywordWrapper(wrapped=model.state_dict())}, path, pickle_protocol=4)
    assert b"\x92" in zipfile.ZipFile(path).read("kwargs/data.pkl")  # the NEWOBJ_EX opcode
    (desc,) = read(path)
    assert desc.location == "outer.wrapped"
    assert desc.model_params == n_params(model)


def test_list_of_state_dicts_locations(tmp_path: Path, models: dict[str, nn.Module]) -> None:
    path = tmp_path / "two.pt"
    torch.save([models["vgg"].state_dict(), models["untied"].state_dict()], path)
    assert [d.location for d in read(path)] == ["[0]", "[1]"]


# --------------------------------------------------------------------------------------------
# Other pickle shapes


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_pickle_of_cpu_tensors(tmp_path: Path, models: dict[str, nn.Module], protocol: int) -> None:
    path = tmp_path / "weights.pkl"
    with open(path, "wb") as handle:
        pickle.dump(models["vgg"].state_dict(), handle, protocol=protocol)
    desc = only(path)
    assert desc.format == "pickle"
    assert totals(desc) == EXPECTED_TOTALS["vgg"]
    assert desc.model_params == n_params(models["vgg"])


def test_legacy_state_dict(tmp_path: Path, models: dict[str, nn.Module]) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(models["mixed"].state_dict(), path, _use_new_zipfile_serialization=False)
    desc = only(path)
    assert desc.format == "pytorch"
    assert totals(desc) == EXPECTED_TOTALS["mixed"]


def test_weight_norm_inside_a_module(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 4, 3)), nn.ReLU())
    path = tmp_path / "wn.pt"
    torch.save(model, path)
    desc = only(path)
    (conv,) = desc.convs
    assert conv.name == "0" and conv.weight_name == "0.weight_v" and conv.weight_shape == (4, 3, 3, 3)
    assert conv.notes == ("weight norm (weight_g/weight_v): weight shape taken from weight_v",)
    assert desc.model_params == n_params(model) == 4 + 108 + 4


def test_fused_conv_relu_and_conv_bn(tmp_path: Path) -> None:
    import torch.ao.nn.intrinsic as nni

    model = nn.Sequential(
        nni.ConvReLU2d(nn.Conv2d(3, 4, 3), nn.ReLU()),
        nni.ConvBn2d(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6)),
    )
    path = tmp_path / "fused.pt"
    torch.save(model, path)
    desc = only(path)
    assert [(c.name, c.followed_by, len(c.bias_terms)) for c in desc.convs] == [
        ("0.0", None, 1),
        ("1.0", "BatchNorm2d", 0),
    ]
    assert desc.model_params == n_params(model)
    assert desc.warnings == ()  # every global is a known torch class


@pytest.mark.filterwarnings("ignore")
def test_qat_conv_bn(tmp_path: Path) -> None:
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.quantization as tq

    model = nn.Sequential(nniqat.ConvBn2d(3, 8, 3, qconfig=tq.get_default_qat_qconfig("fbgemm")), nn.ReLU())
    path = tmp_path / "qat.pt"
    torch.save(model, path)
    desc = only(path)
    (conv,) = desc.convs
    assert conv.weight_shape == (8, 3, 3, 3) and conv.bias_terms == () and conv.followed_by == "BatchNorm2d"
    assert desc.model_params == n_params(model)


@pytest.mark.filterwarnings("ignore")
def test_quantized_conv_module(tmp_path: Path) -> None:
    import torch.ao.quantization as tq

    class Q(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant = tq.QuantStub()
            self.conv = nn.Conv2d(3, 4, 3)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(4, 4, 1, groups=2)
            self.dequant = tq.DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.conv2(self.relu(self.conv(self.quant(x)))))

    model = Q().eval()
    model.qconfig = tq.get_default_qconfig("fbgemm")
    tq.fuse_modules(model, [["conv", "relu"]], inplace=True)
    tq.prepare(model, inplace=True)
    model(torch.randn(1, 3, 8, 8))
    tq.convert(model, inplace=True)
    Q.__module__ = __name__
    Q.__qualname__ = "Q"
    globals()["Q"] = Q
    path = tmp_path / "quantized.pt"
    torch.save(model, path)
    desc = only(path)
    facts = [(c.name, c.weight_shape, c.groups, [t.shape for t in c.bias_terms]) for c in desc.convs]
    assert facts == [("conv", (4, 3, 3, 3), 1, [(4,)]), ("conv2", (4, 2, 1, 1), 2, [(4,)])]
    # Quantized modules keep their weights outside _parameters (model.parameters() is empty);
    # the packed weights and biases are counted, as the state-dict reader counts them.
    assert n_params(model) == 0
    assert desc.model_params == 108 + 4 + 8 + 4

    # The same model as a state dict, scripted and traced: the same convs and count (a quantized
    # conv's TorchScript state is its __getstate__ tuple; scale/zero_point are not parameters).
    saved = {"sd": tmp_path / "q_sd.pt", "script": tmp_path / "q_script.pt", "trace": tmp_path / "q_trace.pt"}
    torch.save(model.state_dict(), saved["sd"])
    torch.jit.save(torch.jit.script(model), saved["script"])
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 8, 8)), saved["trace"])
    for kind, other in saved.items():
        other_desc = only(other)
        other_facts = [(c.name, c.weight_shape, [t.shape for t in c.bias_terms]) for c in other_desc.convs]
        assert other_facts == [("conv", (4, 3, 3, 3), [(4,)]), ("conv2", (4, 2, 1, 1), [(4,)])], kind
        assert other_desc.model_params == desc.model_params, kind
        if kind != "sd":
            assert [c.groups for c in other_desc.convs] == [1, 2], kind


def test_lazy_conv_unmaterialised_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "lazy.pt"
    torch.save(nn.LazyConv2d(5, 3), path)
    desc = only(path)
    assert desc.convs == ()
    assert desc.model_params is None  # unknown, not 0
    assert any("(LazyConv2d) has parameters without a known shape" in w for w in desc.warnings)


def test_materialised_lazy_conv(tmp_path: Path) -> None:
    conv = nn.LazyConv2d(5, 3)
    conv(torch.zeros(1, 2, 8, 8))
    path = tmp_path / "lazy.pt"
    torch.save(conv, path)
    desc = only(path)
    assert [(c.name, c.weight_shape) for c in desc.convs] == [("<root>", (5, 2, 3, 3))]


class MyConv(nn.Conv2d):
    """A user subclass with an extra untied bias in its own module."""

    def __init__(self) -> None:
        super().__init__(2, 3, 3, bias=False)
        self.spatial_bias = nn.Parameter(torch.zeros(3, 6, 6))


def test_user_conv_subclass_with_own_untied_bias(tmp_path: Path) -> None:
    path = tmp_path / "sub.pt"
    model = nn.Sequential(MyConv())
    torch.save(model, path)
    desc = only(path)
    (conv,) = desc.convs
    assert conv.bias_terms == (add_term("0.spatial_bias", (3, 6, 6)),)
    assert analyze(desc).layers[0].bias.kind is BiasKind.UNTIED
    assert desc.model_params == n_params(model)


class CamelUntied(nn.Module):
    """An untied bias whose name spells Bias with a capital (still a bias, like in state dicts)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.untiedBias = nn.Parameter(torch.zeros(3, 6, 6))


def test_capitalised_bias_name_in_parent_module(tmp_path: Path) -> None:
    path = tmp_path / "camel.pt"
    model = CamelUntied()
    torch.save(model, path)
    (conv,) = only(path).convs
    assert conv.bias_terms == (add_term("untiedBias", (3, 6, 6)),)


def test_bias_v_without_bias_g_is_not_a_weight_normed_bias(tmp_path: Path) -> None:
    conv = nn.Conv2d(2, 3, 3, bias=False)
    conv.register_parameter("bias_v", nn.Parameter(torch.zeros(3)))
    path = tmp_path / "v_only.pt"
    torch.save(nn.Sequential(conv), path)
    (layer,) = only(path).convs
    # Without its magnitude bias_g it is not the conv's own bias, only an extra bias-named
    # parameter added to the output.
    assert [(t.name, t.shape, t.source) for t in layer.bias_terms] == [("0.bias_v", (3,), BiasSource.ADD)]


def test_tensors_from_torch_file_for_shards(tmp_path: Path, models: dict[str, nn.Module]) -> None:
    state = models["vgg"].state_dict()
    for name, kwargs in (("zip.bin", {}), ("legacy.bin", {"_use_new_zipfile_serialization": False})):
        path = tmp_path / name
        torch.save(state, path, **kwargs)
        tensors = tensors_from_torch_file(path)
        assert list(tensors) == list(state)
        assert all(tensors[k].shape == tuple(v.shape) for k, v in state.items())
        assert tensors["features.0.weight"].dtype == "float32"
        assert tensors["features.6.num_batches_tracked"].dtype == "int64"
    empty = tmp_path / "empty.bin"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(MalformedModelError, match="no state dict"):
        tensors_from_torch_file(empty)


def test_classify_zip_members() -> None:
    assert classify_zip(["a/data.pkl", "a/data/0"]) == ("pytorch", "a/")
    assert classify_zip(["m/data.pkl", "m/constants.pkl", "m/code/__torch__.py"]) == ("torchscript", "m/")
    assert classify_zip(["e/archive_format", "e/models/model.json"]) == ("torch-export", "e/")
    assert classify_zip(["version", "serialized_exported_program.json"]) == ("torch-export", "")
    with pytest.raises(UnsupportedFormatError, match=re.escape("no data.pkl")):
        classify_zip(["readme.txt"])


def test_torch_export_archive_is_dispatched(tmp_path: Path, models: dict[str, nn.Module]) -> None:
    model = models["untied"]
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, 32, 32),)), path)
    desc = only(path)
    assert desc.format == "torch-export"
    assert desc.model_params == n_params(model)


def test_missing_storage_member_is_malformed(tmp_path: Path, models: dict[str, nn.Module]) -> None:
    good = tmp_path / "good.pt"
    torch.save(models["untied"].state_dict(), good)
    with zipfile.ZipFile(good) as src:
        members = [(n, src.read(n)) for n in src.namelist() if n != "good/data/0"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(zip_bytes(members))
    with pytest.raises(MalformedModelError, match="tensor storage 'good/data/0' is missing from the archive"):
        read(bad)


def test_reader_never_imports_torch(saved: dict[str, Path], tmp_path: Path) -> None:
    plain = tmp_path / "plain.pkl"
    with open(plain, "wb") as handle:
        pickle.dump({"conv.weight": torch.zeros(4, 3, 3, 3)}, handle)
    paths = [
        saved["resnet.sd"],
        saved["resnet.full"],
        saved["resnet.legacy"],
        saved["resnet.script"],
        saved["resnet.trace"],
        plain,
    ]
    script = (
        "import sys, json\n"
        "sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from biasinspect.readers.torch_reader import read_torch_zip, read_pickle_file\n"
        "from biasinspect.analysis import analyze\n"
        "out = []\n"
        "for p in sys.argv[1:]:\n"
        "    p = Path(p)\n"
        "    reader = read_torch_zip if p.read_bytes()[:2] == b'PK' else read_pickle_file\n"
        "    out.append([analyze(d).totals.conv_layers for d in reader(p)])\n"
        "print(json.dumps(out))\n"
        "assert sys.modules['torch'] is None\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, paths)],
        capture_output=True,
        text=True,
        cwd=MAIN,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [[10], [10], [10], [10], [10], [1]]


# --------------------------------------------------------------------------------------------
# Hostile files


DANGEROUS = [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "exec"),
    ("subprocess", "Popen"),
    ("runpy", "_run_code"),
    ("importlib", "import_module"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("make", [p0_call, p4_call], ids=["GLOBAL-p0", "STACK_GLOBAL-p4"])
@pytest.mark.parametrize(("module", "name"), DANGEROUS)
def test_code_running_pickle_is_reported_not_run(tmp_path: Path, make: Any, module: str, name: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(make(module, name, f"touch {marker}"))
    desc = only(path)
    assert desc.unsafe_callables == (f"{module}.{name}",)
    assert desc.warnings[0] == (
        f"pickle references callables that run code under torch.load(weights_only=False): {module}.{name}"
    )
    assert desc.convs == () and desc.model_params is None
    assert not marker.exists()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("legacy", [False, True])
def test_reduce_payload_inside_a_real_checkpoint(
    tmp_path: Path, models: dict[str, nn.Module], legacy: bool
) -> None:
    marker = tmp_path / "pwned"
    state: dict[str, Any] = dict(models["untied"].state_dict())
    state["_extra"] = _Evil(marker)
    path = tmp_path / "evil.pt"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    desc = only(path)
    assert desc.unsafe_callables == (f"{os.system.__module__}.system",)
    assert "posix.system" in desc.warnings[0] or "nt.system" in desc.warnings[0]
    assert totals(desc) == EXPECTED_TOTALS["untied"]  # the weights are still reported
    assert not marker.exists()


@pytest.mark.timeout(30)
def test_swapped_data_pkl_in_a_torch_zip(tmp_path: Path, models: dict[str, nn.Module]) -> None:
    marker = tmp_path / "pwned"
    good = tmp_path / "good.pt"
    torch.save(models["vgg"].state_dict(), good)
    with zipfile.ZipFile(good) as src:
        members = [(n, src.read(n)) for n in src.namelist()]
    hostile = p4_call("builtins", "exec", f"open({str(marker)!r}, 'w')")
    members = [(n, hostile if n.endswith("/data.pkl") else data) for n, data in members]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(zip_bytes(members))
    desc = only(bad)
    assert desc.unsafe_callables == ("builtins.exec",)
    assert not marker.exists()


@pytest.mark.timeout(30)
def test_module_named_in_pickle_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "evilmod_bi.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef boom(*a): pass\n")
    (tmp_path / "Klass_bi.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "model.pkl"
    path.write_bytes(p0_call("evilmod_bi", "boom", "x"))
    before = set(sys.modules)
    desc = only(path)
    assert "evilmod_bi" not in sys.modules
    # biasinspect's own lazily imported modules may appear; nothing else may.
    assert {name for name in set(sys.modules) - before if not name.startswith("biasinspect.")} == set()
    assert not marker.exists()
    # Called by REDUCE, so it is unsafe (importing evilmod_bi and calling boom would run code).
    assert desc.unsafe_callables == ("evilmod_bi.boom",)
    assert desc.warnings == (
        "pickle references callables that run code under torch.load(weights_only=False): evilmod_bi.boom",
        "pickle references globals outside the known-safe set (torch.load(weights_only=False) would "
        "import them): evilmod_bi.boom",
        "no weights (state dict or module) found in the pickle",
    )


@pytest.mark.timeout(30)
def test_deep_nesting_and_dup_bombs_end_quickly(tmp_path: Path) -> None:
    deep = tmp_path / "deep.pkl"
    deep.write_bytes(deep_list_pickle(100_000))
    desc = only(deep)
    assert desc.convs == ()
    assert (
        f"objects nested deeper than {limits.MAX_CONTAINER_DEPTH} levels were not searched for weights"
        in desc.warnings
    )
    bomb = tmp_path / "bomb.pkl"
    bomb.write_bytes(dup_bomb_pickle(60, 10))
    desc = only(bomb)
    assert desc.warnings == ("no weights (state dict or module) found in the pickle",)


def test_memo_get_of_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(b"\x80\x02h\x07.")
    with pytest.raises(MalformedModelError, match="malformed pickle: memo key 7 is not defined"):
        read(path)


@pytest.mark.timeout(30)
def test_zip_bomb_member_declared_huge(tmp_path: Path) -> None:
    stream = deflate_bomb_member(2048)  # 2 GiB of zeros, ~2 MB compressed
    assert len(stream) < 4_000_000
    path = tmp_path / "bomb.pt"
    path.write_bytes(deflated_zip("bomb/data.pkl", stream, 2048 << 20))
    with pytest.raises(ResourceLimitError, match=re.escape("'bomb/data.pkl' declares 2,147,483,648 bytes")):
        read(path)


@pytest.mark.timeout(30)
def test_zip_bomb_member_with_ratio_over_cap(tmp_path: Path) -> None:
    stream = deflate_bomb_member(100)
    path = tmp_path / "bomb.pt"
    path.write_bytes(deflated_zip("bomb/data.pkl", stream, 100 << 20))
    with pytest.raises(ResourceLimitError, match="compression ratio over 200:1"):
        read(path)


@pytest.mark.timeout(30)
def test_zip_bomb_member_lying_about_its_size(tmp_path: Path) -> None:
    stream = deflate_bomb_member(1024)
    path = tmp_path / "bomb.pt"
    path.write_bytes(deflated_zip("bomb/data.pkl", stream, 10_000_000))
    with pytest.raises(MalformedModelError, match="inflates past its declared size of 10,000,000 bytes"):
        read(path)


def test_deflated_members_read_normally(tmp_path: Path, models: dict[str, nn.Module]) -> None:
    good = tmp_path / "good.pt"
    torch.save(models["vgg"].state_dict(), good)
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    assert totals(only(deflated)) == EXPECTED_TOTALS["vgg"]


@pytest.mark.parametrize(
    ("lie", "message"),
    [
        ({"name": "x/dada.pkl"}, "local header and central directory disagree for member 'x/data.pkl' (name"),
        ({"method": 8}, "(compression method)"),
        ({"usize": 3}, "(sizes)"),
        ({"crc": 1}, "(CRC)"),
        ({"c_usize": 3}, "(sizes)"),
        ({"c_offset": 7}, "has no local header at its offset"),
    ],
)
def test_local_and_central_headers_must_agree(tmp_path: Path, lie: dict[str, Any], message: str) -> None:
    members = [("x/data.pkl", pickle.dumps({}, protocol=2)), ("x/version", b"3\n")]
    path = tmp_path / "lie.pt"
    path.write_bytes(zip_bytes(members, lie={"x/data.pkl": lie}))
    with pytest.raises(MalformedModelError, match="malformed zip") as info:
        read(path)
    assert message in str(info.value)


def test_torch_written_local_header_tampering_is_refused(
    tmp_path: Path, models: dict[str, nn.Module]
) -> None:
    good = tmp_path / "t.pt"
    torch.save(models["untied"].state_dict(), good)
    data = bytearray(good.read_bytes())
    assert data[30:40] == b"t/data.pkl"
    data[30:40] = b"t/dada.pkl"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(MalformedModelError, match=re.escape("disagree for member 't/data.pkl'")):
        read(bad)


def test_overlapping_members_are_refused(tmp_path: Path) -> None:
    body = pickle.dumps({}, protocol=2)
    members = [("x/data.pkl", body), ("x/version", b"3\n")]
    honest = tmp_path / "honest.pt"
    honest.write_bytes(zip_bytes(members))
    assert only(honest).convs == ()
    # Both headers agree that data.pkl is 40 bytes longer: its data would run into version's header.
    grown = len(body) + 40
    path = tmp_path / "overlap.pt"
    sizes = {"usize": grown, "csize": grown, "c_usize": grown, "c_csize": grown}
    path.write_bytes(zip_bytes(members, lie={"x/data.pkl": sizes}))
    with pytest.raises(MalformedModelError, match=re.escape("member 'x/data.pkl' overlaps other data")):
        read(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_torch_zip(tmp_path: Path, models: dict[str, nn.Module], keep: float) -> None:
    good = tmp_path / "good.pt"
    torch.save(models["vgg"].state_dict(), good)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(MalformedModelError, match="truncated zip"):
        read(cut)


def test_png_renamed_pt_is_a_clean_error(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + bytes(17) + b"IEND\xaeB`\x82"
    path = tmp_path / "weights.pt"
    path.write_bytes(png)
    with pytest.raises(UnsupportedFormatError, match="not a zip archive"):
        read_torch_zip(path)
    with pytest.raises(BiasInspectError):
        read_pickle_file(path)
    from biasinspect.api import inspect

    report = inspect(path)
    assert report.models == () and len(report.errors) == 1
    assert "\n" not in report.errors[0].message


def test_safe_zip_reads_real_archive_members(saved: dict[str, Path]) -> None:
    with SafeZip(saved["vgg.sd"]) as archive:
        names = archive.names()
        assert "vgg_sd/data.pkl" in names
        assert archive.size("vgg_sd/byteorder") == len(archive.read("vgg_sd/byteorder", 100))
        with pytest.raises(ResourceLimitError, match="over the 10-byte limit"):
            archive.read("vgg_sd/data.pkl", 10)
        with pytest.raises(KeyError):
            archive.size("nope")


def test_inline_storage_bytes_are_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = nn.Conv2d(64, 64, 3)
    path = tmp_path / "big.pt"
    torch.save(big.state_dict(), path)
    read_members: list[str] = []
    original = SafeZip.read

    def spy(self: SafeZip, name: str, limit: int) -> bytes:
        read_members.append(name)
        return original(self, name, limit)

    monkeypatch.setattr(SafeZip, "read", spy)
    desc = only(path)
    assert read_members == ["big/data.pkl"]
    assert desc.model_params == n_params(big)


def test_pickle_io_buffer_path(tmp_path: Path) -> None:
    # Storage-less payload after a pickle (polyglot): only the pickle is read.
    path = tmp_path / "poly.pkl"
    buf = io.BytesIO()
    pickle.dump({"w": 1}, buf)
    path.write_bytes(buf.getvalue() + zip_bytes([("a/data.pkl", b"junk")]))
    desc = only(path)
    assert desc.format == "pickle" and desc.convs == ()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["sd", "script", "legacy"])
def test_mutated_files_only_raise_our_errors(saved: dict[str, Path], tmp_path: Path, kind: str) -> None:
    import random

    data = saved[f"vgg.{kind}"].read_bytes()
    rng = random.Random(kind)
    path = tmp_path / "mutated.pt"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(150):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if rng.random() < 0.2:
            del mutated[rng.randrange(len(mutated)) :]
        path.write_bytes(bytes(mutated))
        try:
            read(path)
            outcomes["ok"] += 1
        except BiasInspectError as error:
            assert "\n" not in str(error)
            outcomes["error"] += 1
    assert outcomes["error"] > 0  # truncations alone guarantee some


def test_zip64_member_headers_are_understood(tmp_path: Path, models: dict[str, nn.Module]) -> None:
    good = tmp_path / "good.pt"
    torch.save(models["vgg"].state_dict(), good)
    forced = tmp_path / "zip64.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(forced, "w") as dst:
        for name in src.namelist():
            with dst.open(name, "w", force_zip64=True) as handle:
                handle.write(src.read(name))
    raw = forced.read_bytes()
    assert b"\x01\x00\x10\x00" in raw  # a zip64 extra field (id 1, 16 bytes) in the local headers
    assert totals(only(forced)) == EXPECTED_TOTALS["vgg"]


def test_torchscript_with_unparsable_code_still_reports(saved: dict[str, Path], tmp_path: Path) -> None:
    with zipfile.ZipFile(saved["untied.script"]) as src:
        members = [(n, src.read(n)) for n in src.namelist()]
    broken = [n for n, _ in members if "/nn/modules/conv" in n and n.endswith(".py")]
    assert len(broken) == 1  # conv.py, or conv/___torch_mangle_N.py when scripted twice
    members = [(n, b"class (:\n" if n in broken else d) for n, d in members]
    bad = tmp_path / "bad_code.pt"
    bad.write_bytes(zip_bytes(members))
    desc = only(bad)
    assert desc.format == "torchscript"
    assert any("could not be parsed" in w and broken[0] in w for w in desc.warnings)
    # Without its class code the conv's tensors are still found (counted as parameters).
    assert [c.weight_shape for c in desc.convs] == [(32, 3, 5, 5)]


def test_torchscript_whose_root_is_not_a_module(saved: dict[str, Path], tmp_path: Path) -> None:
    with zipfile.ZipFile(saved["untied.script"]) as src:
        members = [(n, src.read(n)) for n in src.namelist()]
    members = [(n, pickle.dumps([1, 2], protocol=2) if n.endswith("/data.pkl") else d) for n, d in members]
    bad = tmp_path / "not_module.pt"
    bad.write_bytes(zip_bytes(members))
    with pytest.raises(
        MalformedModelError, match=re.escape("TorchScript data.pkl does not hold a module object")
    ):
        read(bad)


# --------------------------------------------------------------------------------------------
# Review regressions (TORCH_FIXES 6-9)


class _ParamWeightNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3))
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_parametrized_weight_norm_conv(tmp_path: Path, how: str) -> None:
    """The current weight-norm API keeps the weight in parametrizations.weight.original0/1."""
    model = _ParamWeightNorm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = (
            torch.jit.script(model) if how == "script" else torch.jit.trace(model, torch.zeros(1, 3, 9, 9))
        )
        torch.jit.save(scripted, str(tmp_path / "wn.pt"))
    (desc,) = read_torch_zip(tmp_path / "wn.pt")
    assert desc.format == "torchscript"
    (conv,) = desc.convs
    assert conv.name == "c"
    assert conv.weight_name == "c.parametrizations.weight.original1"
    assert conv.weight_shape == (8, 3, 3, 3)
    assert conv.bias_terms == (BiasTerm("c.bias", (8,), BiasSource.CONV),)
    assert desc.model_params == sum(p.numel() for p in model.parameters())


def test_module_pickled_with_protocol_1_keeps_class_names(tmp_path: Path) -> None:
    """Protocols 0/1 pickle modules as copyreg._reconstructor(cls, object, None)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
    for protocol in (0, 1):
        path = tmp_path / f"p{protocol}.pt"
        torch.save(model, path, pickle_protocol=protocol)
        (desc,) = read_torch_zip(path)
        (conv,) = desc.convs
        assert (conv.name, conv.op, conv.bias_terms, conv.followed_by) == ("0", "Conv2d", (), "BatchNorm2d")
        assert desc.model_params == sum(p.numel() for p in model.parameters())


def test_torchscript_constants_pkl_is_read(tmp_path: Path) -> None:
    """torch.jit.load unpickles constants.pkl too: a payload there is reported."""
    marker = tmp_path / "MARK"
    source = tmp_path / "ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(nn.Conv2d(3, 8, 3)), str(source))
    with zipfile.ZipFile(source) as zin:
        members = {name: zin.read(name) for name in zin.namelist()}
    (constants,) = [name for name in members if name.endswith("/constants.pkl")]
    raw = str(marker).encode()
    members[constants] = (
        b"\x80\x02cos\nmkdir\n(X" + len(raw).to_bytes(4, "little") + raw + b"tR0" + members[constants][2:]
    )
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zout:
        for name, data in members.items():
            zout.writestr(name, data)
    (desc,) = read_torch_zip(path)
    assert len(desc.convs) == 1
    assert desc.unsafe_callables == ("os.mkdir",)
    assert not marker.exists()


def test_bias_named_extras_are_unaligned_add_terms() -> None:
    """A bias-named extra that is not [C_out, *spatial] is kept as an unaligned ADD term."""
    from biasinspect.readers.module_tree import ModuleNode, describe_module_tree
    from biasinspect.readers.pickle_inert import TensorRef
    from biasinspect.readers.tensors import TensorInfo

    def tensor(*shape: int) -> TensorRef:
        return TensorRef(TensorInfo(shape, "float32"), True, None)

    conv = ModuleNode("c", "torch.nn.modules.conv.Conv2d", params={"weight": tensor(8, 3, 3, 3)})
    conv.params["extra_bias"] = tensor(1)
    conv.params["map_bias"] = tensor(8, 5, 5)
    conv.attrs.update(kernel_size=(3, 3), stride=(1, 1), groups=1)
    root = ModuleNode("", "mymodels.Net", params={"out_bias": tensor(3)}, children=[conv])
    (node,) = describe_module_tree(root, path="x", format="pytorch").convs
    assert node.bias_terms == (
        BiasTerm("c.extra_bias", (1,), BiasSource.ADD, aligned=False),
        BiasTerm("c.map_bias", (8, 5, 5), BiasSource.ADD),
        BiasTerm("out_bias", (3,), BiasSource.ADD, aligned=False),
    )


def test_zip_with_data_pkl_in_two_top_folders_is_refused(tmp_path: Path) -> None:
    """torch refuses such zips; which record would be loaded is ambiguous."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2, 3, 3, 3)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as zin:
        members = {name: zin.read(name) for name in zin.namelist()}
    path = tmp_path / "two.pt"
    with zipfile.ZipFile(path, "w") as zout:
        for name, data in members.items():
            zout.writestr(name, data)
            zout.writestr("other/" + name.split("/", 1)[1], data)
    with pytest.raises(
        MalformedModelError, match=r"^zip holds data\.pkl in several top folders \(archive, other\)$"
    ):
        read_torch_zip(path)


def test_torchscript_module_with_an_unknown_state_is_named() -> None:
    from biasinspect.readers.pickle_inert import Call, GlobalRef
    from biasinspect.readers.torchscript import ClassInfo, module_from_torchscript

    root = Call(GlobalRef("__torch__", "Net"), ())
    odd = Call(GlobalRef("__torch__", "Odd"), ())
    odd.state = ["a", "list", "state"]  # neither a __dict__ nor a quantized __getstate__ tuple
    root.state = {"training": False, "odd": odd}
    classes = {
        "__torch__.Net": ClassInfo("__torch__.Net", True),
        "__torch__.Odd": ClassInfo("__torch__.Odd", True),
    }
    warnings: list[str] = []
    tree = module_from_torchscript(root, classes, warnings)
    assert [child.path for child in tree.children] == ["odd"]
    assert warnings == [
        "TorchScript modules whose saved state is not understood (their tensors were not counted, "
        "any convs in them not found): __torch__.Odd"
    ]
