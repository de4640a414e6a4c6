"""Test helper, not a test: hostile images written without ever holding their pixels in memory."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path


def png_of_zeros(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` black pixels: rows of zeros compress ~1000:1,
    so 20000 x 20000 (400 Mpx: a decompression bomb, 400 MB as 8-bit grey) takes ~48 KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def write_bomb(path: Path) -> Path:
    """The issue's decompression bomb: 20000 x 20000 in ~48 KB (above PIL's own 179 Mpx limit too)."""
    path.write_bytes(png_of_zeros(20000, 20000))
    return path


def write_over_limit(path: Path, max_pixels: int) -> Path:
    """A PNG one row taller than ``max_pixels`` allows at its width (PIL itself would open it)."""
    width = 4096
    path.write_bytes(png_of_zeros(width, max_pixels // width + 1))
    return path
