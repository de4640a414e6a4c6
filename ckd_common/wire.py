"""Binary encoding of the teacher server's POST /v1/targets request and response.

Both the server (teacher_server) and its client (teacher_server.client, used by deploy.fill) use
this module, which is why it lives in ckd_common, next to the JSON models (ckd_common.protocol).
Arrays travel as raw little-endian bytes, never as JSON lists of floats (docs/environment.md: ~100x
faster).

Frame (every integer little-endian)::

    offset 0   4 bytes   magic: b"CKDQ" (request) or b"CKDR" (response)
    offset 4   uint32    wire version (WIRE_VERSION)
    offset 8   uint32    H = byte length of the header
    offset 12  H bytes   header: UTF-8 JSON, padded with spaces so that 12 + H is a multiple of 8
    then       for each entry of header["arrays"], in order: its raw bytes (C order), each padded
               with zero bytes to a multiple of 8 so every array starts 8-byte aligned

``header["arrays"]`` = ``[{"name", "dtype" (numpy dtype string, e.g. "<i4"), "shape"}]``;
``header["meta"]`` holds the message-specific fields below. teacher_server/PROTOCOL.md has the
field tables and a worked example.

Request meta: ``k``, ``vocab_limit`` (null = the server's common vocabulary), ``template`` (null =
do not check keys) and ``samples`` = ``[{"key", "id", "length", "visual_start", "num_visual",
"num_response", "image_bytes"}]``. Arrays: ``input_ids`` <i4 [sum length], ``response_positions``
<i4 [sum num_response], ``images`` |u1 [sum image_bytes] (the image FILES' bytes, e.g. PNG: the
server decodes and preprocesses them, so the key's image hash is checkable).

Response meta: ``k``, ``vocab_limit``, ``teacher_fingerprint`` and ``samples`` = ``[{"key",
"num_text", "num_visual"}]``. Arrays: ``ids`` <i4 [N, k], ``logprobs`` <f4 [N, k], ``tail`` <f4 [N]
with N = sum(num_text + num_visual) rows ordered sample by sample, text rows then visual rows; and
``autocorr`` <f4 [sum Nv(Nv+1)/2]: the upper triangle (diagonal included, row-major) of each image
sample's normalised autocorrelation, in sample order.
"""
from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass

import numpy as np

from ckd_common.targets import SampleTargets, SparseTopK

REQUEST_MAGIC = b"CKDQ"
RESPONSE_MAGIC = b"CKDR"
WIRE_VERSION = 1
CONTENT_TYPE_REQUEST = "application/x-ckd-targets-request"
CONTENT_TYPE_RESPONSE = "application/x-ckd-targets"
MAX_HEADER_BYTES = 64 << 20  # a header this large is a broken or hostile frame, not a real request
_PREFIX = struct.Struct("<4sII")
_ALIGN = 8


class WireError(ValueError):
    """A frame that cannot be decoded; the message says what is wrong with it."""


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def encode_frame(magic: bytes, meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """Frame = prefix + JSON header + aligned raw arrays (see the module docstring)."""
    parts: list = []
    specs = []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
        specs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape)})
        parts.append(a.reshape(-1).view(np.uint8))  # joined below: the array's bytes are copied once
        parts.append(b"\0" * _pad(a.nbytes))
    header = json.dumps({"meta": meta, "arrays": specs}, separators=(",", ":")).encode()
    header += b" " * _pad(_PREFIX.size + len(header))
    return b"".join([_PREFIX.pack(magic, WIRE_VERSION, len(header)), header, *parts])


def decode_frame(data: bytes | bytearray | memoryview, magic: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Inverse of :func:`encode_frame`. Arrays are read-only views into ``data`` (no copy)."""
    buf = memoryview(data)
    if len(buf) < _PREFIX.size:
        raise WireError(f"body of {len(buf)} bytes is shorter than the {_PREFIX.size}-byte frame prefix")
    got_magic, version, hlen = _PREFIX.unpack_from(buf, 0)
    if got_magic != magic:
        raise WireError(f"bad magic {bytes(got_magic)!r}, expected {magic!r} (is this a ckd targets frame?)")
    if version != WIRE_VERSION:
        raise WireError(f"wire version {version} is not supported (this side speaks {WIRE_VERSION})")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(buf):
        raise WireError(f"header length {hlen} does not fit a body of {len(buf)} bytes")
    try:
        header = json.loads(bytes(buf[_PREFIX.size:_PREFIX.size + hlen]))
        meta, specs = header["meta"], header["arrays"]
    except (ValueError, KeyError, TypeError) as e:
        raise WireError(f"header is not the expected JSON object with 'meta' and 'arrays' ({e})") from None
    off = _PREFIX.size + hlen
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        try:
            name, dtype, shape = spec["name"], np.dtype(spec["dtype"]), tuple(int(s) for s in spec["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise WireError(f"array spec {spec!r} is malformed ({e})") from None
        if dtype.hasobject or any(s < 0 for s in shape):
            raise WireError(f"array {name!r}: dtype {dtype} / shape {shape} not allowed")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if off + nbytes > len(buf):
            raise WireError(f"array {name!r} ({nbytes} bytes at offset {off}) runs past the end of the "
                            f"{len(buf)}-byte body (truncated upload?)")
        arrays[name] = np.frombuffer(buf[off:off + nbytes], dtype=dtype).reshape(shape)
        off += nbytes + _pad(nbytes)
    return meta, arrays


def _require(arrays: dict[str, np.ndarray], name: str, length: int, what: str) -> np.ndarray:
    a = arrays.get(name)
    if a is None:
        raise WireError(f"array {name!r} is missing")
    if a.ndim < 1 or a.shape[0] != length:
        raise WireError(f"array {name!r} has shape {a.shape}; the header's {what} sum to {length}")
    return a


# ---------------------------------------------------------------------------------------------
# requests


@dataclass
class WireSample:
    """One prepared sample as the client sends it (image as the file's bytes, or None)."""

    key: str
    input_ids: np.ndarray            # int [L]
    response_positions: np.ndarray   # int [R], ascending
    visual_start: int = -1
    num_visual: int = 0
    image: bytes | None = None
    id: str = ""

    @property
    def length(self) -> int:
        return int(len(self.input_ids))


@dataclass
class TargetsRequest:
    samples: list[WireSample]
    k: int
    vocab_limit: int | None = None
    template: str | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.samples)


def encode_request(req: TargetsRequest) -> bytes:
    meta = {"k": int(req.k), "vocab_limit": req.vocab_limit, "template": req.template, "samples": [
        {"key": s.key, "id": s.id, "length": s.length, "visual_start": int(s.visual_start),
         "num_visual": int(s.num_visual), "num_response": int(len(s.response_positions)),
         "image_bytes": len(s.image) if s.image is not None else -1} for s in req.samples]}
    cat = (lambda xs, dt: np.concatenate([np.asarray(x, dtype=dt) for x in xs]) if xs else np.zeros(0, dt))
    arrays = {
        "input_ids": cat([s.input_ids for s in req.samples], "<i4"),
        "response_positions": cat([s.response_positions for s in req.samples], "<i4"),
        "images": np.frombuffer(b"".join(s.image or b"" for s in req.samples), dtype=np.uint8),
    }
    return encode_frame(REQUEST_MAGIC, meta, arrays)


def decode_request(data: bytes | bytearray | memoryview) -> TargetsRequest:
    """Frame -> TargetsRequest. Checks framing and counts only; the server checks the content."""
    meta, arrays = decode_frame(data, REQUEST_MAGIC)
    try:
        k = int(meta["k"])
        vocab_limit = None if meta.get("vocab_limit") is None else int(meta["vocab_limit"])
        template = meta.get("template")
        metas = list(meta["samples"])
        lengths = [int(m["length"]) for m in metas]
        nresp = [int(m["num_response"]) for m in metas]
        nimg = [int(m["image_bytes"]) for m in metas]
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"request header is missing or has a malformed field ({type(e).__name__}: {e})") from None
    if any(x < 0 for x in lengths + nresp):
        raise WireError("negative length or num_response in the request header")
    ids = _require(arrays, "input_ids", sum(lengths), "sample lengths")
    resp = _require(arrays, "response_positions", sum(nresp), "num_response")
    images = _require(arrays, "images", sum(max(n, 0) for n in nimg), "image_bytes")
    samples, a, b, c = [], 0, 0, 0
    for m, n, r, ni in zip(metas, lengths, nresp, nimg):
        try:
            key, sid = str(m["key"]), str(m.get("id", ""))
            vs, nv = int(m.get("visual_start", -1)), int(m.get("num_visual", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise WireError(f"sample header {m!r} is malformed ({e})") from None
        img = None
        if ni >= 0:
            img = images[c:c + ni].tobytes()
            c += ni
        samples.append(WireSample(key, ids[a:a + n].astype(np.int64), resp[b:b + r].astype(np.int64),
                                  vs, nv, img, sid))
        a, b = a + n, b + r
    return TargetsRequest(samples, k, vocab_limit, template)


# ---------------------------------------------------------------------------------------------
# responses


@functools.lru_cache(maxsize=4)
def _triu_flat(nv: int) -> np.ndarray:
    """Flat indices of the upper triangle of an [nv, nv] matrix (one gather instead of two-array
    fancy indexing: ~5x faster at Nv = 728, where the server packs ~1 MB per image sample)."""
    rows, cols = np.triu_indices(nv)
    return rows * nv + cols


def triu_pack(r: np.ndarray) -> np.ndarray:
    """[Nv, Nv] symmetric -> upper triangle (diagonal included), row-major."""
    r = np.asarray(r)
    return np.take(r.reshape(-1), _triu_flat(r.shape[0]))


def triu_unpack(flat: np.ndarray, nv: int) -> np.ndarray:
    out = np.zeros((nv, nv), dtype=np.float32)
    iu = np.triu_indices(nv)
    out[iu] = flat
    out.T[iu] = flat
    return out


@dataclass
class TargetsResponse:
    targets: list[SampleTargets]
    k: int
    vocab_limit: int
    teacher_fingerprint: str = ""


def encode_response(resp: TargetsResponse) -> bytes:
    k = int(resp.k)
    metas, ids, lps, tails, acs = [], [], [], [], []
    for s in resp.targets:
        nv = s.visual.num_positions if s.visual is not None else 0
        metas.append({"key": s.key, "num_text": s.text.num_positions, "num_visual": nv,
                      "autocorr": s.autocorr is not None})
        for part in (s.text, s.visual):
            if part is not None:
                ids.append(part.ids)
                lps.append(part.logprobs)
                tails.append(part.tail)
        if s.autocorr is not None:
            acs.append(triu_pack(s.autocorr))
    cat = (lambda xs, dt, shape: np.concatenate([np.asarray(x, dtype=dt) for x in xs]) if xs
           else np.zeros(shape, dt))
    arrays = {"ids": cat(ids, "<i4", (0, k)), "logprobs": cat(lps, "<f4", (0, k)), "tail": cat(tails, "<f4", (0,)),
              "autocorr": cat(acs, "<f4", (0,))}
    meta = {"k": k, "vocab_limit": int(resp.vocab_limit), "teacher_fingerprint": resp.teacher_fingerprint,
            "samples": metas}
    return encode_frame(RESPONSE_MAGIC, meta, arrays)


def decode_response(data: bytes | bytearray | memoryview) -> TargetsResponse:
    """Frame -> TargetsResponse with SampleTargets that own their memory."""
    meta, arrays = decode_frame(data, RESPONSE_MAGIC)
    try:
        k = int(meta["k"])
        metas = list(meta["samples"])
        counts = [(str(m["key"]), int(m["num_text"]), int(m["num_visual"]),
                   bool(m.get("autocorr", m["num_visual"] > 0))) for m in metas]
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"response header is missing or has a malformed field ({e})") from None
    rows = sum(t + v for _, t, v, _ in counts)
    ids = _require(arrays, "ids", rows, "num_text + num_visual")
    lps = _require(arrays, "logprobs", rows, "num_text + num_visual")
    tail = _require(arrays, "tail", rows, "num_text + num_visual")
    ac = _require(arrays, "autocorr", sum(v * (v + 1) // 2 for _, _, v, a in counts if a), "autocorr sizes")
    if ids.ndim != 2 or ids.shape[1] != k or lps.shape != ids.shape:
        raise WireError(f"ids {ids.shape} / logprobs {lps.shape} are not [N, k={k}]")
    out, row, a = [], 0, 0
    for key, nt, nv, has_ac in counts:
        text = SparseTopK(ids[row:row + nt].astype(np.int64), lps[row:row + nt].copy(), tail[row:row + nt].copy())
        row += nt
        visual = autocorr = None
        if nv:
            visual = SparseTopK(ids[row:row + nv].astype(np.int64), lps[row:row + nv].copy(),
                                tail[row:row + nv].copy())
            row += nv
        if has_ac and nv:
            m = nv * (nv + 1) // 2
            autocorr = triu_unpack(ac[a:a + m], nv)
            a += m
        out.append(SampleTargets(key, text, visual, autocorr))
    return TargetsResponse(out, k, int(meta.get("vocab_limit") or 0), str(meta.get("teacher_fingerprint", "")))


__all__ = ["WireError", "WireSample", "TargetsRequest", "TargetsResponse", "encode_request", "decode_request",
           "encode_response", "decode_response", "encode_frame", "decode_frame", "CONTENT_TYPE_REQUEST",
           "CONTENT_TYPE_RESPONSE", "WIRE_VERSION"]
