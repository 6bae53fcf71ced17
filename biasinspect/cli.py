"""The command line: the only module that reads argv, prints or exits.

Exit codes (a public contract): 0 ok; 1 a ``--fail-on`` policy matched; 2 a path could not be
inspected or the command line is wrong.  A path that cannot be inspected gives exactly one line on
stderr, ``biasinspect: PATH: reason``; the other paths are still reported.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from biasinspect import __version__
from biasinspect.errors import BiasInspectError, UsageError
from biasinspect.render import FORMATS as OUTPUT_FORMATS
from biasinspect.render import display_path, printable

if TYPE_CHECKING:
    from biasinspect.api import Candidate, FileOutcome
    from biasinspect.model import InspectionFailure, Report

EXIT_OK = 0
EXIT_POLICY = 1
EXIT_INPUT = 2

POLICY_KINDS = ("tied", "untied", "absent", "other", "unsafe")

_PROGRESS_MIN_FILES = 8
"""Runs over more files than this show a progress bar by default (when stderr is a terminal)."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` can return the code."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _word_list(value: str, choices: Sequence[str], what: str) -> list[str]:
    """A comma-separated list of words from ``choices`` (an argparse type for repeatable options)."""
    words = [part.strip().lower() for part in value.split(",") if part.strip()]
    unknown = [word for word in words if word not in choices]
    if unknown or not words:
        raise argparse.ArgumentTypeError(
            f"invalid {what} {', '.join(unknown) or repr(value)} (choose from {', '.join(choices)})"
        )
    return words


def _split_kinds(value: str) -> list[str]:
    return _word_list(value, POLICY_KINDS, "kind")


def _build_inspect_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="biasinspect",
        description=(
            "Classify every convolution's bias in ONNX, PyTorch, TorchScript, torch.export and safetensors "
            "files as tied (one per output channel), untied (one per channel and location) or absent, and "
            "print the exact parameter breakdown. Files are never executed and weights are never read. "
            "Also: 'biasinspect calc --input 3x32x32 --filters 32x5x5' answers the question for one layer."
        ),
        epilog="Exit codes: 0 ok, 1 a --fail-on policy matched, 2 a path could not be inspected or bad usage.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="model files or folders (scanned recursively), or URLs (https://, s3://, ...)",
    )
    parser.add_argument(
        "--format",
        "-f",
        choices=(*OUTPUT_FORMATS, "jsonl"),
        default="table",
        help="output format (default: table); jsonl streams one JSON object per model as each file is read",
    )
    parser.add_argument(
        "--fail-on",
        action="append",
        type=_split_kinds,
        default=[],
        metavar="KIND",
        help=(
            "exit 1 after the report when any layer has this bias kind (tied, untied, absent, other), or when a "
            "pickle references code-running callables (unsafe); repeat or comma-separate for several"
        ),
    )
    parser.add_argument(
        "--output", "-o", metavar="FILE", help="write the report to FILE instead of standard output"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="for URLs: seconds each network request may take (default: 30)",
    )
    parser.add_argument(
        "--jobs",
        "-j",
        type=_positive_int,
        default=None,
        metavar="N",
        help="files read at once: N worker processes for local files, N threads for URLs (default: CPU cores)",
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help=f"show a progress bar on stderr (default: when stderr is a terminal and over {_PROGRESS_MIN_FILES} files)",
    )
    progress.add_argument(
        "--no-progress", dest="progress", action="store_false", help="never show a progress bar"
    )
    parser.add_argument(
        "--dask-scheduler",
        metavar="ADDRESS",
        help="read the files on a Dask cluster (tcp://host:8786); needs biasinspect[dask]",
    )
    parser.add_argument("--version", action="version", version=f"biasinspect {__version__}")
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"timeout must be a positive number of seconds, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return value


def _dims(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.lower().replace("*", "x").replace(",", "x").split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3x32x32, not {text!r}") from None
    return values


def _padding(text: str) -> list[int] | str:
    if text.lower() in ("same", "valid"):
        return text.lower()
    return _dims(text)


def _build_calc_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="biasinspect calc",
        description=(
            "Parameter count of one conv layer with tied and with untied biases, side by side. "
            "Example: biasinspect calc --input 3x32x32 --filters 32x5x5"
        ),
    )
    parser.add_argument("--input", required=True, type=_dims, metavar="CxHxW", help="input channels and size")
    parser.add_argument(
        "--filters", required=True, type=_dims, metavar="NxKHxKW", help="filter count and kernel"
    )
    parser.add_argument(
        "--stride", type=_dims, default=[1], metavar="S", help="stride, one value or per axis (1)"
    )
    parser.add_argument(
        "--padding",
        type=_padding,
        default=[0],
        metavar="P",
        help="padding per side, per axis, 'same' or 'valid' (0)",
    )
    parser.add_argument("--dilation", type=_dims, default=[1], metavar="D", help="dilation (1)")
    parser.add_argument("--groups", type=int, default=1, metavar="G", help="groups (1)")
    parser.add_argument("--format", "-f", choices=OUTPUT_FORMATS, default="table", help="output format")
    return parser


DIFF_CHANGE_KINDS = ("kind", "params", "weight_shape", "only_source", "only_export", "any")


def _split_change_kinds(value: str) -> list[str]:
    return _word_list(value, DIFF_CHANGE_KINDS, "change")


def _build_diff_parser() -> argparse.ArgumentParser:
    from biasinspect.render_diff import DIFF_FORMATS

    parser = _ArgumentParser(
        prog="biasinspect diff",
        description=(
            "Compare the conv layers of two models (e.g. a checkpoint and its export, or a model and its "
            "quantized copy): bias kinds, bias parameters and weight shapes, layer by layer. Layers are matched "
            "by module path, then by order and weight geometry (marked 'order')."
        ),
        epilog="Exit codes: 0 ok, 1 a --fail-on-change policy matched, 2 a file could not be inspected or bad usage.",
    )
    parser.add_argument("source", metavar="SOURCE", help="the original model (any supported format)")
    parser.add_argument("export", metavar="EXPORT", help="the exported or converted model")
    parser.add_argument(
        "--format", "-f", choices=DIFF_FORMATS, default="table", help="output format (default: table)"
    )
    parser.add_argument(
        "--fail-on-change",
        action="append",
        type=_split_change_kinds,
        default=[],
        metavar="CHANGE",
        help=(
            "exit 1 after the report when a layer has this change: kind (bias kind changed), params, "
            "weight_shape, only_source, only_export, or any; repeat or comma-separate for several"
        ),
    )
    parser.add_argument(
        "--output", "-o", metavar="FILE", help="write the report to FILE instead of standard output"
    )
    return parser


def _run_diff(argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> int:
    from biasinspect.api import inspect_paths_for_cli
    from biasinspect.diff import diff_models
    from biasinspect.readers.onnx_core import allow_light_onnx_import
    from biasinspect.render_diff import render_diff

    args = _build_diff_parser().parse_args(list(argv))
    allow_light_onnx_import()
    sides = []
    failed = False
    for path in (args.source, args.export):
        report = inspect_paths_for_cli([path])
        for failure in report.errors:
            stderr.write(f"biasinspect: {display_path(failure.path)}: {printable(failure.message)}\n")
            failed = True
        if not report.errors and not report.models:
            stderr.write(f"biasinspect: {display_path(path)}: no model found\n")
            failed = True
        sides.append(report.models)
    if failed:
        return EXIT_INPUT
    source, export = sides[0][0], sides[1][0]
    diff = diff_models(source, export)
    for models, path in zip(sides, (args.source, args.export), strict=True):
        if len(models) > 1:
            stderr.write(
                f"biasinspect: note: {display_path(path)} holds {len(models)} weight sets; "
                f"compared the first ({models[0].location or 'top level'})\n"
            )
    _emit(render_diff(diff, args.format), args.output, stdout)
    kinds = {kind for group in args.fail_on_change for kind in group}
    messages = []
    for kind in sorted(kinds):
        rows = [
            row
            for row in diff.layers
            if row.changes and (kind == "any" or any(str(c.kind) == kind for c in row.changes))
        ]
        if rows:
            names = [row.name for row in rows]
            shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            messages.append(
                f"{source.path} -> {export.path}: {len(rows)} layer(s) changed (--fail-on-change {kind}): {shown}"
            )
    for message in messages:
        stderr.write(f"biasinspect: policy: {display_path(message)}\n")
    return EXIT_POLICY if messages else EXIT_OK


def _run_calc(argv: Sequence[str], stdout: TextIO) -> int:
    from biasinspect.analysis import calc
    from biasinspect.render import render_calc

    args = _build_calc_parser().parse_args(list(argv))
    result = calc(args.input, args.filters, args.stride, args.padding, args.dilation, args.groups)
    stdout.write(render_calc(result, args.format))
    return EXIT_OK


def _policy_failures(report: Report, kinds: set[str]) -> list[str]:
    messages: list[str] = []
    for model in report.models:
        where = model.path + (f" [{model.location}]" if model.location else "")
        for kind in sorted(kinds - {"unsafe"}):
            matching = [layer.name for layer in model.layers if str(layer.bias.kind) == kind]
            if matching:
                shown = ", ".join(matching[:5]) + (" ..." if len(matching) > 5 else "")
                messages.append(f"{where}: {len(matching)} {kind} layer(s) (--fail-on {kind}): {shown}")
        if "unsafe" in kinds and model.unsafe_callables:
            messages.append(
                f"{where}: pickle references code-running callables (--fail-on unsafe): "
                + ", ".join(model.unsafe_callables)
            )
    return messages


def _run_inspect(argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> int:
    from biasinspect.api import plan
    from biasinspect.readers.onnx_core import allow_light_onnx_import

    args = _build_inspect_parser().parse_args(list(argv))
    allow_light_onnx_import()  # this process is ours: skip the parts of `import onnx` we never use
    kinds = {kind for group in args.fail_on for kind in group}
    candidates = plan(args.paths, timeout=args.timeout)
    outcomes = _outcomes(candidates, args.jobs, args.dask_scheduler)
    outcomes = _with_progress(outcomes, len(candidates), args.progress, stderr)
    failures: Sequence[InspectionFailure]
    if args.format == "jsonl":
        failures, policy_messages = _stream_jsonl(outcomes, kinds, stdout, args.output)
    else:
        failures, policy_messages = _write_report(outcomes, args.format, kinds, stdout, args.output)
    for failure in failures:
        stderr.write(f"biasinspect: {display_path(failure.path)}: {printable(failure.message)}\n")
    for message in policy_messages:
        stderr.write(f"biasinspect: policy: {printable(message)}\n")
    if failures:
        return EXIT_INPUT
    return EXIT_POLICY if policy_messages else EXIT_OK


def _emit(text: str, output: str | None, stdout: TextIO) -> None:
    """Write a rendered report to ``output`` (a file) or to standard output."""
    if output is not None:
        try:
            with open(output, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as error:
            raise UsageError(f"cannot write --output {output}: {error.strerror or error}") from error
        return
    try:
        stdout.write(text)
        stdout.flush()
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): the exit code and the error lines still matter.
        _silence(stdout)


def _outcomes(candidates: list[Candidate], jobs: int | None, scheduler: str | None) -> Iterator[FileOutcome]:
    """Each file's outcome in report order: serially, in a local pool or on a Dask cluster."""
    if scheduler is not None:
        from biasinspect.dask_adapter import iter_outcomes_on_scheduler

        return iter_outcomes_on_scheduler(scheduler, candidates)
    from biasinspect.api import available_cores, iter_outcomes

    workers = available_cores() if jobs is None else jobs
    return iter_outcomes(candidates, contain_bugs=True, jobs=workers, command_line=True)


def _with_progress(
    outcomes: Iterator[FileOutcome], total: int, wanted: bool | None, stderr: TextIO
) -> Iterator[FileOutcome]:
    """A tqdm bar on stderr over the outcomes, when asked for or when stderr is a terminal."""
    if wanted is False or (wanted is None and (total <= _PROGRESS_MIN_FILES or not _is_terminal(stderr))):
        return outcomes
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a stripped install still gets its report
        return outcomes
    return _progress_bar(tqdm, outcomes, total, stderr)


def _progress_bar(
    tqdm: Any, outcomes: Iterator[FileOutcome], total: int, stderr: TextIO
) -> Iterator[FileOutcome]:
    tqdm.monitor_interval = 0  # no monitor thread: worker processes are started while the bar runs
    with tqdm(total=total, file=stderr, unit="file", leave=False) as bar:
        for outcome in outcomes:
            bar.update(1)
            yield outcome


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _write_report(
    outcomes: Iterator[FileOutcome], fmt: str, kinds: set[str], stdout: TextIO, output: str | None
) -> tuple[Sequence[InspectionFailure], list[str]]:
    from biasinspect.api import assemble_report
    from biasinspect.render import render

    report = assemble_report(outcomes)
    _emit(render(report, fmt), output, stdout)
    return report.errors, _policy_failures(report, kinds)


def _stream_jsonl(
    outcomes: Iterator[FileOutcome], kinds: set[str], stdout: TextIO, output: str | None = None
) -> tuple[list[InspectionFailure], list[str]]:
    """Write one line per model and per failure as they arrive, then the summary line; only the
    failures and policy messages (for stderr and the exit code) are kept.  With ``output``, the
    lines go to that file as they arrive."""
    if output is not None:
        try:
            handle = open(output, "w", encoding="utf-8")  # noqa: SIM115 (closed just below)
        except OSError as error:
            raise UsageError(f"cannot write --output {output}: {error.strerror or error}") from error
        with handle:
            return _stream_jsonl(outcomes, kinds, handle)
    from biasinspect import jsonl
    from biasinspect.api import stream_items
    from biasinspect.model import ModelReport, Report

    failures: list[InspectionFailure] = []
    policy_messages: list[str] = []
    models = 0
    writing = True
    for item in stream_items(outcomes):
        if isinstance(item, ModelReport):
            models += 1
            policy_messages.extend(_policy_failures(Report(models=(item,)), kinds))
            record = jsonl.model_record(item)
        else:
            failures.append(item)
            record = jsonl.error_record(item)
        if writing:
            writing = _write_line(stdout, jsonl.line(record))
    if writing:
        _write_line(stdout, jsonl.line(jsonl.summary_record(models, len(failures))))
    return failures, policy_messages


def _write_line(stdout: TextIO, text: str) -> bool:
    """Write and flush one line; False once the reader of stdout has gone away."""
    try:
        stdout.write(text)
        stdout.flush()
    except BrokenPipeError:
        _silence(stdout)
        return False
    return True


def _silence(stream: TextIO) -> None:
    """Point a broken stream at /dev/null so that later flushes (at exit) cannot raise again."""
    try:
        descriptor = stream.fileno()
    except (OSError, ValueError):
        return  # not a real file (a StringIO in tests): nothing will flush it at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


def main(
    argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run the CLI and return its exit code (0 ok, 1 policy failure, 2 unreadable input or usage error)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    try:
        if arguments and arguments[0] == "calc":
            return _run_calc(arguments[1:], out)
        if arguments and arguments[0] == "diff":
            return _run_diff(arguments[1:], out, err)
        return _run_inspect(arguments, out, err)
    except UsageError as error:
        err.write(f"biasinspect: error: {printable(str(error))}\n")
        err.write(
            "usage: biasinspect PATH... [--format FORMAT] [--fail-on KIND] [--jobs N] | biasinspect calc --help\n"
        )
        return EXIT_INPUT
    except BiasInspectError as error:
        err.write(f"biasinspect: {printable(str(error))}\n")
        return EXIT_INPUT
    except SystemExit as exit_request:  # --help and --version
        code = exit_request.code
        return code if isinstance(code, int) else EXIT_OK


def console_main() -> NoReturn:
    """Entry point of the ``biasinspect`` console script."""
    for stream in (sys.stdout, sys.stderr):
        # Names from a file (tensor names, file names) may not be encodable in the terminal's
        # encoding; an escape is better than a UnicodeEncodeError traceback.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        _silence(sys.stdout)
        code = EXIT_OK
    except KeyboardInterrupt:
        sys.stderr.write("biasinspect: interrupted\n")
        code = 130
    sys.exit(code)
