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
"num_text", "num_visual", "autocorr_rank", "autocorr_share", "autocorr_tail"}]`` (the tail trace:
optional, null = unknown). Arrays: ``ids`` <i4 [N, k],
``logprobs`` <f4 [N, k], ``tail`` <f4 [N] with N = sum(num_text + num_visual) rows ordered sample by
sample, text rows then visual rows; and each image sample's normalised autocorrelation as its
low-rank factor (ckd_common.targets.AutocorrFactor), in sample order: ``autocorr_codes`` |i1
[sum rank * num_visual] (sample by sample, the rank x Nv codes row-major: row j is column j of U),
``autocorr_scale`` <f4 [sum rank]. A sample without ``autocorr_rank`` (or null) has no
autocorrelation. Wire version 2; version 1 sent the float32 upper triangle instead.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from ckd_common.targets import AutocorrFactor, SampleTargets, SparseTopK

REQUEST_MAGIC = b"CKDQ"
RESPONSE_MAGIC = b"CKDR"
WIRE_VERSION = 2  # 2: the autocorrelation travels as its int8 low-rank factor
CONTENT_TYPE_REQUEST = "application/x-ckd-targets-request"
CONTENT_TYPE_RESPONSE = "application/x-ckd-targets"
MAX_HEADER_BYTES = 64 << 20  # a header this large is a broken or hostile frame, not a real request
MAX_NDIM = 8  # the frames hold vectors and matrices; more dimensions than this is no real frame
_ARRAY_KINDS = "biuf"  # booleans, integers and floats; no objects, strings, records or complex numbers
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
    except RecursionError:  # e.g. 100k nested brackets: json's parser gives up at Python's recursion limit
        raise WireError("header JSON is nested too deeply") from None
    except ValueError as e:
        raise WireError(f"header is not JSON ({e})") from None
    if not (isinstance(header, dict) and isinstance(header.get("meta"), dict)
            and isinstance(header.get("arrays"), list)):
        raise WireError("header is not the expected JSON object with 'meta' (an object) and 'arrays' (a list)")
    meta, specs = header["meta"], header["arrays"]
    off = _PREFIX.size + hlen
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        name, dtype, shape = _array_spec(spec, len(buf))
        if name in arrays:
            raise WireError(f"array {name!r} appears twice in the header")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow however large the claim
        if nbytes > len(buf) - off:
            raise WireError(f"array {name!r} ({nbytes} bytes at offset {off}) runs past the end of the "
                            f"{len(buf)}-byte body (truncated upload?)")
        arrays[name] = np.frombuffer(buf[off:off + nbytes], dtype=dtype).reshape(shape)
        off += nbytes + _pad(nbytes)
    return meta, arrays


def _array_spec(spec, body_bytes: int) -> tuple[str, np.dtype, tuple[int, ...]]:
    """One entry of header["arrays"], checked: a name, a plain numeric dtype, a shape of at most
    MAX_NDIM non-negative integers none larger than the body (a non-empty array cannot be)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise WireError(f"array spec {str(spec)[:200]} is not an object with a string 'name'")
    name, shape = spec["name"], spec.get("shape")
    try:
        dtype = np.dtype(spec.get("dtype"))
    except (TypeError, ValueError) as e:
        raise WireError(f"array {name!r}: dtype {str(spec.get('dtype'))[:50]!r} is not a numpy dtype ({e})") from None
    if (dtype.kind not in _ARRAY_KINDS or dtype.subdtype is not None or dtype.byteorder == ">"
            or dtype.itemsize > 8):
        raise WireError(f"array {name!r}: dtype {dtype.str!r} is not allowed (little-endian booleans, integers "
                        f"or floats)")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= max(body_bytes, 1 << 16)
                       for d in shape)):
        raise WireError(f"array {name!r}: shape {str(shape)[:100]} is not a list of at most {MAX_NDIM} "
                        f"dimensions in [0, {max(body_bytes, 1 << 16)}] (the body's size)")
    return name, dtype, tuple(shape)


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


def _int(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"{what} must be an integer, not {str(value)[:50]!r}")
    return value


def _vector(arrays: dict[str, np.ndarray], name: str, length: int, what: str, kinds: str, dtype: str) -> np.ndarray:
    """A 1-D array of the expected kind: a 2-D or float ``input_ids`` would otherwise pass the
    count check and be cast (1.5 -> 1), and then fail the batch it joins in the engine."""
    a = _require(arrays, name, length, what)
    if a.ndim != 1 or a.dtype.kind not in kinds:
        raise WireError(f"array {name!r} must be 1-D {dtype}; got {a.dtype.str} with shape {list(a.shape)}")
    return a


def decode_request(data: bytes | bytearray | memoryview) -> TargetsRequest:
    """Frame -> TargetsRequest. Checks framing, counts, shapes and dtypes; the server checks the content."""
    meta, arrays = decode_frame(data, REQUEST_MAGIC)
    try:
        k = _int(meta["k"], "k")
        vocab_limit = None if meta.get("vocab_limit") is None else _int(meta["vocab_limit"], "vocab_limit")
        template = meta.get("template")
        if template is not None and not isinstance(template, str):
            raise WireError(f"template must be a string or null, not {str(template)[:50]!r}")
        metas = meta["samples"]
        if not isinstance(metas, list) or not all(isinstance(m, dict) for m in metas):
            raise WireError("samples must be a list of objects")
        lengths = [_int(m["length"], f"samples[{i}].length") for i, m in enumerate(metas)]
        nresp = [_int(m["num_response"], f"samples[{i}].num_response") for i, m in enumerate(metas)]
        nimg = [_int(m["image_bytes"], f"samples[{i}].image_bytes") for i, m in enumerate(metas)]
    except KeyError as e:
        raise WireError(f"request header is missing the field {e}") from None
    if any(x < 0 for x in lengths + nresp):
        raise WireError("negative length or num_response in the request header")
    ids = _vector(arrays, "input_ids", sum(lengths), "sample lengths", "iu", "integers (<i4)")
    resp = _vector(arrays, "response_positions", sum(nresp), "num_response", "iu", "integers (<i4)")
    images = _vector(arrays, "images", sum(max(n, 0) for n in nimg), "image_bytes", "u", "bytes (|u1)")
    if images.dtype.itemsize != 1:
        raise WireError(f"array 'images' must be 1-D bytes (|u1); got {images.dtype.str}")
    samples, a, b, c = [], 0, 0, 0
    for i, (m, n, r, ni) in enumerate(zip(metas, lengths, nresp, nimg)):
        try:
            key, sid = str(m["key"]), str(m.get("id", ""))
            vs = _int(m.get("visual_start", -1), f"samples[{i}].visual_start")
            nv = _int(m.get("num_visual", 0), f"samples[{i}].num_visual")
        except KeyError as e:
            raise WireError(f"samples[{i}] is missing the field {e}") from None
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


@dataclass
class TargetsResponse:
    targets: list[SampleTargets]
    k: int
    vocab_limit: int
    teacher_fingerprint: str = ""


def encode_response(resp: TargetsResponse) -> bytes:
    """Targets -> frame. A dense autocorrelation (the teacher's oracle path) is factorised here,
    on the host: servers hand over AutocorrFactors, so this costs them nothing."""
    k = int(resp.k)
    metas, ids, lps, tails, codes, scales = [], [], [], [], [], []
    for s in resp.targets:
        nv = s.visual.num_positions if s.visual is not None else 0
        m = {"key": s.key, "num_text": s.text.num_positions, "num_visual": nv}
        for part in (s.text, s.visual):
            if part is not None:
                ids.append(part.ids)
                lps.append(part.logprobs)
                tails.append(part.tail)
        if s.autocorr is not None:
            f = _as_factor(s.autocorr)
            if f.num_visual != nv:
                raise ValueError(f"sample {s.key}: autocorr factor has {f.num_visual} rows, {nv} visual positions")
            m.update(autocorr_rank=f.rank, autocorr_share=f.share, autocorr_tail=f.tail_trace)
            codes.append(f.codes.reshape(-1))
            scales.append(f.scale)
        metas.append(m)
    cat = (lambda xs, dt, shape: np.concatenate([np.asarray(x, dtype=dt) for x in xs]) if xs
           else np.zeros(shape, dt))
    arrays = {"ids": cat(ids, "<i4", (0, k)), "logprobs": cat(lps, "<f4", (0, k)), "tail": cat(tails, "<f4", (0,)),
              "autocorr_codes": cat(codes, "|i1", (0,)), "autocorr_scale": cat(scales, "<f4", (0,))}
    meta = {"k": k, "vocab_limit": int(resp.vocab_limit), "teacher_fingerprint": resp.teacher_fingerprint,
            "samples": metas}
    return encode_frame(RESPONSE_MAGIC, meta, arrays)


def _as_factor(autocorr) -> AutocorrFactor:
    if isinstance(autocorr, AutocorrFactor):
        return autocorr
    from ckd_common.kd.relation import factor_dense  # torch: only for the dense oracle path

    return factor_dense(autocorr)


def decode_response(data: bytes | bytearray | memoryview) -> TargetsResponse:
    """Frame -> TargetsResponse with SampleTargets that own their memory."""
    meta, arrays = decode_frame(data, RESPONSE_MAGIC)
    try:
        k = int(meta["k"])
        metas = list(meta["samples"])
        counts = [(str(m["key"]), int(m["num_text"]), int(m["num_visual"]),
                   None if m.get("autocorr_rank") is None else int(m["autocorr_rank"]),
                   float(m.get("autocorr_share") or 0.0),
                   None if m.get("autocorr_tail") is None else float(m["autocorr_tail"])) for m in metas]
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"response header is missing or has a malformed field ({e})") from None
    if any(r is not None and (r < 0 or r > nv or not 0.0 <= s <= 1.0) for _, _, nv, r, s, _ in counts):
        raise WireError("response header: an autocorr_rank outside [0, num_visual] or a share outside [0, 1]")
    if any(t is not None and not np.isfinite(t) for *_, t in counts):
        raise WireError("response header: an autocorr_tail that is not a finite number")
    rows = sum(t + v for _, t, v, _, _, _ in counts)
    ids = _require(arrays, "ids", rows, "num_text + num_visual")
    lps = _require(arrays, "logprobs", rows, "num_text + num_visual")
    tail = _require(arrays, "tail", rows, "num_text + num_visual")
    codes = _require(arrays, "autocorr_codes", sum(v * r for _, _, v, r, _, _ in counts if r), "autocorr sizes")
    scale = _require(arrays, "autocorr_scale", sum(r for _, _, _, r, _, _ in counts if r), "autocorr ranks")
    if ids.ndim != 2 or ids.shape[1] != k or lps.shape != ids.shape:
        raise WireError(f"ids {ids.shape} / logprobs {lps.shape} are not [N, k={k}]")
    if codes.dtype != np.int8 or scale.dtype != np.float32:
        raise WireError(f"autocorr_codes {codes.dtype} / autocorr_scale {scale.dtype} must be |i1 / <f4")
    out, row, a, c = [], 0, 0, 0
    for key, nt, nv, rank, share, tail_trace in counts:
        text = SparseTopK(ids[row:row + nt].astype(np.int64), lps[row:row + nt].copy(), tail[row:row + nt].copy())
        row += nt
        visual = autocorr = None
        if nv:
            visual = SparseTopK(ids[row:row + nv].astype(np.int64), lps[row:row + nv].copy(),
                                tail[row:row + nv].copy())
            row += nv
        if rank is not None and nv:
            autocorr = AutocorrFactor(codes[a:a + rank * nv].reshape(rank, nv).copy(), scale[c:c + rank].copy(), share,
                                      tail_trace)
            a, c = a + rank * nv, c + rank
        out.append(SampleTargets(key, text, visual, autocorr))
    return TargetsResponse(out, k, int(meta.get("vocab_limit") or 0), str(meta.get("teacher_fingerprint", "")))


__all__ = ["WireError", "WireSample", "TargetsRequest", "TargetsResponse", "encode_request", "decode_request",
           "encode_response", "decode_response", "encode_frame", "decode_frame", "CONTENT_TYPE_REQUEST",
           "CONTENT_TYPE_RESPONSE", "WIRE_VERSION"]
