"""Long fuzz campaign: many mutated ONNX / torch-zip / legacy-pickle / safetensors / NumPy /
OpenVINO / CoreML files, pickled module trees (deep nesting, wide), archive differentials (two
end records, zip storage blobs, legacy tar, computed magic numbers), and generated folder trees
(symbolic links in and out of the folder; control characters in names).

The short, derandomized version of this runs in the test suite (tests/test_fuzz.py); this script
runs the same mutations (tests/hostile_files.py) at scale, in worker processes supervised by this
one, and classifies every case:

* ``ok``          -- ``biasinspect.api.read_file`` returned descriptions and analysis accepted them;
* ``clean-error`` -- a BiasInspectError (the contract for bad input);
* ``safety-net``  -- a BiasInspectError that api.read_file made out of a RecursionError or
  MemoryError: the user still sees one clean line, but a reader went deeper or bigger than it
  should (workers run under a 4 GiB address-space limit so that runaway memory shows up here);
* ``CRASH``       -- any other exception (a bug);
* ``HANG``        -- no answer within ``--timeout`` seconds (the worker is killed and replaced).

Tree kinds (``link-tree``, ``control-tree``, from tests/tree_cases.py) build a folder and run
the whole CLI on it in every output format; a case is ``ok`` when every promise holds (nothing
outside the folder read or printed, printable one-line errors, a matching exit code), else
``CRASH`` with the broken promise.  They run ``--tree-cases`` cases each (trees are slower).

The first few CRASH/HANG inputs per format are saved to ``--save`` for reproduction.  The exit
status is 1 when any case crashed or hung, else 0.  Cases are reproducible: case ``i`` of format
``f`` with seed ``s`` always gets the same mutations.

Usage (from the repository root; needs the test extra -- torch builds the seeds)::

    python benchmarks/fuzz_long.py --cases 10000            # per format, 2 worker processes
    python benchmarks/fuzz_long.py --cases 0 --generated-cases 2000   # generated ONNX graphs only
    python benchmarks/fuzz_long.py --cases 500 --formats onnx safetensors --jobs 1 --seed 7
    python benchmarks/fuzz_long.py --formats link-tree control-tree --tree-cases 5000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import connection
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import hostile_files as hf  # noqa: E402  (needs the sys.path entries above)
import tree_cases  # noqa: E402

TREE_KINDS = {"link-tree": tree_cases.build_link_tree, "control-tree": tree_cases.build_control_tree}
"""Generated folder trees, run through the whole CLI (not byte mutations)."""
import hostile_onnx as ho  # noqa: E402

FORMATS: dict[str, str] = {**hf.FUZZ_FORMATS, **dict.fromkeys(ho.STRUCTURED, ".onnx")}
"""Every fuzzed kind and its file suffix: mutated seeds (hostile_files) and generated ONNX graphs
(hostile_onnx: function bombs, data-propagation growth, fan-ins and long chains)."""

CATEGORIES = ("ok", "clean-error", "safety-net", "CRASH", "HANG")
WORKER_ADDRESS_SPACE = 4 * 1024**3
"""RLIMIT_AS of each worker: a reader that tries to allocate gigabytes fails visibly."""
SAVE_PER_FORMAT = 5
"""How many CRASH/HANG inputs are saved per format."""


def case_bytes(fmt: str, index: int, seed: int) -> bytes:
    """The file of case ``index`` of format ``fmt`` (deterministic)."""
    rng = random.Random(f"{seed}:{fmt}:{index}")
    if fmt in ho.STRUCTURED:
        return ho.STRUCTURED[fmt](rng)
    seeds = hf.fuzz_seeds(fmt)
    base = seeds[rng.randrange(len(seeds))]
    mutated = hf.apply_mutations(base, hf.random_mutations(rng), hf.all_fuzz_donors())
    return hf.finish_fuzz_case(fmt, mutated)


def classify(path: Path) -> tuple[str, str]:
    """Inspect one file; return (category, detail)."""
    from biasinspect.analysis import analyze
    from biasinspect.api import read_file
    from biasinspect.errors import BiasInspectError

    try:
        descriptions = read_file(path)
        for description in descriptions:
            analyze(description)
    except BiasInspectError as error:
        if isinstance(error.__cause__, RecursionError | MemoryError):
            return "safety-net", f"{type(error.__cause__).__name__}: {error}"
        return "clean-error", type(error).__name__
    except Exception as error:
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        return "CRASH", f"{type(error).__name__} at {where}: {str(error)[:200]}"
    return "ok", ""


def classify_tree(kind: str, index: int, seed: int, folder: Path) -> tuple[str, str]:
    """Build tree ``index`` of ``kind`` under ``folder``, run the CLI on it; (category, detail)."""
    base = folder / f"{kind}-{index}"
    base.mkdir()
    try:
        tree = TREE_KINDS[kind](base, random.Random(f"{seed}:{kind}:{index}"))
        problems = tree_cases.cli_violations(tree)
    except Exception as error:
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        return "CRASH", f"{type(error).__name__} at {where}: {str(error)[:200]}"
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return ("CRASH", "; ".join(problems)[:500]) if problems else ("ok", "")


def _worker(tasks: list[tuple[str, int]], seed: int, results: Any, workdir: str, timeout: float) -> None:
    # Report "start" before each case so the supervisor knows which one hung.  Each worker has its
    # own pipe: killing a hung worker must not corrupt a channel the others share.
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_ADDRESS_SPACE, WORKER_ADDRESS_SPACE))
    from biasinspect.readers import h5_isolated

    # libhdf5 loops forever on some mutants: its own timeout must end those cases before the
    # supervisor's does (then they are clean errors, as for a user).
    h5_isolated.H5_TIMEOUT_SECONDS = min(h5_isolated.H5_TIMEOUT_SECONDS, timeout / 3)
    folder = Path(tempfile.mkdtemp(dir=workdir))
    for fmt, index in tasks:
        results.send(("start", fmt, index, "", ""))
        if fmt in TREE_KINDS:
            category, detail = classify_tree(fmt, index, seed, folder)
            results.send(("done", fmt, index, category, detail))
            continue
        path = folder / f"case{FORMATS[fmt]}"
        path.write_bytes(case_bytes(fmt, index, seed))
        category, detail = classify(path)
        results.send(("done", fmt, index, category, detail))
    results.close()


@dataclass
class _Slot:
    """One supervised worker process and the tasks it still owes."""

    process: Any
    reader: Any
    tasks: list[tuple[str, int]]
    current: tuple[str, int] | None = None
    eof: bool = False
    last_seen: float = field(default_factory=time.monotonic)


def run(
    formats: list[str],
    cases: int,
    jobs: int,
    seed: int,
    timeout: float,
    save: Path,
    tree_cases_count: int = 1000,
    generated_cases: int = 0,
) -> dict[str, Counter[str]]:
    """Run the campaign; return per-format counts (and print progress, crashes and a summary).
    Generated ONNX kinds get ``generated_cases`` cases each, the mutated formats ``cases``."""
    for fmt in formats:
        if fmt in hf.FUZZ_FORMATS:
            hf.fuzz_seeds(fmt)  # build seeds once here (torch), before forking
    hf.all_fuzz_donors()
    context = mp.get_context("fork")

    def count(fmt: str) -> int:
        return tree_cases_count if fmt in TREE_KINDS else generated_cases if fmt in ho.STRUCTURED else cases

    most = max((count(fmt) for fmt in formats), default=0)
    tasks = [(fmt, index) for index in range(most) for fmt in formats if index < count(fmt)]
    chunks = [tasks[offset::jobs] for offset in range(jobs)]
    counts: dict[str, Counter[str]] = {fmt: Counter() for fmt in formats}
    saved: Counter[str] = Counter()
    done = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="biasinspect-fuzz-long-") as workdir:

        def spawn(pending: list[tuple[str, int]]) -> _Slot:
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker, args=(pending, seed, writer, workdir, timeout), daemon=True
            )
            process.start()
            writer.close()  # the child holds the only write end: EOF on the reader means it exited
            return _Slot(process, reader, list(pending))

        by_pid = {slot.process.pid: slot for slot in (spawn(chunk) for chunk in chunks if chunk)}
        # Tasks are disjoint across workers, so (fmt, index) identifies the worker that owns it.
        owner = {task: slot for slot in by_pid.values() for task in slot.tasks}

        def record(fmt: str, index: int, category: str, detail: str) -> None:
            nonlocal done
            counts[fmt][category] += 1
            done += 1
            if category in ("CRASH", "HANG"):
                print(f"{category}: {fmt} case {index}: {detail}", flush=True)
                if saved[fmt] < SAVE_PER_FORMAT:
                    save.mkdir(parents=True, exist_ok=True)
                    if fmt in TREE_KINDS:  # a tree is rebuilt from its seed, not saved
                        target = save / f"{fmt}-seed{seed}-case{index}.txt"
                        target.write_text(
                            f"tests/tree_cases.py {fmt}: random.Random('{seed}:{fmt}:{index}')\n{detail}\n"
                        )
                    else:
                        target = save / f"{fmt}-seed{seed}-case{index}{FORMATS[fmt]}"
                        target.write_bytes(case_bytes(fmt, index, seed))
                    saved[fmt] += 1
            if done % 1000 == 0:
                print(f"  {done:,}/{len(tasks):,} cases, {time.monotonic() - started:.0f} s", flush=True)

        live = set(by_pid)
        while live:
            readers = {by_pid[pid].reader: by_pid[pid] for pid in live}
            for ready in connection.wait(list(readers), timeout=1.0):
                slot = readers[ready]  # type: ignore[index]
                try:
                    kind, fmt, index, category, detail = slot.reader.recv()
                except EOFError:
                    slot.eof = True
                    continue
                slot.last_seen = time.monotonic()
                if kind == "start":
                    slot.current = (fmt, index)
                else:
                    slot.tasks.remove((fmt, index))
                    slot.current = None
                    record(fmt, index, category, detail)
            now = time.monotonic()
            for pid in list(live):
                slot = by_pid[pid]
                if not slot.tasks:
                    slot.process.join(timeout=5)
                    slot.reader.close()
                    live.discard(pid)
                    continue
                died = slot.eof or not slot.process.is_alive()
                hung = not died and slot.current is not None and now - slot.last_seen > timeout
                if not (hung or died):
                    continue
                if died and not slot.eof:
                    continue  # drain what it sent before dying first (EOF comes after its last message)
                slot.process.kill()
                slot.process.join()
                slot.reader.close()
                live.discard(pid)
                if slot.current is not None:
                    slot.tasks.remove(slot.current)
                    reason = (
                        f"no answer in {timeout:.0f} s"
                        if hung
                        else f"worker died (exit {slot.process.exitcode})"
                    )
                    record(*slot.current, "HANG" if hung else "CRASH", reason)
                if slot.tasks:
                    replacement = spawn(slot.tasks)
                    for task in replacement.tasks:
                        owner[task] = replacement
                    by_pid[replacement.process.pid] = replacement
                    live.add(replacement.process.pid)
    return counts


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the per-format table; 1 if anything crashed or hung."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases per format (10000)")
    choices = [*FORMATS, *TREE_KINDS]
    parser.add_argument("--formats", nargs="+", choices=choices, default=choices)
    parser.add_argument(
        "--tree-cases", type=int, default=1000, help="cases per tree kind (1000; each runs the CLI 5 times)"
    )
    parser.add_argument(
        "--generated-cases",
        type=int,
        default=500,
        help="cases per generated ONNX kind (500; each is a whole graph, slower than a mutant)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--seed", type=int, default=0, help="campaign seed (0)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds before a case counts as a hang (30)"
    )
    parser.add_argument(
        "--save",
        type=Path,
        default=Path(tempfile.gettempdir()) / "biasinspect-fuzz-crashes",
        help="folder for crashing inputs (default: biasinspect-fuzz-crashes in the temp folder)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    counts = run(
        args.formats,
        args.cases,
        max(1, args.jobs),
        args.seed,
        args.timeout,
        args.save,
        args.tree_cases,
        args.generated_cases,
    )
    elapsed = time.monotonic() - started
    width = max(len(fmt) for fmt in counts)
    print(
        f"\nbiasinspect long fuzz: seed {args.seed}, {args.cases:,} cases per mutated format, "
        f"{args.generated_cases:,} per generated ONNX kind, {args.tree_cases:,} per tree kind, {elapsed:.0f} s"
    )
    print(f"{'format':<{width}}  " + "  ".join(f"{name:>11}" for name in CATEGORIES))
    for fmt, counter in counts.items():
        print(f"{fmt:<{width}}  " + "  ".join(f"{counter[name]:>11,}" for name in CATEGORIES))
    bad = sum(counter["CRASH"] + counter["HANG"] for counter in counts.values())
    if bad:
        print(f"{bad} crashing or hanging case(s); inputs saved in {args.save}")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
