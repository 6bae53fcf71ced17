"""Benchmark biasinspect against the frameworks' own loaders on VGG19-size TFLite and Keras files.

Needs tensorflow-cpu, tf-keras and keras 3 (they are not biasinspect dependencies; see
samples/make_format_samples.py for the environment).  Three files of VGG19 (143,667,240 float32
parameters, ~549 MiB each) are written by the real converters: ``vgg19.tflite``
(``tf.lite.TFLiteConverter``), ``vgg19.keras`` (keras 3 ``model.save``) and ``vgg19.h5`` (tf-keras
``save_format="h5"``).  Each command runs as its own process (imports included, as a user pays
them), in alternating rounds.  Goals (PASS/FAIL lines): biasinspect takes at most 1/3 of the
loader's wall time and peaks at 150 MiB RSS or less.  The peak RSS of a run is the largest of its
processes (biasinspect's and, for Keras files, its isolated HDF5 parser's); the parser's own peak
is printed too.

Baselines: ``tf.lite.Interpreter(model_path=...)`` construction, ``keras.saving.load_model`` for
``.keras`` and ``tf_keras.models.load_model`` for ``.h5``.

Usage::

    /work/venv-tf/bin/python benchmarks/bench_formats.py [--rounds 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import MIB, Series, alternate, check_vgg19_report, child_env, print_loader_verdicts, print_table

WALL_RATIO_GOAL = 3.0
RSS_GOAL_BYTES = 150 * MIB
VGG19_PARAMS = 143_667_240

_GENERATE = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ["KERAS_BACKEND"] = "tensorflow"
out = sys.argv[1]
import tensorflow as tf
import tf_keras
legacy = tf_keras.applications.VGG19(weights=None)
assert legacy.count_params() == 143_667_240, legacy.count_params()
legacy.save(os.path.join(out, "vgg19.h5"), save_format="h5")
converter = tf.lite.TFLiteConverter.from_keras_model(legacy)
with open(os.path.join(out, "vgg19.tflite"), "wb") as handle:
    handle.write(converter.convert())
del legacy, converter
import keras
model = keras.applications.VGG19(weights=None)
model.save(os.path.join(out, "vgg19.keras"))
"""

_TFLITE_LOAD = (
    "import os, sys; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
    "import tensorflow as tf\n"
    "tf.lite.Interpreter(model_path=sys.argv[1])\n"
)
_KERAS3_LOAD = (
    "import os, sys; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'; os.environ['KERAS_BACKEND'] = 'tensorflow'\n"
    "import keras\n"
    "keras.saving.load_model(sys.argv[1], compile=False)\n"
)
_TF_KERAS_LOAD = (
    "import os, sys; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
    "import tf_keras\n"
    "tf_keras.models.load_model(sys.argv[1], compile=False)\n"
)
_H5_CHILD_PEAK = (
    "import json, resource, sys\n"
    "from biasinspect.api import read_file\n"
    "from pathlib import Path\n"
    "read_file(Path(sys.argv[1]))\n"
    "from biasinspect.readers import h5_isolated\n"
    "h5_isolated._shutdown()\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
)


def main(argv: list[str] | None = None) -> int:
    """Generate the files, run the alternating rounds, print figures and PASS/FAIL; 1 on any FAIL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per command (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per command first (default 1)")
    parser.add_argument("--workdir", type=Path, help="where to write the models (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench-formats-", dir=args.workdir))
    py = sys.executable
    try:
        start = time.perf_counter()
        subprocess.run([py, "-c", _GENERATE, str(workdir)], check=True, env=child_env())
        files = {suffix: workdir / f"vgg19{suffix}" for suffix in (".tflite", ".keras", ".h5")}
        print(
            "wrote "
            + ", ".join(f"{path.name} ({path.stat().st_size / MIB:,.1f} MiB)" for path in files.values())
            + f" in {time.perf_counter() - start:.1f} s"
        )
        ours = {
            suffix: Series(
                f"biasinspect {path.name}", [py, "-m", "biasinspect", str(path), "--format", "json"]
            )
            for suffix, path in files.items()
        }
        loaders = {
            ".tflite": Series(
                "tf.lite.Interpreter(model_path)", [py, "-c", _TFLITE_LOAD, str(files[".tflite"])]
            ),
            ".keras": Series("keras.saving.load_model", [py, "-c", _KERAS3_LOAD, str(files[".keras"])]),
            ".h5": Series("tf_keras.models.load_model (.h5)", [py, "-c", _TF_KERAS_LOAD, str(files[".h5"])]),
        }
        order = [series for suffix in files for series in (ours[suffix], loaders[suffix])]
        alternate(order, rounds=args.rounds, warmup=args.warmup)
        for suffix, series in ours.items():
            for run in series.runs:
                check_vgg19_report(run.stdout)
                # The TFLite converter merges identical constants (an untrained model's zero
                # biases of one width) into one tensor, so its count is lower; see the README.
                if suffix != ".tflite" and b'"model_params": 143667240' not in run.stdout:
                    raise RuntimeError(f"{series.label}: model_params is not {VGG19_PARAMS:,}")
        tflite_params = json.loads(ours[".tflite"].runs[0].stdout)["models"][0]["totals"]["model_params"]
        print(f"vgg19.tflite model_params: {tflite_params:,} (Keras count {VGG19_PARAMS:,})")
        print()
        print_table(order)
        print()
        for suffix in (".keras", ".h5"):
            peaks = subprocess.run(
                [py, "-c", _H5_CHILD_PEAK, str(files[suffix])],
                capture_output=True,
                env=child_env(),
                check=True,
            ).stdout.split()
            print(
                f"{files[suffix].name}: HDF5 parser process peak RSS {int(peaks[0]) / 1024:.1f} MiB, "
                f"biasinspect process {int(peaks[1]) / 1024:.1f} MiB"
            )
        failed = False
        for suffix, series in ours.items():
            loader = loaders[suffix]
            failed |= not print_loader_verdicts(
                suffix, series, loader, loader.label, WALL_RATIO_GOAL, RSS_GOAL_BYTES
            )
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
