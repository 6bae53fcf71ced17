"""The HTML report, rendered by a real headless Chromium (Debian's package; .ci/run installs it)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
from onnx import helper
from PIL import Image

from biasinspect.cli import main
from biasinspect.model import BiasKind
from biasinspect.render_html import KIND_COLOURS, WEIGHT_COLOUR

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--force-device-scale-factor=1",
]  # fmt: skip


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _chain(path: Path, kinds: list[str]) -> None:
    """A chain of 4->4 3x3 convs (padding 1 on 8x8): 'tied' has a bias input, 'untied' a
    following Add of a [4, 8, 8] initializer, 'absent' neither."""
    nodes, inits, previous = [], [], "x"
    for index, kind in enumerate(kinds):
        inits.append(helper.make_tensor(f"w{index}", onnx.TensorProto.FLOAT, [4, 4, 3, 3], [0.0] * 144))
        inputs = [previous, f"w{index}"]
        if kind == "tied":
            inits.append(helper.make_tensor(f"b{index}", onnx.TensorProto.FLOAT, [4], [0.0] * 4))
            inputs.append(f"b{index}")
        nodes.append(
            helper.make_node("Conv", inputs, [f"c{index}"], name=f"layer{index:03d}", pads=[1, 1, 1, 1])
        )
        previous = f"c{index}"
        if kind == "untied":
            inits.append(helper.make_tensor(f"u{index}", onnx.TensorProto.FLOAT, [4, 8, 8], [0.0] * 256))
            nodes.append(helper.make_node("Add", [previous, f"u{index}"], [f"a{index}"]))
            previous = f"a{index}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info(previous, onnx.TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _browser(page: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [CHROMIUM, *_FLAGS, f"--user-data-dir={page.parent / 'profile'}", *extra, page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip


def _bands(image: Image.Image, colour: str) -> int:
    """How many separate horizontal bands of rows hold at least 3 pixels of exactly ``colour``."""
    target = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    rgb = image.convert("RGB")
    width, height = rgb.size
    pixels = rgb.load()
    bands, inside = 0, False
    for y in range(height):
        hit = sum(1 for x in range(0, width) if pixels[x, y] == target) >= 3
        if hit and not inside:
            bands += 1
        inside = hit
    return bands


def test_a_220_layer_report_draws_every_bar_in_its_kind_colour(tmp_path):
    kinds = (["tied"] * 2 + ["untied"] + ["absent"]) * 55
    model = tmp_path / "chain.onnx"
    _chain(model, kinds)
    page = tmp_path / "report.html"
    code, out, err = run(str(model), "--format", "html", "--output", str(page))
    assert (code, out, err) == (0, "", "")
    html = page.read_text()
    assert not re.search(r"(src|href)\s*=\s*[\"'](https?:)?//", html)  # nothing fetched
    assert "220 conv layers: 110 tied (one bias per output channel), 55 untied" in html

    # What Chromium builds from the page: one chart row per layer, with the kind recorded.
    dom = _browser(page, "--dump-dom").stdout.decode()
    assert dom.count('<g class="layer"') == 220
    assert dom.count('data-kind="untied"') == 55 and dom.count('data-kind="absent"') == 55

    # What Chromium draws: one bar (band of rows) per layer in the kind's colour, plus the legend.
    shot = tmp_path / "report.png"
    _browser(page, "--window-size=1200,3600", f"--screenshot={shot}")
    image = Image.open(shot)
    assert _bands(image, KIND_COLOURS[BiasKind.TIED]) == 110 + 1
    assert _bands(image, KIND_COLOURS[BiasKind.UNTIED]) == 55 + 1
    assert _bands(image, KIND_COLOURS[BiasKind.ABSENT]) == 55 + 1
    assert _bands(image, KIND_COLOURS[BiasKind.OTHER]) == 1  # the legend only
    assert _bands(image, WEIGHT_COLOUR) == 220 + 1


def test_names_from_files_are_escaped(tmp_path):
    model = tmp_path / "evil.onnx"
    _chain(model, ["tied"])
    proto = onnx.load(str(model))
    proto.graph.node[0].name = "<script>alert(1)</script>"
    onnx.save(proto, str(model))
    code, out, _err = run(str(model), "--format", "html")
    assert code == 0
    assert "<script>" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out


def test_diff_html_in_the_browser(tmp_path):
    page = tmp_path / "diff.html"
    code, _out, err = run(
        "diff",
        str(SAMPLES / "seed_untied.onnx"),
        str(SAMPLES / "seed_tied.onnx"),
        "-f",
        "html",
        "-o",
        str(page),
    )
    assert (code, err) == (0, "")
    dom = _browser(page, "--dump-dom").stdout.decode()
    assert "1 matched, 1 changed (0 folded norms), 0 only in source, 0 only in export" in dom
    assert dom.count('<tr class="changed">') == 1
    assert "untied [32, 28, 28] -&gt; tied [32]" in dom


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv", "json", "html"])
def test_output_option_writes_any_format(tmp_path, fmt):
    target = tmp_path / f"report.{fmt}"
    code, out, err = run(str(SAMPLES / "seed_untied.onnx"), "--format", fmt, "--output", str(target))
    assert (code, out, err) == (0, "", "")
    _code, direct, _err = run(str(SAMPLES / "seed_untied.onnx"), "--format", fmt)
    assert target.read_text() == direct
    if fmt == "json":
        assert json.loads(direct)["models"][0]["totals"]["untied"] == 1
