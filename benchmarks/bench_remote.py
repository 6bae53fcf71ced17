"""Bytes fetched and requests made over HTTP for the VGG19 benchmark model (~575 MB) in each format.

The four files of bench_onnx.py and bench_torch.py (inline ONNX, ONNX with external data, a
``torch.save`` zip, safetensors) are served by the tests' web server on 127.0.0.1 (Range
support, its own accounting of requests and body bytes sent), and ``biasinspect URL`` runs
against each.  Goals (PASS/FAIL lines): at most 1% of the model's bytes and at most 100 requests
per model; safetensors in at most 2 requests.  Also printed: the same counts through the
``/redirect/`` route, where every URL first answers 302 (as a hub's "resolve" URL does).

Usage::

    python benchmarks/bench_remote.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import REPO_ROOT, check_vgg19_report, child_env, verdict
from bench_onnx import write_vgg19

sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT))

from remote_servers import web_server

from biasinspect.cli import main as biasinspect_main

BYTES_GOAL = 0.01
REQUESTS_GOAL = 100
SAFETENSORS_REQUESTS_GOAL = 2


def _generate(workdir: Path) -> dict[str, tuple[str, int]]:
    """Write the four files; return {label: (file served, model bytes incl. external data)}."""
    onnx_dir = workdir / "onnx_external"
    onnx_dir.mkdir(exist_ok=True)
    inline = write_vgg19(workdir / "vgg19.onnx", external=False)
    external = write_vgg19(onnx_dir / "vgg19.onnx", external=True)
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_torch.py"), "--generate-into", str(workdir)],
        check=True,
        env=child_env(),
    )
    return {
        "ONNX, inline weights": ("vgg19.onnx", inline),
        "ONNX, external data": ("onnx_external/vgg19.onnx", external),
        ".pt (torch.save zip)": ("vgg19.pt", (workdir / "vgg19.pt").stat().st_size),
        "safetensors": ("vgg19.safetensors", (workdir / "vgg19.safetensors").stat().st_size),
    }


def main(argv: list[str] | None = None) -> int:
    """Generate, serve, measure; print the table and PASS/FAIL lines; 1 on any FAIL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="biasinspect-bench-remote-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        files = _generate(workdir)
        rows = []
        with web_server(workdir) as web:
            for label, (name, size) in files.items():
                for mode in ("files", "redirect"):
                    web.reset()
                    out, err = io.StringIO(), io.StringIO()
                    start = time.perf_counter()
                    code = biasinspect_main([web.url(name, mode), "--format", "json"], stdout=out, stderr=err)
                    wall = time.perf_counter() - start
                    if code != 0:
                        raise RuntimeError(f"{label}: exit {code}: {err.getvalue()}")
                    check_vgg19_report(out.getvalue().encode())
                    rows.append((label, mode, size, web.log.requests, web.log.body_bytes, wall))
        print(
            f"{'format':24} {'route':9} {'model bytes':>13} {'requests':>9} {'bytes fetched':>14} {'share':>8} {'time':>7}"
        )
        for label, mode, size, requests, fetched, wall in rows:
            print(
                f"{label:24} {mode:9} {size:>13,} {requests:>9} {fetched:>14,} {fetched / size:>8.3%} {wall:>6.2f}s"
            )
        print()
        for label, mode, size, requests, fetched, _wall in rows:
            if mode != "files":
                continue
            ok &= _print(
                verdict(fetched <= BYTES_GOAL * size, f"{label}: {fetched:,} bytes <= 1% of {size:,}")
            )
            goal = SAFETENSORS_REQUESTS_GOAL if label == "safetensors" else REQUESTS_GOAL
            ok &= _print(verdict(requests <= goal, f"{label}: {requests} requests <= {goal}"))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def _print(line: str) -> bool:
    print(line)
    return line.startswith("PASS")


if __name__ == "__main__":
    sys.exit(main())
