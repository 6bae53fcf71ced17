"""Hostile ONNX graphs (issue 8): function-call bombs, growth in shape inference, absurd numbers,
and walks that must stay linear.  The files are built in code (tests/hostile_onnx.py).

Bombs run the CLI in a subprocess under an address-space limit and a wall-clock timeout, so that
a regression fails the test (MemoryError, timeout) instead of taking the machine down.  Linearity
is checked by counting the Python lines biasinspect runs (deterministic, not timed): four times
the graph must mean about four times the lines.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hostile_onnx as ho
import pytest

from biasinspect import limits
from biasinspect.cli import main
from biasinspect.readers.onnx_reader import read_onnx

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
ADDRESS_SPACE = 3 * 1024**3
"""RLIMIT_AS of the subprocess: a capped reader needs a few hundred MiB; a bomb wants far more."""
WALL_SECONDS = 60
"""A capped reader answers in about a second; a bomb would take minutes or forever."""

_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from biasinspect.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_limited(path: Path) -> tuple[int, dict[str, Any], str]:
    """The CLI on ``path`` (JSON report) in a subprocess with bounded memory and time."""
    result = subprocess.run(
        [sys.executable, "-c", _LIMITED.format(limit=ADDRESS_SPACE), str(path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=WALL_SECONDS,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout), result.stderr


def run_cli(path: Path) -> tuple[int, dict[str, Any], str]:
    """The CLI on ``path`` (JSON report), in this process."""
    out, err = io.StringIO(), io.StringIO()
    code = main([str(path), "--format", "json"], stdout=out, stderr=err)
    assert "Traceback" not in err.getvalue()
    return code, json.loads(out.getvalue()), err.getvalue()


def assert_clean_error(result: tuple[int, dict[str, Any], str], path: Path, *fragments: str) -> None:
    code, report, err = result
    assert code == 2, err
    prefix = f"biasinspect: {path}: "
    assert err.startswith(prefix) and err.count("\n") == 1, err
    reason = err[len(prefix) :].strip()
    assert "internal error" not in reason
    for fragment in fragments:
        assert fragment in reason, (fragment, reason)
    assert report["models"] == []


def only_model(result: tuple[int, dict[str, Any], str]) -> dict[str, Any]:
    code, report, err = result
    assert (code, err) == (0, ""), err
    (model,) = report["models"]
    return model  # type: ignore[no-any-return]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# Function-call expansion
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "build"),
    [
        # Doubling below a 32-call chain: 2**30 instances where the depth-limited count saw none.
        ("past-depth-limit", lambda: ho.function_bomb(chain=32, levels=30)),
        # A count cached per function, cut at depth 32 where it was first met: ~5,000 instances
        # counted, a million walked (hours, before).
        ("cut-count", ho.function_bomb_cut_count),
        # The doubling function is first counted at the end of a long chain (cut to nothing by
        # the depth limit), then called straight from the main graph.
        ("reached-deep-first", lambda: ho.function_bomb_reached_deep_first(32, 24)),
    ],
)
def test_function_bombs_are_refused_before_any_inference(
    tmp_path: Path, name: str, build: Callable[[], bytes]
) -> None:
    path = write(tmp_path, f"{name}.onnx", build())
    assert_clean_error(
        run_limited(path),
        path,
        "model-local functions expand to more than 10,000 call sites",
    )


def test_function_expansion_within_the_caps_is_walked_call_by_call(tmp_path: Path) -> None:
    # main -> f0 -> f1 -> f2 (f2..f7 each call the next twice) -> f8, the conv: 2**6 instances.
    path = write(tmp_path, "expansion.onnx", ho.function_bomb(chain=2, levels=7, fanout=2))
    (desc,) = read_onnx(path)
    assert len(desc.convs) == 2**6
    assert len({conv.name for conv in desc.convs}) == 2**6
    assert desc.convs[0].name == "main_call/" + "call0/" * 8 + "c"
    assert desc.convs[0].weight_shape == (1, 1, 1, 1)
    assert desc.convs[0].output_spatial == (8, 8)


def test_function_expansion_cap_counts_nodes_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_ONNX_WALK_NODES", 100)
    path = write(tmp_path, "nodes.onnx", ho.function_bomb(chain=0, levels=7, fanout=2))
    with pytest.raises(Exception, match="model-local functions expand to more than 100 nodes"):
        read_onnx(path)


# ---------------------------------------------------------------------------------------------
# Growth in shape inference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "build", "warning"),
    [
        ("shape-concat-40", lambda: ho.concat_doubling(40, "shape"), "shape inference was not run"),
        ("declared-concat-40", lambda: ho.concat_doubling(40, "declared"), "shape inference was not run"),
        ("stored-concat-40", lambda: ho.concat_doubling(40, "stored"), "shape inference was not run"),
        (
            "stored-value-2**40",
            lambda: ho.long_vector_from_stored_value(1 << 40),
            "shape inference was not run",
        ),
        ("unsqueeze-20000", lambda: ho.unsqueeze_chain(20_000), "inferred shapes could hold"),
    ],
)
def test_shape_inference_growth_is_bounded(
    tmp_path: Path, name: str, build: Callable[[], bytes], warning: str
) -> None:
    path = write(tmp_path, f"{name}.onnx", build())
    model = only_model(run_limited(path))
    (layer,) = model["layers"]
    assert layer["name"] == "conv"
    assert layer["weight_shape"] == [4, 3, 3, 3]
    # The conv's own arithmetic still gives the size inference was not asked for.
    assert layer["output_spatial"] == [6, 6]
    assert any(warning in text for text in model["warnings"]), model["warnings"]


def test_modest_shape_arithmetic_keeps_data_propagation(tmp_path: Path) -> None:
    # Shape doubled 3 times: a 32-element vector, rank 32, well inside the caps: no warning.
    path = write(tmp_path, "modest.onnx", ho.concat_doubling(3, "shape"))
    (desc,) = read_onnx(path)
    assert desc.warnings == ()
    assert desc.convs[0].output_spatial == (6, 6)


def test_propagated_values_past_their_cap_turn_data_propagation_off(tmp_path: Path) -> None:
    # Declared 1-D int64 input of length 4, doubled 9 times: 2,048 values (cap 1,024) but a rank
    # the caps would allow without data propagation -- so only that is switched off.
    path = write(tmp_path, "over.onnx", ho.concat_doubling(9, "declared"))
    (desc,) = read_onnx(path)
    assert any("shape inference" in warning for warning in desc.warnings), desc.warnings
    assert desc.convs[0].output_spatial == (6, 6)


# ---------------------------------------------------------------------------------------------
# Numbers past sane limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "build", "fragments"),
    [
        (
            "rank-250",
            lambda: ho.weight_with_dims([1 << 62] * 250),
            ("value 'W' has 250 dims", "64 supported"),
        ),
        (
            "declared-overflow",
            lambda: ho.weight_with_dims([1 << 40, 1 << 40, 3, 3]),
            ("'W'", "overflows int64"),
        ),
        (
            "kernel-250",
            lambda: ho.conv_with_attributes(kernel_shape=[1 << 62] * 250),
            ("'kernel_shape' has 250 values",),
        ),
        (
            "kernel-overflow",
            lambda: ho.conv_with_attributes(kernel_shape=[1 << 40, 1 << 40]),
            ("kernel_shape has dims", "overflows int64"),
        ),
        ("pads-300", lambda: ho.conv_with_attributes(pads=[1] * 300), ("'pads' has 300 values",)),
    ],
)
def test_absurd_dims_and_attribute_lists_are_a_clean_error(
    tmp_path: Path, name: str, build: Callable[[], bytes], fragments: tuple[str, ...]
) -> None:
    path = write(tmp_path, f"{name}.onnx", build())
    assert_clean_error(run_cli(path), path, *fragments)


@pytest.mark.parametrize(
    ("name", "attributes"),
    [
        ("huge-pads", {"pads": [1 << 62] * 4}),
        ("huge-strides", {"strides": [(1 << 63) - 1] * 2}),
        ("huge-dilations", {"dilations": [1 << 62] * 2}),
        ("negative-strides", {"strides": [-(1 << 62)] * 2}),
        ("huge-group", {"group": (1 << 63) - 1}),
    ],
)
def test_huge_conv_attributes_give_a_report(tmp_path: Path, name: str, attributes: dict[str, Any]) -> None:
    path = write(tmp_path, f"{name}.onnx", ho.conv_with_attributes(**attributes))
    model = only_model(run_cli(path))
    (layer,) = model["layers"]
    assert layer["weight_shape"] == [4, 3, 3, 3]
    spatial = layer["output_spatial"]
    assert spatial is None or all(d is None or 0 <= d < 1 << 63 for d in spatial), spatial


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 1e300, -2.0, 0.0])
def test_non_finite_or_absurd_resize_scales_give_a_report(tmp_path: Path, scale: float) -> None:
    path = write(tmp_path, "resize.onnx", ho.resize_then_conv(scale))
    model = only_model(run_cli(path))
    (layer,) = model["layers"]
    assert layer["weight_shape"] == [4, 3, 3, 3]
    spatial = layer["output_spatial"]
    assert spatial is None or None in spatial, spatial  # no size can be given for that input


def test_finite_resize_scale_still_gives_the_size(tmp_path: Path) -> None:
    path = write(tmp_path, "resize.onnx", ho.resize_then_conv(2.0))
    (layer,) = only_model(run_cli(path))["layers"]
    assert layer["output_spatial"] == [14, 14]


# ---------------------------------------------------------------------------------------------
# Linear walks
# ---------------------------------------------------------------------------------------------


def _lines_run(path: Path) -> int:
    """Python lines of biasinspect run while reading ``path`` (generator expressions included): a
    deterministic cost measure."""
    package = str(ROOT / "biasinspect")
    count = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if not frame.f_code.co_filename.startswith(package):
            return None
        count += 1
        return tracer

    sys.settrace(tracer)
    try:
        read_onnx(path)
    finally:
        sys.settrace(None)
    return count


SMALL = 200
"""Convs in the smaller graph of the linearity tests (the larger has four times as many)."""


@pytest.mark.parametrize(("name", "build"), [("fan-in", ho.fan_in), ("chain", ho.conv_chain)])
def test_walks_are_linear(tmp_path: Path, name: str, build: Callable[[int], bytes]) -> None:
    small = _lines_run(write(tmp_path, "small.onnx", build(SMALL)))
    large = _lines_run(write(tmp_path, "large.onnx", build(4 * SMALL)))
    # Four times the nodes: about four times the lines (a per-conv scan of the Sum's inputs made
    # it grow with the square).
    assert large / small < 4.4, (small, large, large / small)


def test_fan_in_is_reported_without_bias(tmp_path: Path) -> None:
    (desc,) = read_onnx(write(tmp_path, "fan.onnx", ho.fan_in(50)))
    assert len(desc.convs) == 50
    assert all(conv.bias_terms == () and conv.followed_by is None for conv in desc.convs)
