"""Cost per module of reading pickled module trees: flat from 1k to 100k modules, any shape.

Three tree shapes, each written at 1,000, 10,000 and 100,000 modules as a plain pickle of real
``torch.nn`` module objects (created without ``__init__`` and sharing one small weight, so the
files stay small -- a 100k-module pickle is a few MB):

* ``wide``  -- one container holding bias-less Conv2d / BatchNorm2d pairs side by side;
* ``deep``  -- 990 bias-less convs nested inside each other (just under the 1,000-level cap),
  the innermost holding all other modules as leaves (the issue's quadratic case: every conv's
  follower search used to re-walk the whole subtree below it);
* ``tree``  -- a tree of branching factor 10, convs at every inner node, BatchNorm leaves.

Each file is read with ``biasinspect.api.inspect_file`` (reader + analysis) in this process,
best of ``--rounds`` runs; the table prints CPU time and CPU time per module.  Goal (PASS/FAIL):
per-module time at 100k is at most 3x that at 1k for every shape (a quadratic walk makes it
100x).  torch is needed only to build the files.

Usage::

    PYTHONPATH=. python benchmarks/bench_module_tree.py [--rounds 3] [--sizes 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

DEEP_CONVS = 990
"""Nesting of the ``deep`` shape (module_from_pickle caps nesting at 1,000 levels)."""


def _module(cls: type, children: dict[str, object], weight: object | None) -> object:
    """A module object as ``torch.save`` pickles it, without running ``__init__``."""
    obj = cls.__new__(cls)
    state: dict[str, object] = {
        "training": False,
        "_parameters": {"weight": weight} if weight is not None else {},
        "_buffers": {},
        "_modules": children,
    }
    obj.__dict__.update(state)
    return obj


def build(shape: str, modules: int) -> object:
    """The root module of one benchmark tree with about ``modules`` modules."""
    import torch
    from torch import nn

    conv_weight = nn.Parameter(torch.zeros(4, 4, 1, 1), requires_grad=False)
    norm_weight = nn.Parameter(torch.zeros(4), requires_grad=False)

    def conv(children: dict[str, object] | None = None) -> object:
        node = _module(nn.Conv2d, children or {}, conv_weight)
        node.__dict__.update({"kernel_size": (1, 1), "stride": (1, 1), "groups": 1, "transposed": False})
        return node

    def norm() -> object:
        node = _module(nn.BatchNorm2d, {}, norm_weight)
        node.__dict__["num_features"] = 4
        return node

    if shape == "wide":
        children: dict[str, object] = {}
        for i in range(modules // 2):
            children[f"c{i}"] = conv()
            children[f"n{i}"] = norm()
        return _module(nn.Sequential, children, None)
    if shape == "deep":
        leaves = {f"n{i}": norm() for i in range(max(modules - DEEP_CONVS, 1))}
        inner = conv(leaves)
        for _ in range(DEEP_CONVS - 1):
            inner = conv({"inner": inner})
        return inner
    if shape == "tree":
        count = 1
        root = conv()
        level = [root]
        while count < modules:
            next_level = []
            for parent in level:
                for i in range(10):
                    if count >= modules:
                        break
                    child = conv() if count * 10 < modules else norm()
                    parent.__dict__["_modules"][f"m{i}"] = child
                    next_level.append(child)
                    count += 1
            level = next_level
        return root
    raise ValueError(shape)


def measure(path: Path, rounds: int) -> tuple[float, int]:
    """Best CPU time of ``rounds`` reads+analyses, and the conv count reported.  CPU time, not
    wall time: on a shared machine other processes' load would otherwise swamp the figures."""
    from biasinspect.api import inspect_file

    best = float("inf")
    convs = 0
    for _ in range(rounds):
        start = time.process_time()
        reports = inspect_file(path)
        best = min(best, time.process_time() - start)
        convs = sum(len(report.layers) for report in reports)
    return best, convs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--shapes", nargs="+", default=["wide", "deep", "tree"])
    args = parser.parse_args()
    sys.setrecursionlimit(1_000_000)  # pickle.dumps recurses through the 990 nested convs
    ok = True
    print(f"{'shape':6} {'modules':>8} {'pickle':>9} {'convs':>7} {'CPU s':>8} {'us/module':>10}")
    with tempfile.TemporaryDirectory(prefix="biasinspect-tree-") as folder:
        for shape in args.shapes:
            per_module: dict[int, float] = {}
            for size in args.sizes:
                path = Path(folder) / f"{shape}-{size}.pkl"
                path.write_bytes(pickle.dumps(build(shape, size), protocol=2))
                seconds, convs = measure(path, args.rounds)
                per_module[size] = seconds / size
                print(
                    f"{shape:6} {size:>8,} {path.stat().st_size / 1e6:>7.2f}MB {convs:>7,} "
                    f"{seconds:>8.3f} {per_module[size] * 1e6:>10.2f}"
                )
                path.unlink()
            small, large = per_module[min(args.sizes)], per_module[max(args.sizes)]
            flat = large <= 3 * small
            ok = ok and flat
            print(
                f"{'PASS' if flat else 'FAIL'}: {shape}: per-module time at {max(args.sizes):,} is "
                f"{large / small:.2f}x that at {min(args.sizes):,} (goal <= 3x)"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
