"""Scale benchmark: a 1,000-file audit, serial vs --jobs, over HTTP, and on a Dask LocalCluster.

The files (by default 1,000: ONNX convs written with onnx.helper and safetensors state dicts,
a few KB each) are built in a temporary folder.  Printed figures, in models per second:

* local folder, whole CLI processes (``biasinspect DIR -f jsonl --jobs N``), serial (--jobs 1)
  vs each --jobs asked for, median of the rounds (alternating, so load drift hits all alike);
* the same files as ``http://127.0.0.1:PORT/...`` URLs served by a local ``http.server`` with
  Range support started here, read with --jobs threads.  This needs URL reading (issue 10's
  remote part); a build without it reports every URL as a bad path, and the benchmark says so
  instead of printing a figure;
* a Dask ``LocalCluster`` (2 worker processes, 1 thread each) running
  ``biasinspect.dask_adapter.inspect_on_cluster`` on the folder (cluster start-up timed apart).

Usage::

    python benchmarks/bench_scale.py [--files 1000] [--jobs 2] [--rounds 3] [--no-http] [--no-dask]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _measure import REPO_ROOT, child_env

sys.path.insert(0, str(REPO_ROOT))


def build_files(folder: Path, count: int) -> int:
    """``count`` small model files (3 ONNX for every safetensors); returns how many models."""
    import numpy as np
    from onnx import TensorProto, helper
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        channels = 4 + index % 29
        if index % 4 == 3:
            save_file(
                {
                    "features.0.weight": np.zeros((channels, 3, 3, 3), np.float32),
                    "features.0.bias": np.zeros((channels,), np.float32),
                    "features.2.weight": np.zeros((channels, channels, 3, 3), np.float32),
                },
                str(folder / f"model_{index:05d}.safetensors"),
            )
            continue
        weight = helper.make_tensor("w", TensorProto.FLOAT, [channels, 3, 3, 3], [0.0] * (channels * 27))
        bias = helper.make_tensor("b", TensorProto.FLOAT, [channels], [0.0] * channels)
        conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
        graph = helper.make_graph(
            [conv],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [weight, bias],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        (folder / f"model_{index:05d}.onnx").write_bytes(model.SerializeToString())
    return count


CPU_SECONDS: dict[str, list[float]] = {}
"""CPU time (user + system) of each labelled run, its worker processes included."""


def run_cli(arguments: list[str], expected_models: int, label: str = "") -> float:
    """Wall time of one whole CLI process; checks that it reported every model."""
    command = [sys.executable, "-m", "biasinspect", *arguments, "-f", "jsonl", "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, env=child_env(), check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    CPU_SECONDS.setdefault(label, []).append(cpu)
    summary = json.loads(result.stdout.splitlines()[-1]) if result.stdout else {}
    if summary.get("models") != expected_models:
        raise RuntimeError(
            f"expected {expected_models} models, got {summary} (exit {result.returncode}): "
            + result.stderr.decode(errors="replace")[:300]
        )
    return wall


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers ``Range: bytes=a-b`` with 206 (http.server does not)."""

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def send_head(self) -> Any:
        spec = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if spec is None or not spec.startswith("bytes=") or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        first_text, _, last_text = spec[len("bytes=") :].partition("-")
        if first_text:
            first = int(first_text)
            last = min(int(last_text), size - 1) if last_text else size - 1
        else:  # a suffix: the last N bytes
            first, last = max(0, size - int(last_text)), size - 1
        if first >= size or first > last:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return None
        handle = path.open("rb")
        handle.seek(first)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return _Limited(handle, last - first + 1)


class _Limited:
    """A file object that stops after ``remaining`` bytes (what copyfile sends for a range)."""

    def __init__(self, handle: Any, remaining: int) -> None:
        self.handle, self.remaining = handle, remaining

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        size = self.remaining if size < 0 else min(size, self.remaining)
        data: bytes = self.handle.read(size)
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        self.handle.close()


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``folder`` on 127.0.0.1 (a free port) in a background thread; returns the base URL."""

    def handler(*args: Any) -> RangeHandler:
        return RangeHandler(*args, directory=str(folder))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def bench_local(folder: Path, models: int, jobs: list[int], rounds: int) -> dict[int, float]:
    walls: dict[int, list[float]] = {count: [] for count in [1, *jobs]}
    for _ in range(rounds):
        for count in walls:
            walls[count].append(run_cli([str(folder), "--jobs", str(count)], models, f"local {count}"))
    medians = {count: statistics.median(values) for count, values in walls.items()}
    print(f"\nlocal folder, {models:,} files, whole CLI process (median of {rounds}):")
    for count, wall in medians.items():
        speedup = medians[1] / wall
        cpu = statistics.median(CPU_SECONDS[f"local {count}"])
        print(
            f"  --jobs {count}: {wall:6.2f} s  {models / wall:8.1f} models/s  ({speedup:.2f}x serial)"
            f"  CPU {cpu:.2f} s (workers included)"
        )
    return medians


def bench_http(folder: Path, models: int, jobs: list[int], rounds: int) -> None:
    server, base = serve(folder)
    try:
        urls = [f"{base}/{path.name}" for path in sorted(folder.iterdir())]
        url_list = folder.parent / "urls.txt"
        url_list.write_text("\n".join(urls))
        print(f"\nHTTP (local http.server with Range support, {len(urls):,} URLs):")
        for count in [1, *jobs]:
            try:
                walls = [run_cli([*urls, "--jobs", str(count)], models) for _ in range(rounds)]
            except RuntimeError as error:
                print(f"  URL reading is not available in this build, no figure: {str(error)[:200]}")
                return
            wall = statistics.median(walls)
            print(f"  --jobs {count}: {wall:6.2f} s  {models / wall:8.1f} models/s")
    finally:
        server.shutdown()


def bench_dask(folder: Path, models: int, rounds: int) -> None:
    from distributed import Client, LocalCluster

    from biasinspect.dask_adapter import inspect_on_cluster

    os.environ["PYTHONPATH"] = str(REPO_ROOT)
    start = time.perf_counter()
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
        ) as cluster,
        Client(cluster) as client,
    ):
        startup = time.perf_counter() - start
        walls = []
        for _ in range(rounds):
            start = time.perf_counter()
            report = inspect_on_cluster(folder, client)
            walls.append(time.perf_counter() - start)
            if len(report.models) != models:
                raise RuntimeError(f"expected {models} models, got {len(report.models)}")
    wall = statistics.median(walls)
    print(f"\nDask LocalCluster (2 worker processes x 1 thread), inspect_on_cluster (median of {rounds}):")
    print(f"  cluster start-up {startup:.2f} s (not counted); {wall:6.2f} s  {models / wall:8.1f} models/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--jobs", type=int, action="append", help="--jobs values to compare with 1 (2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--no-dask", action="store_true")
    args = parser.parse_args()
    jobs = args.jobs or [2]
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as workdir:
        folder = Path(workdir) / "models"
        models = build_files(folder, args.files)
        bench_local(folder, models, jobs, args.rounds)
        if not args.no_http:
            bench_http(folder, models, jobs, args.rounds)
        if not args.no_dask:
            bench_dask(folder, models, args.rounds)


if __name__ == "__main__":
    main()
