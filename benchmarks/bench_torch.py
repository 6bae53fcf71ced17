"""Benchmark biasinspect against torch.load and safetensors on a VGG19-size checkpoint (~575 MB).

Two files hold the state_dict of a torchvision-shaped VGG19 (143,667,240 float32 parameters,
torchvision's key names): ``vgg19.pt`` written by ``torch.save`` (zip format) and
``vgg19.safetensors`` written by ``safetensors.torch.save_file``.  They are generated in a
child process so that this process never imports torch or holds the weights.

Commands run as their own processes, imports included (that is what a user pays), in
alternating rounds.  Baselines:

* ``torch.load(path, weights_only=True, mmap=True)`` (the cheapest safe way to see a .pt's
  shapes with torch); its import-free time is printed for context;
* ``safetensors.safe_open(path, "np")`` + ``keys()`` + ``get_slice(k).get_shape()`` (the
  header-only read; numpy framework, so no torch import).  The ``"pt"`` variant is shown
  for context.

Goals (PASS/FAIL lines): .pt -- biasinspect at most 1/5 of torch.load's wall time;
.safetensors -- at most 2x safe_open's; peak RSS <= 150 MiB on both.

Usage::

    python benchmarks/bench_torch.py [--rounds 5] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import MIB, Series, alternate, check_vgg19_report, child_env, print_table, verdict

PT_RATIO_GOAL = 5.0
SAFETENSORS_RATIO_GOAL = 2.0
RSS_GOAL_BYTES = 150 * MIB
VGG19_PARAMS = 143_667_240

_TORCH_LOAD = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
state = torch.load(sys.argv[1], weights_only=True, mmap=True)
shapes = {k: tuple(v.shape) for k, v in state.items()}
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "work_s": t2 - t1, "tensors": len(shapes)}))
"""

_SAFE_OPEN = """
import json, sys, time
t0 = time.perf_counter()
from safetensors import safe_open
if sys.argv[2] == "pt":
    import torch
else:
    import numpy  # safe_open imports it lazily; count it as an import, not as work
t1 = time.perf_counter()
with safe_open(sys.argv[1], sys.argv[2]) as handle:
    shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "work_s": t2 - t1, "tensors": len(shapes)}))
"""


def generate(workdir: Path) -> None:
    """Write vgg19.pt and vgg19.safetensors into ``workdir`` (runs in a child process: imports torch)."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    cfg: list[int | str] = [
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ]  # fmt: skip
    layers: list[nn.Module] = []
    channels = 3
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
            channels = int(item)
    # The same module tree as torchvision.models.vgg19, so the state_dict keys are the real ones.
    model = nn.Module()
    model.features = nn.Sequential(*layers)
    model.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
        nn.Linear(4096, 1000),
    )  # fmt: skip
    state = model.state_dict()
    assert sum(t.numel() for t in state.values()) == VGG19_PARAMS
    torch.save(state, workdir / "vgg19.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(workdir / "vgg19.safetensors"))


def _work_times(series: Series) -> float:
    """Median in-process time (after imports) that a baseline script reported."""
    return statistics.median(float(json.loads(run.stdout)["work_s"]) for run in series.runs)


def main(argv: list[str] | None = None) -> int:
    """Generate the checkpoints, run the alternating rounds, print figures and PASS/FAIL; 1 on any FAIL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per command first (default 1)")
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--generate-into", type=Path, help=argparse.SUPPRESS)  # the child's mode
    args = parser.parse_args(argv)
    if args.generate_into is not None:
        generate(args.generate_into)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="bench-torch-", dir=args.workdir))
    py = sys.executable
    try:
        start = time.perf_counter()
        subprocess.run([py, __file__, "--generate-into", str(workdir)], check=True, env=child_env())
        pt, st = workdir / "vgg19.pt", workdir / "vgg19.safetensors"
        print(
            f"wrote {pt.name} ({pt.stat().st_size / MIB:,.1f} MiB) and {st.name} "
            f"({st.stat().st_size / MIB:,.1f} MiB) in {time.perf_counter() - start:.1f} s"
        )

        ours_pt = Series(f"biasinspect {pt.name}", [py, "-m", "biasinspect", str(pt), "--format", "json"])
        ours_st = Series(f"biasinspect {st.name}", [py, "-m", "biasinspect", str(st), "--format", "json"])
        torch_load = Series("torch.load(weights_only, mmap)", [py, "-c", _TORCH_LOAD, str(pt)])
        safe_np = Series('safe_open(.., "np") shapes', [py, "-c", _SAFE_OPEN, str(st), "np"])
        safe_pt = Series('safe_open(.., "pt") shapes', [py, "-c", _SAFE_OPEN, str(st), "pt"])
        context = [
            Series("python -c pass", [py, "-c", "pass"]),
            Series("import biasinspect.cli", [py, "-c", "import biasinspect.cli"]),
            Series("import torch", [py, "-c", "import torch"]),
        ]
        order = [ours_pt, torch_load, ours_st, safe_np, safe_pt, *context]
        alternate(order, rounds=args.rounds, warmup=args.warmup)
        for series in (ours_pt, ours_st):
            for run in series.runs:
                check_vgg19_report(run.stdout)

        print()
        print_table(order)
        print()
        pt_ratio = torch_load.median_wall / ours_pt.median_wall
        st_ratio = ours_st.median_wall / safe_np.median_wall
        lines = [
            (pt_ratio >= PT_RATIO_GOAL,
             f".pt: biasinspect {ours_pt.median_wall:.3f} s vs torch.load {torch_load.median_wall:.3f} s "
             f"= {pt_ratio:.1f}x faster (goal >= {PT_RATIO_GOAL:.0f}x)"),
            (st_ratio <= SAFETENSORS_RATIO_GOAL,
             f".safetensors: biasinspect {ours_st.median_wall:.3f} s vs safe_open {safe_np.median_wall:.3f} s "
             f"= {st_ratio:.2f}x as long (goal <= {SAFETENSORS_RATIO_GOAL:.0f}x)"),
            (ours_pt.max_rss <= RSS_GOAL_BYTES,
             f".pt: biasinspect peak RSS {ours_pt.max_rss / MIB:.1f} MiB (goal <= {RSS_GOAL_BYTES / MIB:.0f} MiB; "
             f"torch.load {torch_load.max_rss / MIB:.1f} MiB)"),
            (ours_st.max_rss <= RSS_GOAL_BYTES,
             f".safetensors: biasinspect peak RSS {ours_st.max_rss / MIB:.1f} MiB "
             f"(goal <= {RSS_GOAL_BYTES / MIB:.0f} MiB; safe_open {safe_np.max_rss / MIB:.1f} MiB)"),
        ]  # fmt: skip
        failed = False
        for ok, text in lines:
            failed |= not ok
            print(verdict(ok, text))
        print(
            f"note: without imports, torch.load takes {_work_times(torch_load):.3f} s; "
            f'safe_open "np" {_work_times(safe_np):.4f} s; safe_open "pt" {_work_times(safe_pt):.4f} s'
        )
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
