"""Shared measuring code for the benchmark scripts (not a benchmark itself).

Each measured command runs under a fresh, tiny wrapper process that starts the command,
times it, and reports ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` -- so the peak RSS is that
one run's own, never inherited from the (possibly large) benchmark process that forked it.
Commands run in alternation (A, B, A, B, ...) so that drifting machine load hits all alike.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The biasinspect checkout these scripts belong to; put first on the children's PYTHONPATH."""

MIB = 1024 * 1024

_WRAPPER = r"""
import json, resource, subprocess, sys, time
out_path, cmd = sys.argv[1], sys.argv[2:]
with open(out_path, "wb") as out:
    start = time.perf_counter()
    code = subprocess.call(cmd, stdout=out)
    wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": wall, "maxrss_kib": usage.ru_maxrss, "returncode": code}))
"""


@dataclass
class Run:
    """One timed execution of a command."""

    wall_s: float
    peak_rss_bytes: int
    stdout: bytes


@dataclass
class Series:
    """All runs of one labelled command."""

    label: str
    command: list[str]
    runs: list[Run] = field(default_factory=list)

    @property
    def median_wall(self) -> float:
        """Median wall time in seconds."""
        return statistics.median(run.wall_s for run in self.runs)

    @property
    def min_wall(self) -> float:
        """Fastest run in seconds."""
        return min(run.wall_s for run in self.runs)

    @property
    def max_rss(self) -> int:
        """Largest per-run peak RSS in bytes (the conservative figure goals are checked against)."""
        return max(run.peak_rss_bytes for run in self.runs)

    @property
    def median_rss(self) -> float:
        """Median per-run peak RSS in bytes."""
        return statistics.median(run.peak_rss_bytes for run in self.runs)


def child_env() -> dict[str, str]:
    """Environment for measured children: this checkout importable (first on PYTHONPATH)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_once(command: Sequence[str]) -> Run:
    """Run ``command`` under the wrapper; raise RuntimeError if it fails."""
    with tempfile.NamedTemporaryFile(prefix="bench-out-", delete=False) as handle:
        out_path = handle.name
    try:
        wrapper = subprocess.run(
            [sys.executable, "-c", _WRAPPER, out_path, *command],
            capture_output=True,
            env=child_env(),
            cwd=REPO_ROOT,
            check=False,
        )
        stdout = Path(out_path).read_bytes()
    finally:
        os.unlink(out_path)
    if wrapper.returncode != 0:
        raise RuntimeError(f"wrapper failed for {command}: {wrapper.stderr.decode(errors='replace')}")
    figures = json.loads(wrapper.stdout.decode().strip().splitlines()[-1])
    if figures["returncode"] != 0:
        raise RuntimeError(
            f"command exited {figures['returncode']}: {' '.join(command)}\n"
            f"{wrapper.stderr.decode(errors='replace')[-2000:]}"
        )
    return Run(wall_s=figures["wall"], peak_rss_bytes=figures["maxrss_kib"] * 1024, stdout=stdout)


def alternate(series: Sequence[Series], rounds: int, warmup: int = 1, verbose: bool = True) -> None:
    """Run every series ``warmup`` times untimed, then ``rounds`` times in alternation."""
    for _ in range(warmup):
        for item in series:
            run_once(item.command)  # fills the page cache and .pyc caches; not recorded
    for round_number in range(1, rounds + 1):
        for item in series:
            run = run_once(item.command)
            item.runs.append(run)
            if verbose:
                print(
                    f"  round {round_number}/{rounds}  {item.label:<44} "
                    f"{run.wall_s:7.3f} s  {run.peak_rss_bytes / MIB:8.1f} MiB",
                    flush=True,
                )


def print_table(series: Sequence[Series]) -> None:
    """A compact table: median/min wall time and peak RSS per labelled command."""
    width = max(len(item.label) for item in series)
    print(
        f"{'command':<{width}}  {'median s':>9}  {'min s':>7}  {'max RSS MiB':>11}  {'med RSS MiB':>11}  runs"
    )
    for item in series:
        print(
            f"{item.label:<{width}}  {item.median_wall:9.3f}  {item.min_wall:7.3f}  "
            f"{item.max_rss / MIB:11.1f}  {item.median_rss / MIB:11.1f}  {len(item.runs):4d}"
        )


def check_vgg19_report(stdout: bytes) -> None:
    """biasinspect's JSON must describe VGG19's 16 tied convs: timing an error path would mislead."""
    report = json.loads(stdout)
    (model,) = report["models"]
    kinds = [layer["bias"]["kind"] for layer in model["layers"]]
    if kinds != ["tied"] * 16:
        raise RuntimeError(f"unexpected biasinspect result for VGG19: {kinds}")


def verdict(ok: bool, text: str) -> str:
    """One PASS/FAIL line."""
    return f"{'PASS' if ok else 'FAIL'}  {text}"


def print_loader_verdicts(
    what: str, ours: Series, loader: Series, loader_name: str, wall_ratio_goal: float, rss_goal_bytes: int
) -> bool:
    """Print the two goal lines of biasinspect against a framework's loader (speed-up and peak
    RSS); True when both pass."""
    ratio = loader.median_wall / ours.median_wall
    checks = (
        (
            ratio >= wall_ratio_goal,
            f"{what}: biasinspect {ours.median_wall:.3f} s vs {loader_name} {loader.median_wall:.3f} s "
            f"= {ratio:.1f}x faster (goal >= {wall_ratio_goal:.0f}x)",
        ),
        (
            ours.max_rss <= rss_goal_bytes,
            f"{what}: biasinspect peak RSS {ours.max_rss / MIB:.1f} MiB (goal <= {rss_goal_bytes / MIB:.0f} MiB; "
            f"loader {loader.max_rss / MIB:.1f} MiB)",
        ),
    )
    for ok, text in checks:
        print(verdict(ok, text))
    return all(ok for ok, _text in checks)


_ZEROS = bytes(8 * MIB)


def write_zeros(handle: BinaryIO, count: int) -> None:
    """Write ``count`` zero bytes to a binary file in bounded chunks (memory stays at 8 MiB)."""
    while count > 0:
        piece = min(count, len(_ZEROS))
        handle.write(_ZEROS if piece == len(_ZEROS) else _ZEROS[:piece])
        count -= piece
