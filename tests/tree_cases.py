"""Generated folder trees for fuzzing the command line: link trees and control characters.

Two generators, each deterministic for a given ``random.Random``:

* :func:`build_link_tree` -- a scanned folder holding models, sub-folders and symbolic links of
  every kind: to files inside (relative, absolute, through other links), to files and folders
  outside (a "secret" file among them), dangling links, link loops, a link to the folder itself;
* :func:`build_control_tree` -- models and broken files whose names, tensor names, pickle global
  names and error reasons carry control characters (ESC, BEL, CR/LF, C1, DEL, bidi overrides,
  U+2028/2029) and markdown/CSV metacharacters.

:func:`cli_violations` runs the CLI on such a folder in every output format and lists every
broken promise: a non-printable character in any output line, an error line that is not
``biasinspect: PATH: reason``, an exit code other than 0/1/2, bytes of the secret in any
output, a followed link out of the folder, a model reported from outside the folder.
Used by tests/test_fuzz.py (a few derandomized examples) and benchmarks/fuzz_long.py (many).
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

SECRET = bytes(range(0x9A, 0xFA)) + b"hunter2-password-AKIA1234567890"
"""Stands for a file outside the folder that must never be read (a key, /etc/shadow)."""

LINK_OUT = "symbolic link leading outside the scanned folder: not followed (name the file itself to read it)"

HOSTILE_CHARS = (
    "\x1b]0;pwned\x07", "\x1b[2J", "\n", "\r", "\t", "\x00", "\x08", "\x9b", "\x85", "\x7f",
    "\u202e", "\u2066", "\u200f", "\u2028", "\u2029", "\ufeff", "|", "=", "\\", "\udcff",
)  # fmt: skip
"""Pieces a generated name is made of, besides letters (\\x00 only in tensor and global names;
the lone surrogate in a file name is the undecodable byte 0xff)."""

MODEL_SUFFIXES = (".onnx", ".pt", ".pth", ".bin", ".safetensors", ".pkl", ".ckpt")


def safetensors_bytes(shapes: dict[str, list[int]], dtype: str = "F32") -> bytes:
    """A safetensors file of zeros with tensors of these shapes (names may hold anything)."""
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(offset)


def _binunicode(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def unsafe_pickle_bytes(module: str, name: str) -> bytes:
    """A protocol-4 pickle calling ``module.name('x')`` (STACK_GLOBAL, so names may hold newlines)."""
    return b"\x80\x04" + _binunicode(module) + _binunicode(name) + b"\x93" + _binunicode("x") + b"\x85R."


def leaked_forms(data: bytes) -> set[str]:
    """Ways bytes of ``data`` could appear in a message: text, hex, integers read from them."""
    forms: set[str] = set()
    for start in range(len(data) - 3):
        chunk = data[start : start + 4]
        if chunk.isascii() and chunk.decode().isalnum() and not chunk.isdigit():
            forms.add(chunk.decode())  # (digits as text are left to the integer forms)
        forms.update((chunk.hex(), chunk.hex(" ")))
        for width in (2, 4, 8):
            piece = data[start : start + width]
            if len(piece) == width:
                for order in ("little", "big"):
                    value = int.from_bytes(piece, order)  # type: ignore[arg-type]
                    if value >= 1000:
                        forms.update((str(value), f"{value:,}"))
        varint, shift = 0, 0
        for byte in data[start : start + 10]:  # a protobuf varint starting here
            varint |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if varint >= 1000:
            forms.update((str(varint), f"{varint:,}"))
    return forms


_SECRET_FORMS = leaked_forms(SECRET)


@dataclass
class Tree:
    """A generated scan folder and what the CLI must say about it."""

    root: Path
    links_out: set[str] = field(default_factory=set)
    """Paths (as the scan prints them) of links that lead outside: each gets one LINK_OUT line."""


def _name(rng: random.Random, hostile: bool, *, for_file: bool) -> str:
    parts = []
    for _ in range(rng.randint(1, 4)):
        if hostile and rng.random() < 0.5:
            piece = rng.choice(HOSTILE_CHARS)
            if for_file and piece == "\x00":
                piece = "\x1b"  # the one character no file name can hold (besides "/")
            parts.append(piece)
        else:
            parts.append(rng.choice(("conv", "w", "a", "m", "layer", "0")))
    return "".join(parts).replace("/", "_")


def _unique(folder: Path, stem: str, suffix: str) -> Path:
    path = folder / f"{stem}{suffix}"
    counter = 0
    while os.path.lexists(path):
        counter += 1
        path = folder / f"{stem}-{counter}{suffix}"
    return path


def _good_model(rng: random.Random, hostile_names: bool) -> bytes:
    prefix = _name(rng, hostile_names, for_file=False) if hostile_names else "conv"
    channels = rng.randint(1, 4)
    return safetensors_bytes({f"{prefix}.weight": [channels, 2, 3, 3], f"{prefix}.bias": [channels]})


def build_link_tree(base: Path, rng: random.Random) -> Tree:
    """A scan folder under ``base`` with models, sub-folders and links of every kind."""
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    (outside / "model.safetensors").write_bytes(_good_model(rng, False))
    root = base / "scan"
    root.mkdir()
    tree = Tree(root)
    folders = [root]
    files: list[Path] = []
    for _ in range(rng.randint(0, 3)):
        sub = _unique(rng.choice(folders), rng.choice(("sub", "nested", "m")), "")
        sub.mkdir()
        folders.append(sub)
    for _ in range(rng.randint(1, 4)):
        path = _unique(rng.choice(folders), "model", rng.choice((".safetensors", ".bin")))
        path.write_bytes(_good_model(rng, False))
        files.append(path)
    for _ in range(rng.randint(1, 8)):
        folder = rng.choice(folders)
        link = _unique(folder, rng.choice(("link", "l", "weights")), rng.choice(MODEL_SUFFIXES))
        kind = rng.choice(("inside", "inside-abs", "secret", "outside-model", "dangling", "loop",
                           "outside-dir", "inside-dir", "root", "chain-out", "chain-in", "self-dir"))  # fmt: skip
        if kind == "inside":
            link.symlink_to(os.path.relpath(rng.choice(files), folder))
        elif kind == "inside-abs":
            link.symlink_to(rng.choice(files))
        elif kind == "secret":
            link.symlink_to(outside / "secret")
            tree.links_out.add(str(link))
        elif kind == "outside-model":
            link.symlink_to(os.path.relpath(outside / "model.safetensors", folder))
            tree.links_out.add(str(link))
        elif kind == "dangling":
            link.symlink_to(folder / "missing-target.onnx")
        elif kind == "loop":
            partner = _unique(folder, "loop", ".pt")
            link.symlink_to(partner.name)
            partner.symlink_to(link.name)
        elif kind == "outside-dir":
            link.symlink_to(outside)
        elif kind == "inside-dir":
            link.symlink_to(rng.choice(folders))
        elif kind == "root":
            link.symlink_to(root)
        elif kind == "self-dir":
            link.symlink_to(".")
        elif kind in ("chain-out", "chain-in"):
            hop = _unique(rng.choice(folders), "hop", ".bin")
            target = outside / "secret" if kind == "chain-out" else rng.choice(files)
            hop.symlink_to(target)
            link.symlink_to(hop)
            if kind == "chain-out":
                tree.links_out.update((str(link), str(hop)))
    return tree


def build_control_tree(base: Path, rng: random.Random) -> Tree:
    """A scan folder whose file names, tensor names, global names and reasons hold control characters."""
    root = base / "scan"
    root.mkdir()
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(("good", "good-hostile-names", "bad-dtype", "empty", "text", "unsafe-pickle"))
        stem = _name(rng, True, for_file=True)
        if kind == "unsafe-pickle":
            path = _unique(root, stem, rng.choice((".pkl", ".bin")))
            path.write_bytes(
                unsafe_pickle_bytes(_name(rng, True, for_file=False), _name(rng, True, for_file=False))
            )
            continue
        path = _unique(root, stem, rng.choice(MODEL_SUFFIXES))
        if kind == "good":
            path.write_bytes(_good_model(rng, False))
        elif kind == "good-hostile-names":
            path.write_bytes(_good_model(rng, True))
        elif kind == "bad-dtype":
            bad_dtype = "F32" + _name(rng, True, for_file=False)
            path.write_bytes(safetensors_bytes({"w.weight": [1, 1, 1, 1]}, dtype=bad_dtype))
        elif kind == "empty":
            path.write_bytes(b"")
        else:
            path.write_bytes(("text " + _name(rng, True, for_file=False) + "\n").encode("utf-8", "replace"))
    return tree_of(root)


def tree_of(root: Path) -> Tree:
    """A :class:`Tree` with no links out."""
    return Tree(root)


def _printable_lines(text: str) -> bool:
    return all(line.isprintable() for line in text.split("\n"))


def cli_violations(tree: Tree) -> list[str]:
    """Run the CLI on ``tree.root`` in every format; every broken promise, as a list of strings."""
    from biasinspect.cli import main
    from biasinspect.render import printable

    problems: list[str] = []
    runs = [("table",), ("markdown",), ("csv",), ("json",), ("table", "--fail-on", "unsafe")]
    expected_link_lines = {f"biasinspect: {printable(path)}: {LINK_OUT}" for path in tree.links_out}
    for fmt, *extra in runs:
        out, err = io.StringIO(), io.StringIO()
        code = main([str(tree.root), "-f", fmt, *extra], stdout=out, stderr=err)
        stdout, stderr = out.getvalue(), err.getvalue()
        label = " ".join([fmt, *extra])
        # The folder's own path (a temporary name, a case number) is not the secret's bytes.
        without_root = (
            "".join(stdout + stderr).replace(str(tree.root), "").replace(json.dumps(str(tree.root))[1:-1], "")
        )
        if code not in (0, 1, 2):
            problems.append(f"{label}: exit code {code}")
        if not _printable_lines(stdout) or not _printable_lines(stderr):
            problems.append(f"{label}: a non-printable character reached the output")
        lines = stderr.splitlines()
        if any(not line.startswith("biasinspect: ") for line in lines):
            problems.append(f"{label}: a stderr line is not 'biasinspect: ...': {lines!r}")
        missing = expected_link_lines - set(lines)
        if missing:
            problems.append(f"{label}: links out of the folder not reported: {sorted(missing)!r}")
        if (code == 2) != any(not line.startswith("biasinspect: policy: ") for line in lines):
            problems.append(f"{label}: exit code {code} does not match the error lines")
        leaked = [form for form in _SECRET_FORMS if form in without_root]
        if leaked:
            problems.append(f"{label}: bytes of the file outside the folder were printed: {leaked[:5]!r}")
        if fmt == "json":
            document = json.loads(stdout)
            root = os.path.realpath(tree.root)
            for model in document["models"]:
                real = os.path.realpath(model["path"])
                if os.path.commonpath([root, real]) != root:
                    problems.append(f"json: a model outside the folder was read: {model['path']!r}")
            if len(document["errors"]) != len(lines) - sum(
                line.startswith("biasinspect: policy: ") for line in lines
            ):
                problems.append("json: errors and stderr lines disagree")
    return problems
