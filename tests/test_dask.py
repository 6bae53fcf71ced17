"""The Dask adapter on a real LocalCluster with worker processes: results equal a serial run."""

from __future__ import annotations

import io
import json
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import dask
import pyarrow.parquet
import pytest
from distributed import Client, LocalCluster, WorkerPlugin
from scale_fixtures import MODEL_FILES, build_folder, write_slow_pickle

import biasinspect
from biasinspect.cli import main
from biasinspect.dask_adapter import inspect_on_cluster, parquet_schema, write_partitions

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    # Worker processes import biasinspect from this checkout, as pytest does.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # Dask gives up on a task at the first worker that dies running it (the default retries on
    # three more workers, which would only make the crash test slower).
    with (
        pytest.MonkeyPatch.context() as patch,
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
    ):
        patch.setenv("PYTHONPATH", path)
        with (
            LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
            ) as cluster,
            Client(cluster) as connected,
        ):
            yield connected


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_folder(tmp_path_factory.mktemp("dask"))


def test_report_equals_a_serial_run(client: Client, folder: Path) -> None:
    missing = str(folder / "missing.onnx")
    serial = biasinspect.inspect(folder, missing)
    assert len(serial.models) == MODEL_FILES
    assert [failure.path for failure in serial.errors] == [str(folder / "notes.pt"), missing]
    # Three files per task: several tasks, results put back in order.
    assert inspect_on_cluster([folder, missing], client, files_per_task=3) == serial


def test_jsonl_partitions_hold_the_serial_lines(client: Client, folder: Path, tmp_path: Path) -> None:
    out = io.StringIO()
    assert main([str(folder), "--format", "jsonl", "--jobs", "1"], stdout=out, stderr=io.StringIO()) == 2
    serial_lines = out.getvalue().splitlines()[:-1]  # without the summary line
    written = write_partitions(folder, client, tmp_path / "out", format="jsonl", files_per_partition=5)
    assert [Path(name).name for name in written] == [f"part-0000{index}.jsonl" for index in range(4)]
    # 13 files in partitions of 5; the scanned file that failed comes last, in a partition of its own.
    lines = [line for name in written for line in Path(name).read_text().splitlines()]
    assert lines == serial_lines
    assert json.loads(Path(written[-1]).read_text()) == {
        "type": "error",
        "path": str(folder / "notes.pt"),
        "message": "not a model file: the file is text",
    }


def test_parquet_partitions_one_row_per_layer(client: Client, folder: Path, tmp_path: Path) -> None:
    written = write_partitions([folder], client, tmp_path / "pq", format="parquet", files_per_partition=4)
    assert len(written) == 5
    table = pyarrow.concat_tables(pyarrow.parquet.read_table(name) for name in written)
    assert table.schema == parquet_schema()
    rows = table.to_pylist()
    serial = biasinspect.inspect(folder)
    layers = [(model, layer) for model in serial.models for layer in model.layers]
    assert len(rows) == len(layers) + 1 == MODEL_FILES + 1
    for row, (model, layer) in zip(rows, layers, strict=False):
        assert (row["path"], row["format"], row["layer"], row["op"]) == (
            model.path,
            model.format,
            layer.name,
            layer.op,
        )
        assert (row["bias_kind"], row["bias_params"], row["formula"]) == (
            str(layer.bias.kind),
            layer.bias.params,
            layer.formula,
        )
        assert row["weight_shape"] == list(layer.weight_shape or ())
        assert row["error"] is None
    first = rows[0]
    assert (first["bias_kind"], first["bias_shape"], first["bias_source"], first["model_params"]) == (
        "tied",
        [4],
        "conv",
        4 * 3 * 3 * 3 + 4,
    )
    assert rows[1]["bias_kind"] == "absent"
    assert rows[-1]["error"] == "not a model file: the file is text"
    assert rows[-1]["layer"] is None


def test_cli_dask_scheduler_equals_serial(client: Client, folder: Path) -> None:
    address = client.scheduler.address
    serial_out, dask_out, serial_err, dask_err = io.StringIO(), io.StringIO(), io.StringIO(), io.StringIO()
    assert main([str(folder), "-f", "json", "--jobs", "1"], stdout=serial_out, stderr=serial_err) == 2
    assert (
        main([str(folder), "-f", "json", "--dask-scheduler", address], stdout=dask_out, stderr=dask_err) == 2
    )
    assert dask_out.getvalue() == serial_out.getvalue()
    assert dask_err.getvalue() == serial_err.getvalue()


class CpuLimit(WorkerPlugin):
    """Gives each worker process a CPU-time limit 2 s above what it has used once the readers are
    imported, so that reading a file that needs more (the 5-second pickle) gets the worker killed
    by the kernel (SIGXCPU): a real worker death.  A worker restarted after that death must still
    read a small ONNX file within its budget, imports included, hence the warm-up first."""

    name = "cpu-limit"

    def setup(self, worker: object) -> None:
        import biasinspect.api
        import biasinspect.readers.onnx_reader
        import biasinspect.readers.torch_reader

        biasinspect.readers.onnx_reader._onnx()  # onnx's own import, the costliest part
        usage = resource.getrusage(resource.RUSAGE_SELF)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (int(usage.ru_utime + usage.ru_stime) + 2, hard))

    def teardown(self, worker: object) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))


def test_a_file_that_kills_its_workers_costs_only_that_file(
    client: Client, folder: Path, tmp_path: Path
) -> None:
    slow = write_slow_pickle(tmp_path / "slow.pkl")  # about 5 s of CPU
    files = [folder / "conv_00.onnx", slow, folder / "conv_01.onnx", folder / "conv_02.onnx"]
    client.register_plugin(CpuLimit())
    try:
        report = inspect_on_cluster(files, client, files_per_task=2)
    finally:
        client.unregister_worker_plugin(CpuLimit.name)
    serial = biasinspect.inspect(*[path for path in files if path != slow])
    assert report.models == serial.models
    assert [(failure.path, failure.message) for failure in report.errors] == [
        (str(slow), "reader process crashed on the Dask workers (KilledWorker)")
    ]
