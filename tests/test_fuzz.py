"""Fuzz suite: mutated valid files never make biasinspect fail with anything but a BiasInspectError.

Seeds are small valid files of each format, built in code (tests/hostile_files.py) plus the
committed samples.  Each example applies 1-4 byte-level mutations (bit flips, truncation, byte
insertions and overwrites with edge-case values, deletions, repeats, splices from any seed of any
format).  The outcome of inspecting the mutant must be a report or a BiasInspectError: any other
exception is a bug.  Examples are derandomized and bounded by the ``ci`` hypothesis profile
(tests/conftest.py: 150 per format, no deadline); ``--hypothesis-profile=deep`` runs more, and
``python benchmarks/fuzz_long.py --cases 10000`` runs the long multi-process campaign.
Generated ONNX graphs (tests/hostile_onnx.py: function bombs, data-propagation growth, fan-in and
long chains) get 12 examples per kind here.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import hostile_files as hf
import hostile_onnx as ho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from biasinspect.api import read_file
from biasinspect.errors import BiasInspectError
from biasinspect.model import ModelDescription

pytestmark = pytest.mark.timeout(120)

_position = st.integers(min_value=0, max_value=(1 << 32) - 1)
_chunk = st.one_of(st.sampled_from(hf.INTERESTING_BYTES), st.binary(min_size=1, max_size=16))

MUTATION = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(0, 7)),
    st.tuples(st.just("truncate"), _position),
    st.tuples(st.just("insert"), _position, _chunk),
    st.tuples(st.just("overwrite"), _position, _chunk),
    st.tuples(st.just("delete"), _position, st.integers(1, 64)),
    st.tuples(st.just("splice"), _position, st.integers(0, 63), _position, st.integers(1, 256)),
    st.tuples(st.just("repeat"), _position, st.integers(1, 64)),
)
"""One mutation, in the tuple form hostile_files.apply_mutations takes."""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Module-scoped (hypothesis re-runs the test body many times within one function call).
    with tempfile.TemporaryDirectory(prefix="biasinspect-fuzz-") as folder:
        yield Path(folder)


def check_outcome(path: Path) -> None:
    """The contract: a list of descriptions, or a BiasInspectError with a one-line message."""
    try:
        descriptions = read_file(path)
    except BiasInspectError as error:
        message = str(error)
        assert message.strip(), type(error).__name__
        return
    assert isinstance(descriptions, list)
    assert all(isinstance(description, ModelDescription) for description in descriptions)
    # Analysis of whatever the reader accepted must not crash either.
    from biasinspect.analysis import analyze

    for description in descriptions:
        analyze(description)


@pytest.mark.parametrize("fmt", list(hf.FUZZ_FORMATS))
def test_seeds_are_valid(workdir, fmt):
    """Control: every unmutated seed is read without error and has at least one conv."""
    for index, seed in enumerate(hf.fuzz_seeds(fmt)):
        path = workdir / f"seed-{fmt}-{index}{hf.FUZZ_FORMATS[fmt]}"
        path.write_bytes(hf.finish_fuzz_case(fmt, seed))
        if fmt == "archive-differential":
            continue  # refused or unsafe by design: see test_differential_seeds_are_never_clean
        descriptions = read_file(path)
        assert descriptions, path
        assert sum(len(description.convs) for description in descriptions) >= 1, path


HDF5_FORMATS = [fmt for fmt in hf.FUZZ_FORMATS if fmt.startswith("keras")]
"""Formats parsed by libhdf5 in the isolated child: fewer examples (each costs a round trip, and
a mutant that sends libhdf5 into an endless loop costs the parser's timeout)."""


@pytest.mark.parametrize("fmt", [fmt for fmt in hf.FUZZ_FORMATS if fmt not in HDF5_FORMATS])
@given(data=st.data())
def test_mutants_end_in_a_report_or_a_clean_error(workdir, fmt, data):
    _mutant_case(workdir, fmt, data)


@pytest.fixture(scope="module")
def short_h5_timeout() -> Iterator[None]:
    from biasinspect.readers import h5_isolated

    saved = h5_isolated.H5_TIMEOUT_SECONDS
    h5_isolated.H5_TIMEOUT_SECONDS = 5.0
    yield
    h5_isolated.H5_TIMEOUT_SECONDS = saved


@pytest.mark.parametrize("fmt", HDF5_FORMATS)
@settings(max_examples=40)
@given(data=st.data())
def test_hdf5_mutants_end_in_a_report_or_a_clean_error(workdir, short_h5_timeout, fmt, data):
    """Mutated Keras HDF5 files: libhdf5 crashes and endless loops (both happen) are clean errors."""
    _mutant_case(workdir, fmt, data)


def _mutant_case(workdir: Path, fmt: str, data: st.DataObject) -> None:
    seeds = hf.fuzz_seeds(fmt)
    seed = seeds[data.draw(st.integers(0, len(seeds) - 1), label="seed")]
    mutations = data.draw(st.lists(MUTATION, min_size=1, max_size=4), label="mutations")
    mutated = hf.apply_mutations(seed, mutations, hf.all_fuzz_donors())
    path = workdir / f"mutant{hf.FUZZ_FORMATS[fmt]}"
    path.write_bytes(hf.finish_fuzz_case(fmt, mutated))
    check_outcome(path)


# --- generated folder trees: links in and out of the folder, control characters -------------------


@pytest.mark.parametrize("kind", ["links", "control-characters"])
@settings(max_examples=20)
@given(seed=st.integers(0, 2**32 - 1))
def test_generated_trees_keep_every_cli_promise(kind, seed):
    """Scans of generated trees (tests/tree_cases.py): nothing outside the folder is read or
    printed, every line stays printable, every bad path is one line, the exit code matches."""
    import random

    import tree_cases

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="biasinspect-tree-") as base:
        build = tree_cases.build_link_tree if kind == "links" else tree_cases.build_control_tree
        tree = build(Path(base), rng)
        assert tree_cases.cli_violations(tree) == []


def test_differential_seeds_are_never_clean(workdir):
    """Control for the archive-differential seeds: unmutated, each is refused or reported with an
    unsafe callable -- never a clean model."""
    for index, seed in enumerate(hf.differential_seeds()):
        path = workdir / f"differential-{index}.pt"
        path.write_bytes(seed)
        try:
            descriptions = read_file(path)
        except BiasInspectError as error:
            assert "refused as unsafe" in str(error), error
            continue
        assert all(description.unsafe_callables for description in descriptions), path


@pytest.mark.parametrize("kind", list(ho.STRUCTURED))
@settings(max_examples=12)
@given(seed=st.integers(0, 2**32 - 1))
def test_generated_onnx_graphs_end_in_a_report_or_a_clean_error(workdir, kind, seed):
    """Generated (not mutated) ONNX graphs of hostile shape: function-call bombs of random depth
    and fan-out, growth under shape inference's data propagation, very wide fan-ins and long
    chains.  Each must end in a report or a clean error, within the module's timeout."""
    path = workdir / f"{kind}.onnx"
    path.write_bytes(ho.STRUCTURED[kind](random.Random(seed)))
    check_outcome(path)
