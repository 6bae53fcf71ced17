"""Fixture helpers for the PyTorch reader tests: small torchvision-style models, hand-assembled
hostile pickles, and zip writers that can lie.

The model classes live at module level so that ``torch.save(model)`` can pickle them (as
``torch_builders.<Class>`` globals, which the reader reports as unknown).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 8 * 8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class UntiedNet(nn.Module):
    """The seed example: Conv2d(3, 32, 5, bias=False) + a [32, 28, 28] bias added in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 5, bias=False)
        self.bias = nn.Parameter(torch.zeros(32, 28, 28))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bias


class MixedNet(nn.Module):
    """Depthwise + grouped + transposed + 1d/3d convs in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1, bias=False)
        self.grouped = nn.Conv2d(16, 32, 3, groups=4)
        self.up = nn.ConvTranspose2d(32, 8, 4, stride=2, padding=1, groups=2)
        self.c1 = nn.Conv1d(4, 6, 5)
        self.c3 = nn.Conv3d(2, 4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.grouped(self.pw(self.dw(x))))


class ReducedWrapper:
    """Pickles like ``torch.compile``'s ``OptimizedModule``: ``__reduce__`` returns the class and
    ``(model, context)``, so the wrapped model is only an argument of a REDUCE in the pickle."""

    def __init__(self, model: nn.Module, context: dict[str, Any]) -> None:
        self.model = model
        self.context = context

    def __reduce__(self) -> tuple[Any, ...]:
        return (ReducedWrapper, (self.model, self.context))


class KeywordWrapper:
    """Pickled (protocol 4) as NEWOBJ_EX with the wrapped object as a keyword argument only."""

    __slots__ = ("_wrapped",)

    def __new__(cls, *, wrapped: object) -> KeywordWrapper:
        self = super().__new__(cls)
        self._wrapped = wrapped
        return self

    def __getnewargs_ex__(self) -> tuple[tuple[()], dict[str, object]]:
        return (), {"wrapped": self._wrapped}

    def __getstate__(self) -> None:
        return None


def make_models() -> dict[str, nn.Module]:
    """Small torchvision-style architectures, deterministic (seeded), in eval mode."""
    torch.manual_seed(0)
    return {
        "resnet": TinyResNet().eval(),
        "vgg": TinyVGG().eval(),
        "untied": UntiedNet().eval(),
        "mixed": MixedNet().eval(),
    }


# ---------------------------------------------------------------------------------------------
# Hand-written pickles
# ---------------------------------------------------------------------------------------------


def p0_call(module: str, name: str, arg: str) -> bytes:
    """Protocol 0: ``GLOBAL 'module name'`` + a one-string tuple + REDUCE."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n(" + _p0_str(arg) + b"tR."


def _p0_str(text: str) -> bytes:
    return b"S'" + text.encode().replace(b"\\", b"\\\\").replace(b"'", b"\\'") + b"'\n"


def p4_call(module: str, name: str, arg: str) -> bytes:
    """Protocol 4: STACK_GLOBAL + SHORT_BINUNICODE args + TUPLE1 + REDUCE."""
    return (
        b"\x80\x04" + _short_unicode(module) + _short_unicode(name) + b"\x93" + _binunicode(arg) + b"\x85R."
    )


def _short_unicode(text: str) -> bytes:
    raw = text.encode()
    assert len(raw) < 256
    return b"\x8c" + bytes([len(raw)]) + raw


def _binunicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def touch_command(marker: Path) -> str:
    """A shell command creating ``marker`` (only ever run if something executed the pickle)."""
    return f"touch '{marker}'"


def deep_list_pickle(depth: int) -> bytes:
    """``depth`` nested lists: EMPTY_LIST x depth then APPEND x (depth - 1)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def dup_bomb_pickle(levels: int, width: int) -> bytes:
    """Billion-laughs: each level is a list of ``width`` references to the previous level."""
    out = bytearray(b"\x80\x02]K\x00a")  # [0]
    for _ in range(levels):
        # MARK, the previous list DUP'd width times via memo, LIST
        out += b"q\x00(" + b"h\x00" * width + b"l"
    out += b"."
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Zips written byte by byte (so they can lie)
# ---------------------------------------------------------------------------------------------


def zip_bytes(members: list[tuple[str, bytes]], *, lie: dict[str, dict[str, Any]] | None = None) -> bytes:
    """A stored (uncompressed) zip.  ``lie[name]`` overrides local-header fields (``name``,
    ``method``, ``usize``, ``csize``, ``crc``) and, independently, central-directory fields
    (``c_usize``, ``c_csize``, ``c_crc``, ``c_offset``)."""
    lie = lie or {}
    body = bytearray()
    central = bytearray()
    for name, data in members:
        raw = name.encode()
        crc = zlib.crc32(data)
        fake = lie.get(name, {})
        offset = len(body)
        lname = fake.get("name", name).encode()
        body += (
            struct.pack(
                "<IHHHHHIIIHH",
                0x04034B50,
                20,
                0,
                fake.get("method", 0),
                0,
                0,
                fake.get("crc", crc),
                fake.get("csize", len(data)),
                fake.get("usize", len(data)),
                len(lname),
                0,
            )
            + lname
            + data
        )
        central += (
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                0,
                0,
                0,
                0,
                fake.get("c_crc", crc),
                fake.get("c_csize", len(data)),
                fake.get("c_usize", len(data)),
                len(raw),
                0,
                0,
                0,
                0,
                0,
                fake.get("c_offset", offset),
            )
            + raw
        )
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(body), 0)
    return bytes(body + central + eocd)


def deflate_bomb_member(megabytes: int) -> bytes:
    """Raw deflate stream of ``megabytes`` MiB of zeros, built by repeating one independently
    decodable (full-flushed) block, so building it costs almost nothing."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    return block * megabytes + final


def deflated_zip(name: str, stream: bytes, usize: int, crc: int = 0) -> bytes:
    """A one-member zip holding a raw deflate ``stream`` declared as ``usize`` bytes."""
    raw = name.encode()
    local = (
        struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(stream), usize, len(raw), 0) + raw
    )
    central = (
        struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            0,
            8,
            0,
            0,
            crc,
            len(stream),
            usize,
            len(raw),
            0,
            0,
            0,
            0,
            0,
            0,
        )
        + raw
    )
    body = local + stream
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(body), 0)
    return body + central + eocd
