"""Resource caps: every reader stops with ResourceLimitError before crossing one of these.

They are documented in the README's security model; change both together.
"""

from __future__ import annotations

MAX_PICKLE_BYTES = 256 * 1024 * 1024
"""Largest pickle stream read (a torch zip's data.pkl, a legacy file's object pickle, a .pkl)."""

MAX_ZIP_MEMBER_BYTES = 256 * 1024 * 1024
"""Largest single zip member decompressed (only pickles and JSON/code text are ever read)."""

MAX_ZIP_TOTAL_BYTES = 512 * 1024 * 1024
"""Largest total decompressed from one archive."""

MAX_ZIP_RATIO = 200
"""Largest uncompressed/compressed ratio accepted for a deflated member (zip bombs)."""

MAX_ZIP_MEMBERS = 1_000_000
"""Largest number of central-directory entries."""

MAX_PICKLE_INT_BYTES = 1024
"""Largest integer a pickle may hold (8,192 bits, about 2,466 digits); models need 64 bits."""

MAX_MODEL_INT = (1 << 63) - 1
"""Largest value accepted for a dim, groups or other size read from a file (torch's int64)."""

MAX_PICKLE_OBJECTS = 5_000_000
"""Node budget for the inert unpickler and for walks over what it produced."""

MAX_CONTAINER_DEPTH = 1_000
"""Deepest nesting of containers followed when walking an unpickled object tree."""

MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024
"""Same cap as the safetensors library."""

MAX_JSON_BYTES = 64 * 1024 * 1024
"""Largest index.json or torch.export JSON read."""

MAX_PROTO_DEPTH = 100
"""Deepest protobuf message nesting followed in an ONNX file (protobuf's own default limit)."""

MAX_ONNX_STRIPPED_BYTES = 1024 * 1024 * 1024
"""Largest ONNX graph structure (after dropping tensor payloads) parsed; protobuf caps at 2 GiB."""

MAX_XML_BYTES = 64 * 1024 * 1024
"""Largest OpenVINO IR XML read (the XML holds structure only; weights live in the .bin)."""
MAX_ONNX_FUNCTION_INSTANCES = 10_000
"""Cap on model-local function call sites after expanding nested calls (a function calling another
twice, 30 levels deep, would otherwise mean 2**30 analyses -- and as many in ONNX shape inference)."""

MAX_ONNX_WALK_NODES = 5_000_000
"""Cap on nodes visited while walking the main graph, subgraphs and function instances."""

MAX_ONNX_FUNCTION_INFERENCE_NODES = 1_000_000
"""Cap on the function-body nodes given to shape inference over all call sites (each distinct
call site infers its function with the functions it calls).  Past it, the remaining call sites
are walked without inference (shapes there may be unknown) and a warning says so."""

MAX_ONNX_RANK = 64
"""Largest tensor rank ONNX shape inference may build (numpy's own limit); past it inference is
not run, or not with data propagation when only that could build it."""

MAX_ONNX_PROPAGATED_ELEMENTS = 1_024
"""Most values ONNX data propagation may hold for one tensor (shape vectors hold a handful)."""

MAX_ONNX_INFERRED_DIMS = 10_000_000
"""Most dims (and propagated values) ONNX shape inference may build over a whole model."""

MAX_SCAN_FILES = 100_000
"""Most files a folder scan will look at."""

MAX_DIM = 2**63 - 1
"""Largest dimension, group count or element count analysed (int64, what every format stores);
a reader's number past it is refused as unsupported rather than printed or multiplied."""

MAX_RANK = 64
"""Most dimensions in one shape analysed (real convs have 3 to 5)."""
MAX_FETCHED_BYTES = 1280 * 1024 * 1024
"""Most bytes fetched from one remote file (the largest cap above, an ONNX graph structure, plus
room for the blocks around it); a server ignoring Range requests is refused long before."""
