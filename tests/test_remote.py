"""URLs wherever a path is accepted: every reader over HTTP range requests and S3, on real servers
on 127.0.0.1 (tests/remote_servers.py), with the servers' own request and byte accounting."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from remote_servers import WebServer, s3_server, web_server
from safetensors.torch import save_file
from torch import nn

from biasinspect import limits
from biasinspect.cli import main
from biasinspect.remote import BLOCK_SIZE, MAX_UNRANGED_BYTES, redact

REPO = Path(__file__).resolve().parent.parent


class WideNet(nn.Module):
    """Convs with megabytes of weights, so that reading everything would show in the byte counts."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 256, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 384, 3, padding=1, bias=False),
            nn.BatchNorm2d(384),
            nn.ReLU(),
            nn.Conv2d(384, 384, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(384, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _onnx_model() -> onnx.ModelProto:
    """The same conv stack as an ONNX graph with zero weights (about 9 MB of raw_data)."""
    widths = [(3, 64), (64, 256), (256, 384), (384, 384)]
    nodes, inits = [], []
    current = "x"
    for index, (cin, cout) in enumerate(widths):
        weight, bias, out = f"w{index}", f"b{index}", f"y{index}"
        inits.append(numpy_helper.from_array(np.zeros((cout, cin, 3, 3), np.float32), weight))
        inits.append(numpy_helper.from_array(np.zeros((cout,), np.float32), bias))
        nodes.append(
            helper.make_node("Conv", [current, weight, bias], [out], pads=[1, 1, 1, 1], name=f"conv{index}")
        )
        relu = f"r{index}"
        nodes.append(helper.make_node("Relu", [out], [relu]))
        current = relu
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder with the same model in every layout a reader handles."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    model = WideNet().eval()
    state = model.state_dict()
    onnx.save(_onnx_model(), str(root / "inline.onnx"))
    external = root / "external"
    external.mkdir()
    onnx.save(
        _onnx_model(),
        str(external / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    torch.save(state, root / "zip.pt")
    torch.save(state, root / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(model, root / "module.pt")
    with open(root / "state.pkl", "wb") as handle:
        pickle.dump(state, handle)
    torch.jit.script(model).save(str(root / "scripted.pt"))
    exported = torch.export.export(model, (torch.zeros(1, 3, 8, 8),))
    torch.export.save(exported, str(root / "exported.pt2"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "model.safetensors"))
    sharded = root / "sharded"
    sharded.mkdir()
    names = list(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: state[k].contiguous() for k in keys}, str(sharded / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return root


@pytest.fixture(scope="module")
def web(models: Path) -> Iterator[WebServer]:
    with web_server(models) as server:
        yield server


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _without_paths(document: Any) -> Any:
    """The JSON report with path fields dropped (a URL and a local path name the same file)."""
    if isinstance(document, dict):
        return {
            key: _without_paths(value)
            for key, value in document.items()
            if key not in ("path", "companion_files")
        }
    if isinstance(document, list):
        return [_without_paths(item) for item in document]
    return document


# (file under the served folder, most requests, most bytes fetched as a fraction of the ~9.5 MB
# file).  Measured: 4 requests / 2.2% (inline ONNX), 4 / 3.1-3.4% (the zips), 1 / 0.7% (legacy,
# safetensors), 3 requests for the index and its two shards.
CASES = [
    ("inline.onnx", 6, 0.03),
    ("external/model.onnx", 1, 1.0),  # the graph alone is under 1 KB: one request holds it
    ("zip.pt", 6, 0.04),
    ("legacy.pt", 2, 0.01),
    ("module.pt", 6, 0.04),
    ("scripted.pt", 6, 0.04),
    ("exported.pt2", 6, 0.04),
    ("model.safetensors", 1, 0.01),
    ("sharded/model.safetensors.index.json", 3, 0.02),
    # A plain pickle carries its tensors' bytes inside the pickle stream, which is read whole
    # (measured: 7 requests), as it is locally.
    ("state.pkl", 8, 1.0),
]


@pytest.mark.parametrize(("name", "max_requests", "max_fraction"), CASES, ids=[case[0] for case in CASES])
def test_url_report_equals_local_report_within_budget(
    models: Path, web: WebServer, name: str, max_requests: int, max_fraction: float
) -> None:
    local_code, local_out, local_err = _run(str(models / name), "--format", "json")
    assert (local_code, local_err) == (0, "")
    web.reset()
    code, out, err = _run(web.url(name), "--format", "json")
    assert (code, err) == (0, "")
    remote = json.loads(out)
    assert remote["models"][0]["path"] == web.url(name)
    assert _without_paths(remote) == _without_paths(json.loads(local_out))
    assert remote["models"][0]["layers"], "the report has conv layers"
    size = (models / name).stat().st_size
    if name.startswith("sharded/"):
        size = sum(path.stat().st_size for path in (models / "sharded").iterdir())
    assert web.log.requests <= max_requests, web.log.paths
    assert web.log.body_bytes <= max_fraction * size or name == "external/model.onnx"
    if name == "model.safetensors":
        assert web.log.requests == 1 and web.log.body_bytes == BLOCK_SIZE
    if name.endswith(".index.json"):
        assert web.log.paths == [
            f"GET /files/sharded/{file}"
            for file in (
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            )
        ]
    if name == "external/model.onnx":
        assert not any("weights.bin" in path for path in web.log.paths)


def test_remote_onnx_never_fetches_raw_data_ranges(models: Path, web: WebServer) -> None:
    """Only blocks around tensor headers are fetched: far fewer bytes than one conv's weights."""
    web.reset()
    assert _run(web.url("inline.onnx"))[0] == 0
    biggest = 384 * 384 * 9 * 4
    assert web.log.body_bytes < biggest / 4
    assert web.log.body_bytes < 0.06 * (models / "inline.onnx").stat().st_size


def test_redirect_is_followed_like_a_hub_resolve_url(models: Path, web: WebServer) -> None:
    direct = json.loads(_run(web.url("model.safetensors"), "-f", "json")[1])
    web.reset()
    code, out, err = _run(web.url("model.safetensors", "redirect"), "-f", "json")
    assert (code, err) == (0, "")
    assert _without_paths(json.loads(out)) == _without_paths(direct)
    assert web.log.paths == ["GET /redirect/model.safetensors", "GET /files/model.safetensors"]
    # Later ranges go straight to the redirect's target.
    web.reset()
    assert _run(web.url("zip.pt", "redirect"))[0] == 0
    assert web.log.paths[:2] == ["GET /redirect/zip.pt", "GET /files/zip.pt"]
    assert all(path == "GET /files/zip.pt" for path in web.log.paths[1:])


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (403, "access denied (HTTP 403)"),
        (404, "not found (HTTP 404)"),
        (500, "server error (HTTP 500 Internal Server Error)"),
        (503, "server error (HTTP 503 Service Unavailable)"),
    ],
)
def test_http_errors_are_one_line(web: WebServer, code: int, message: str) -> None:
    url = web.url("model.safetensors", f"status/{code}")
    assert _run(url) == (2, "", f"biasinspect: {url}: {message}\n")


def test_connection_refused_is_one_line() -> None:
    with socket.socket() as probe:  # a port that was just free: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.onnx"
    assert _run(url) == (2, "", f"biasinspect: {url}: cannot connect: connection refused\n")


def test_server_ignoring_range_is_refused_without_downloading_the_file(models: Path, web: WebServer) -> None:
    big = models / "big_norange.safetensors"
    shutil.copyfile(models / "model.safetensors", big)
    with open(big, "ab") as handle:  # past the cap; the header's lengths no longer matter
        handle.truncate(MAX_UNRANGED_BYTES + 1024 * 1024)
    size = big.stat().st_size
    web.reset()
    url = web.url(big.name, "norange")
    code, out, err = _run(url)
    assert (code, out) == (2, "")
    assert err == (
        f"biasinspect: {url}: the server ignores HTTP Range requests (it sends the whole file); biasinspect "
        f"reads only parts of a file and will not download this {size:,}-byte file (the limit is 16 MiB)\n"
    )
    assert web.log.requests == 1
    assert web.log.body_bytes < size // 2  # the client hung up; socket buffers took the rest
    big.unlink()


def test_server_ignoring_range_serves_a_small_file_whole(models: Path, web: WebServer) -> None:
    web.reset()
    code, _out, err = _run(web.url("sharded/model-00001-of-00002.safetensors", "norange"), "-f", "json")
    assert (code, err) == (0, "")
    assert web.log.requests == 1
    assert web.log.body_bytes == (models / "sharded/model-00001-of-00002.safetensors").stat().st_size


def test_fetched_bytes_are_capped(web: WebServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_FETCHED_BYTES", 3 * BLOCK_SIZE)
    web.reset()
    url = web.url("zip.pt")
    assert _run(url) == (
        2,
        "",
        f"biasinspect: {url}: reading this file would fetch more than {3 * BLOCK_SIZE:,} bytes"
        " (the limit for one remote file)\n",
    )
    assert web.log.body_bytes <= 3 * BLOCK_SIZE


def test_timeout_option(web: WebServer) -> None:
    web.set_slow(3.0)
    url = web.url("model.safetensors", "slow")
    assert _run(url, "--timeout", "0.3") == (
        2,
        "",
        f"biasinspect: {url}: timed out after 0.3 s (raise it with --timeout)\n",
    )
    code, _out, err = _run("--timeout", "-1", url)
    assert code == 2 and "timeout must be a positive number of seconds" in err


def test_credentials_never_appear_in_output(web: WebServer) -> None:
    secret = "s3cr3tVALUE"
    good = web.url("model.safetensors").replace("http://", f"http://user:{secret}@")
    good += f"?X-Amz-Signature={secret}&X-Amz-Credential={secret}&sig={secret}&token={secret}&plain=1"
    bad = web.url("nothing.safetensors").replace("http://", f"http://user:{secret}@") + f"?token={secret}"
    missing_folder = web.url("sharded/model.safetensors.index.json").replace("http://", f"http://u:{secret}@")
    for output in ("table", "json", "csv", "markdown"):
        code, out, err = _run(good, bad, missing_folder, "-f", output)
        assert code == 2
        assert secret not in out + err
        assert "//user" not in out + err and "//u:" not in out + err and "//***@" in out + err
    assert redact(good).endswith("?X-Amz-Signature=***&X-Amz-Credential=***&sig=***&token=***&plain=1")


def test_unknown_scheme_and_missing_extra_are_one_line(tmp_path: Path) -> None:
    assert _run("nosuchproto://bucket/model.onnx") == (
        2,
        "",
        "biasinspect: nosuchproto://bucket/model.onnx: unknown URL scheme 'nosuchproto'\n",
    )
    script = (
        "import sys; sys.modules['fsspec'] = None\n"  # as if the extra were not installed
        "from biasinspect.cli import main; sys.exit(main(['s3://bucket/model.safetensors']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "biasinspect: s3://bucket/model.safetensors: reading s3:// URLs needs the remote extra:"
        " pip install 'biasinspect[remote]'\n"
    )


@pytest.fixture(scope="module")
def s3_bucket(models: Path) -> Iterator[str]:
    """moto's S3 server with every model under s3://models/zoo/."""
    import boto3

    with s3_server() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="models")
        for path in sorted(models.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), "models", f"zoo/{path.relative_to(models).as_posix()}")
        client.put_object(Bucket="models", Key="zoo/notes.txt", Body=b"not a model")
        yield "s3://models/zoo"


def test_s3_object_equals_local(models: Path, s3_bucket: str) -> None:
    for name in ("model.safetensors", "inline.onnx", "zip.pt", "sharded/model.safetensors.index.json"):
        local = json.loads(_run(str(models / name), "-f", "json")[1])
        code, out, err = _run(f"{s3_bucket}/{name}", "-f", "json")
        assert (code, err) == (0, "")
        assert json.loads(out)["models"][0]["path"] == f"{s3_bucket}/{name}"
        assert _without_paths(json.loads(out)) == _without_paths(local)


def test_s3_prefix_scan_reports_every_model(models: Path, s3_bucket: str) -> None:
    code, out, err = _run(s3_bucket + "/", "-f", "json")
    assert (code, err) == (0, "")
    paths = [model["path"] for model in json.loads(out)["models"]]
    expected = [
        "exported.pt2", "external/model.onnx", "inline.onnx", "legacy.pt", "model.safetensors",
        "module.pt", "scripted.pt", "sharded/model.safetensors.index.json", "state.pkl", "zip.pt",
    ]  # fmt: skip
    # The shard index stands for its shards; weights.bin is the ONNX model's external data.
    assert sorted(set(paths)) == [f"{s3_bucket}/{name}" for name in expected]
    local = json.loads(_run(str(models), "-f", "json")[1])
    assert sorted(model["path"].removeprefix(str(models) + "/") for model in local["models"]) == sorted(
        path.removeprefix(s3_bucket + "/") for path in paths
    )


def test_s3_missing_object_is_one_line(s3_bucket: str) -> None:
    url = f"{s3_bucket}/missing.safetensors"
    assert _run(url) == (2, "", f"biasinspect: {url}: not found\n")


def test_urls_read_in_threads_by_a_fresh_process(web: WebServer) -> None:
    """``--jobs`` reads URLs in threads: the first (light) onnx import must happen once, not half
    way in two threads (it used to give 'internal error ... no attribute onnx_ml_pb2').  A fresh
    process, since this one imported onnx long ago."""
    import subprocess
    import sys

    urls = [f"{web.url('inline.onnx')}?copy={index}" for index in range(12)]
    result = subprocess.run(
        [sys.executable, "-m", "biasinspect", *urls, "--jobs", "4", "-f", "jsonl", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.count('"type": "model"') == 12
