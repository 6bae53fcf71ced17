"""Biases kept outside the conv (issue 9): a separate bias module or parameter added to a
bias-free conv's output, in every PyTorch layout, written by torch in the test; and the
distractors that must not be taken for one (an add before the conv, a residual add, a
LayerNorm/GroupNorm after the conv)."""

from __future__ import annotations

import ast
import json
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from separate_bias_models import ParentBiasBeforeNorm, make_patterns, seed_separate_bias
from torch import nn

from biasinspect.api import inspect
from biasinspect.model import BiasSource, ModelReport
from biasinspect.readers.torchscript import MAX_FORWARD_NESTING

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")

LAYOUTS = ("sd", "legacy", "full", "script", "trace", "pt2", "safetensors", "sharded")
STATE_DICTS = ("sd", "legacy", "safetensors", "sharded")
"""Layouts with names and shapes only: a separate bias is inferred, with a warning."""
CODE = ("script", "trace", "pt2")
"""Layouts that record the order of application (TorchScript code, the .pt2 graph)."""

Row = tuple[str, str, int, str | None]
"""(layer, bias kind, bias params, followed by)"""


def save_every_layout(
    folder: Path, name: str, model: nn.Module, input_shape: tuple[int, ...]
) -> dict[str, Path]:
    """Write ``model`` in every PyTorch layout with torch itself."""
    model.eval()
    example = torch.zeros(input_shape)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    files = {layout: folder / f"{name}_{layout}.pt" for layout in ("sd", "legacy", "full", "script", "trace")}
    torch.save(model.state_dict(), files["sd"])
    torch.save(model.state_dict(), files["legacy"], _use_new_zipfile_serialization=False)
    torch.save(model, files["full"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), files["script"])
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), files["trace"])
        files["pt2"] = folder / f"{name}.pt2"
        torch.export.save(torch.export.export(model, (example,)), files["pt2"])
    files["safetensors"] = folder / f"{name}.safetensors"
    save_file(state, str(files["safetensors"]))
    # Sharded: one tensor per shard, so the bias module and its conv sit in different files.
    shard_folder = folder / f"{name}_sharded"
    shard_folder.mkdir()
    weight_map: dict[str, str] = {}
    for index, (key, tensor) in enumerate(state.items()):
        shard = f"model-{index + 1:05d}-of-{len(state):05d}.safetensors"
        save_file({key: tensor}, str(shard_folder / shard))
        weight_map[key] = shard
    files["sharded"] = shard_folder / "model.safetensors.index.json"
    files["sharded"].write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    folder = tmp_path_factory.mktemp("separate_bias")
    return {
        name: save_every_layout(folder, name, model, shape)
        for name, (model, shape) in make_patterns().items()
    }


def report(path: Path) -> ModelReport:
    result = inspect(path)
    assert result.errors == ()
    (model,) = result.models
    return model


def rows(model: ModelReport) -> list[Row]:
    return [
        (layer.name, str(layer.bias.kind), layer.bias.params, layer.followed_by) for layer in model.layers
    ]


SEED_ROW: Row = ("0", "untied", 25_088, None)

# pattern -> (rows, model_params, {layout: rows} where a layout reads differently)
EXPECTED: dict[str, tuple[list[Row], int, dict[str, list[Row]]]] = {
    "seed": ([SEED_ROW], 27_488, {}),
    "issue": ([SEED_ROW, ("3", "tied", 8, None)], 29_800, {}),
    "tied_view": ([("0", "tied", 32, None)], 2_432, {}),
    "tied_c11": ([("0", "tied", 32, None)], 2_432, {}),
    "tied_1c11": ([("0", "tied", 32, None)], 2_432, {}),
    # conv.weight, shift.bias: keys in sorted order say nothing about the order of application,
    # and no Sequential index does either, so state dicts cannot tell (the conv stays absent).
    "block": (
        [("conv", "untied", 25_088, None)],
        27_488,
        {key: [("conv", "absent", 0, None)] for key in STATE_DICTS},
    ),
    "own_plus_add": ([("0", "untied", 32 + 25_088, None)], 27_520, {}),
    # y.add_(self.b): only code and graphs record it; the name ``b`` says nothing.
    "in_place": (
        [("conv", "untied", 25_088, None)],
        27_488,
        {key: [("conv", "absent", 0, None)] for key in (*STATE_DICTS, "full")},
    ),
    "pos_module": ([("1", "absent", 0, None)], 2_624, {}),
    "pos_param": ([("conv", "absent", 0, None)], 2_624, {}),
    # Named like a bias and shaped like the conv's output: where only names and shapes are
    # known (state dicts, a pickled module) it is the parent-bias rule's untied bias, as
    # ``conv(x) + self.pos_bias`` would be; code and graphs show it is added to the input.
    "pos_bias_named": (
        [("conv", "absent", 0, None)],
        2_624,
        {key: [("conv", "untied", 2_048, None)] for key in (*STATE_DICTS, "full")},
    ),
    "residual": ([("conv", "absent", 0, None)], 576, {}),
    "layer_norm": (
        [("0", "absent", 0, "LayerNorm")],
        2_400 + 2 * 25_088,
        {key: [("0", "absent", 0, "Norm")] for key in STATE_DICTS},
    ),
    "group_norm": (
        [("0", "absent", 0, "GroupNorm")],
        2_400 + 2 * 32,
        {key: [("0", "absent", 0, "Norm")] for key in STATE_DICTS},
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", sorted(EXPECTED))
def test_pattern_in_every_layout(saved: dict[str, dict[str, Path]], pattern: str, layout: str) -> None:
    expected_rows, model_params, overrides = EXPECTED[pattern]
    expected_rows = overrides.get(layout, expected_rows)
    model = report(saved[pattern][layout])
    assert rows(model) == expected_rows
    assert model.totals.conv_layers == len(expected_rows)
    assert model.totals.conv_bias_params == sum(row[2] for row in expected_rows)
    kinds = [row[1] for row in expected_rows]
    assert (model.totals.tied, model.totals.untied, model.totals.absent, model.totals.other) == tuple(
        kinds.count(kind) for kind in ("tied", "untied", "absent", "other")
    )
    assert model.totals.model_params == model_params
    guesses = [warning for warning in model.warnings if "does not record the order of application" in warning]
    inferred = layout in STATE_DICTS and any(row[2] for row in expected_rows if row[0] == "0")
    if pattern == "own_plus_add":
        inferred = layout in STATE_DICTS
    assert bool(guesses) == inferred


@pytest.mark.parametrize("layout", LAYOUTS)
def test_seed_untied_layer_as_a_separate_module(saved: dict[str, dict[str, Path]], layout: str) -> None:
    """The seed's untied layer, written as Conv2d(3, 32, 5, bias=False) + a [32, 28, 28] bias
    module: 2,400 weights + 25,088 biases = 27,488, with the seed's formula, in every layout."""
    model = report(saved["seed"][layout])
    (layer,) = model.layers
    assert layer.bias.kind == "untied"
    assert layer.bias.shape == (32, 28, 28)
    assert layer.bias.source is BiasSource.ADD
    assert [term.name for term in layer.bias.terms] == ["1.bias"]
    assert layer.weight_params == 2_400
    assert layer.formula == "3x5x5 x 32 + 32x28x28 = 27,488"
    assert layer.output_spatial == (28, 28)  # state dicts too: the untied bias fixes it
    assert (model.totals.conv_weight_params, model.totals.conv_bias_params, model.totals.model_params) == (
        2_400,
        25_088,
        27_488,
    )
    if layout in STATE_DICTS:
        # Two keys, 0.weight and 1.bias, are in sorted order: the key order proves nothing here
        # (a sorted state dict is read as unordered), the Sequential indices do.
        assert model.warnings == (
            "0: bias 1.bias [32, 28, 28] taken as added to this conv's output, inferred from the next"
            " Sequential index and its shape (a state dict does not record the order of application)",
        )
    else:
        assert model.warnings == () or layout == "full"  # a pickled module names its classes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_own_bias_and_separate_bias_are_two_terms(saved: dict[str, dict[str, Path]], layout: str) -> None:
    (layer,) = report(saved["own_plus_add"][layout]).layers
    terms = [(term.source, term.shape) for term in layer.bias.terms]
    assert terms == [(BiasSource.CONV, (32,)), (BiasSource.ADD, (32, 28, 28))]
    assert layer.formula == "3x5x5 x 32 + 32 + 32x28x28 = 27,520"


@pytest.mark.parametrize("pattern", ["tied_view", "tied_c11", "tied_1c11"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tied_separate_bias_is_in_the_output_layout(
    saved: dict[str, dict[str, Path]], pattern: str, layout: str
) -> None:
    (layer,) = report(saved[pattern][layout]).layers
    assert layer.formula == "(3x5x5 + 1) x 32 = 2,432"
    (term,) = layer.bias.terms
    # [32] is reported as it meets the output, [32, 1, 1] (the .pt2 graph shows the view).
    assert term.shape in ((32, 1, 1), (1, 32, 1, 1))


def test_bias_module_in_a_plain_module_is_taken_in_module_order_with_a_note(tmp_path: Path) -> None:
    """A pickled module records no order of application outside a Sequential: the module
    registered after the conv is assumed to follow it, and a warning says so."""
    model = report(save_every_layout(tmp_path, "block", *make_patterns()["block"])["full"])
    assert rows(model) == [("conv", "untied", 25_088, None)]
    assert (
        "conv: shift.bias taken as added to this conv's output: the module registered after it holds only a"
        " bias (module order, not recorded application order)"
    ) in model.warnings


def test_parent_bias_is_not_undecided_by_a_conv_a_following_norm_settles(tmp_path: Path) -> None:
    """Issue 9, item 4: ``bias_c`` [8, 6, 6] fits ``c`` and (as a ConvTranspose) ``d`` [4, 8, 3, 3]
    until the BatchNorm of width 4 after ``d`` makes ``d`` a Conv; that must be known before."""
    state = tmp_path / "sd.pt"
    torch.save(ParentBiasBeforeNorm().state_dict(), state)
    module = tmp_path / "full.pt"
    torch.save(ParentBiasBeforeNorm(), module)
    expected = [("c", "untied", 288, None), ("d", "absent", 0, "BatchNorm")]
    model = report(state)
    assert rows(model) == expected
    assert [layer.op for layer in model.layers] == ["Conv2d", "Conv2d"]
    assert model.layers[0].output_spatial == (6, 6)
    assert model.warnings == ()
    pickled = report(module)
    assert rows(pickled) == [("c", "untied", 288, None), ("d", "absent", 0, "BatchNorm2d")]


def test_seed_builder_is_the_seed() -> None:
    model = seed_separate_bias()
    assert sum(p.numel() for p in model.parameters()) == 27_488
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 32, 28, 28)


def test_forward_nested_past_the_stack_is_read_without_its_adds(
    saved: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    """Hostile TorchScript code: a forward nested past the dataflow's cap (its evaluation
    recurses).  ``ast.parse`` accepts it, the dataflow skips it, the file is still reported."""
    source = saved["seed"]["script"]
    target = tmp_path / "deep.pt"
    # An unused statement nested past the cap beside the real ones, which alone give the bias.
    line = "input0 = (_0).forward(input, )"
    deep = "unused = input" + " + input" * (MAX_FORWARD_NESTING + 50) + "\n    " + line
    rewrites = 0
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as rewritten:
        for info in original.infolist():
            data = original.read(info)
            # The Sequential's code: container.py, or container/___torch_mangle_N.py when this
            # process scripted another Sequential first.
            if info.filename.endswith(".py") and line.encode() in data:
                data = data.replace(line.encode(), deep.encode())
                rewrites += 1
            rewritten.writestr(info, data)
    assert rewrites == 1
    model = report(target)
    assert rows(model) == [("0", "absent", 0, None)]
    assert model.totals.model_params == 27_488
    assert model.warnings == ()


def flow_of(code: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str], list[str]]:
    from biasinspect.readers.torchscript import forward_flow

    (function,) = ast.parse(textwrap.dedent(code)).body
    assert isinstance(function, ast.FunctionDef)
    flow = forward_flow(function)
    return flow.child_adds, flow.feeds, flow.adds_to_input, flow.input_adds


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        # TorchScript's own spellings: an add on the conv output, inline or through names.
        (
            "def forward(self, x):\n  conv = self.conv\n  return torch.add((conv).forward(x, ), self.b)",
            [("conv", "b")],
        ),
        (
            "def forward(self, x):\n  y = (self.conv).forward(x, )\n  b = self.b\n  return torch.add(b, y)",
            [("conv", "b")],
        ),
        (
            "def forward(self, x):\n  return (self.conv).forward(x, ) + torch.view(self.b, [1, -1, 1, 1])",
            [("conv", "b")],
        ),
        # In place: taken when it is the output's first use, not after another use.
        (
            "def forward(self, x):\n  y = (self.conv).forward(x, )\n  _0 = torch.add_(y, self.b)\n  return y",
            [("conv", "b")],
        ),
        (
            "def forward(self, x):\n  y = (self.conv).forward(x, )\n  z = torch.mul(y, 2)\n  _0 = torch.add_(y, self.b)\n  return z",
            [],
        ),
        # The output used twice (the add is not the only use), or the name assigned twice.
        (
            "def forward(self, x):\n  y = (self.conv).forward(x, )\n  return torch.add(torch.add(y, self.b), y)",
            [],
        ),
        (
            "def forward(self, x):\n  y = (self.conv).forward(x, )\n  y = torch.relu(x)\n  return torch.add(y, self.b)",
            [],
        ),
        # An alpha other than the default is not a plain add.
        ("def forward(self, x):\n  return torch.add((self.conv).forward(x, ), self.b, alpha=2)", []),
    ],
)
def test_forward_flow_takes_only_adds_on_a_conv_output(code: str, expected: list[tuple[str, str]]) -> None:
    assert flow_of(code)[0] == expected


def test_forward_flow_feeds_and_input_adds() -> None:
    sequential = "def forward(self, input):\n  _0 = getattr(self, '0')\n  _1 = getattr(self, '1')\n  input0 = (_0).forward(input, )\n  return (_1).forward(input0, )"
    assert flow_of(sequential)[1] == [("0", "1")]
    bias_module = "def forward(self, argument_1):\n  bias = self.bias\n  return torch.add(argument_1, bias)"
    assert flow_of(bias_module)[2:] == (["bias"], ["bias"])
    positional = (
        "def forward(self, x):\n  conv = self.conv\n  return (conv).forward(torch.add(x, self.pos), )"
    )
    assert flow_of(positional) == ([], [], [], ["pos"])
