"""The teacher service: reading a body against its deadline, admission (caps, back-pressure),
validation of every sample, and the engine call. Routes stay thin; every failure is a
teacher_server.errors.ServerError."""
from __future__ import annotations

import asyncio
import io
import logging
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from starlette.requests import ClientDisconnect

from ckd_common.data import preprocess_image
from ckd_common.keys import image_hash, sample_key
from ckd_common.protocol import Info
from ckd_common.teacher import TeacherInput
from ckd_common.templates import TEMPLATES
from ckd_common.wire import (WIRE_VERSION, TargetsRequest, TargetsResponse, WireError, WireSample,
                             decode_request, encode_response)

from .config import ServerConfig
from .engines import Engine, EngineDescription, make_engine
from .errors import BadRequest, ClientClosed, InvalidSample, NotReady, Overloaded, PayloadTooLarge, RequestTimeout
from .metrics import Metrics

log = logging.getLogger("teacher_server")


def _describe(i: int, s: WireSample) -> str:
    return f"sample {i}" + (f" (id {s.id!r})" if s.id else "") + f" [key {s.key[:12]}...]"


class TeacherService:
    def __init__(self, config: ServerConfig, engine: Engine | None = None) -> None:
        self.cfg = config
        self.metrics = Metrics()
        self.engine = engine if engine is not None else make_engine(config, self.metrics)
        self.metrics.bind_engine(self.engine)
        self.desc: EngineDescription | None = None
        self.tokenizer_zip: bytes = b""
        self.load_error: str | None = None
        self.stopping = False
        self._inflight = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def load(self) -> None:
        t0 = time.perf_counter()
        desc = self.engine.load()
        self.tokenizer_zip = self._zip_tokenizer(desc.tokenizer)  # before /readyz says ready (desc set)
        self.desc = desc
        log.info("teacher %s loaded in %.1fs on %s (%s)", self.desc.model.fingerprint,
                 time.perf_counter() - t0, self.desc.device, self.desc.dtype)

    @staticmethod
    def _zip_tokenizer(tok) -> bytes:
        if tok is None:
            return b""
        buf = io.BytesIO()
        with tempfile.TemporaryDirectory() as d, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            tok.save_pretrained(d)
            for f in sorted(Path(d).iterdir()):
                z.write(f, f.name)
        return buf.getvalue()

    def close(self) -> None:
        self.stopping = True
        self.engine.close(drain=True)

    @property
    def ready(self) -> bool:
        return self.desc is not None and not self.stopping

    def require_ready(self) -> EngineDescription:
        if self.stopping:
            raise NotReady("the server is shutting down")
        if self.desc is None:
            raise NotReady("the teacher model is still loading" if self.load_error is None
                           else f"the teacher model failed to load: {self.load_error}")
        return self.desc

    @property
    def common_vocab(self) -> int:
        return self.require_ready().model.common_vocab

    def info(self) -> Info:
        d = self.require_ready()
        m = d.model
        return Info(engine=self.engine.name, teacher_fingerprint=m.fingerprint, tokenizer_hash=m.tokenizer_hash,
                    vocab_size=m.vocab_size, tokenizer_vocab_size=m.tokenizer_vocab_size,
                    common_vocab_size=self.common_vocab, hidden_size=m.hidden_size,
                    num_visual_tokens=m.num_visual_tokens, vision_strategy=m.vision_strategy,
                    image_size=m.image_size, image_aspect_ratio=m.image_aspect_ratio,
                    image_token_id=m.image_token_id, dtype=d.dtype, device=d.device,
                    max_k=self.cfg.max_k, max_batch_tokens=self.cfg.max_batch_tokens,
                    max_request_samples=self.cfg.max_request_samples,
                    max_request_tokens=self.cfg.max_request_tokens, max_body_bytes=self.cfg.max_body_bytes,
                    max_image_pixels=self.cfg.max_image_pixels,
                    supported_templates=sorted(TEMPLATES), target_kinds=list(d.target_kinds),
                    wire_version=WIRE_VERSION)

    # -- admission -----------------------------------------------------------------------------------
    def retry_after(self) -> float:
        """Seconds until the queue has drained, from the engine's recent throughput."""
        tps = self.engine.tokens_per_second()
        return min(30.0, max(1.0, self.engine.queued_tokens / tps)) if tps > 0 else 1.0

    @contextmanager
    def admit(self):
        """Bound the requests the engine side works on at once. Entered once the body has arrived: a
        client uploading slowly must not hold a slot (bodies being received are bounded by the
        connection cap, connections.py)."""
        if self._inflight >= self.cfg.max_inflight_requests:
            raise Overloaded(f"{self._inflight} requests in flight (limit {self.cfg.max_inflight_requests}); "
                             f"retry later", self.retry_after())
        self._inflight += 1
        self.metrics.inflight.inc()
        try:
            yield
        finally:
            self._inflight -= 1
            self.metrics.inflight.dec()

    async def read_body(self, request) -> bytes:
        """The request body, read by ``ServerConfig.body_deadline`` (408 after it) and within
        ``max_body_bytes`` (413)."""
        cap = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {cap} bytes; "
                                  f"send fewer samples per request")
        loop = asyncio.get_running_loop()
        started = loop.time()
        chunks, n = [], 0
        stream = request.stream().__aiter__()
        self.metrics.receiving.inc()
        try:
            while True:
                try:
                    async with asyncio.timeout_at(self.cfg.body_deadline(started, n)):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise RequestTimeout(
                        f"the request body did not arrive in time: {n} bytes in {loop.time() - started:.0f} s "
                        f"(the server allows --body-timeout {self.cfg.body_timeout_s:g} s plus 1 s per "
                        f"--min-upload-rate {self.cfg.min_upload_kib_s:g} KiB); send the body at once") from None
                n += len(chunk)
                if n > cap:  # chunked uploads have no Content-Length: enforce while reading
                    raise PayloadTooLarge(f"request body exceeds the limit of {cap} bytes; send fewer samples "
                                          f"per request")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientClosed(f"the client closed the connection after {n} bytes of the request body") from None
        finally:
            self.metrics.receiving.dec()
        return b"".join(chunks)

    # -- validation ----------------------------------------------------------------------------------
    def decode_and_check(self, body: bytes) -> tuple[TargetsRequest, list[TeacherInput], int]:
        """Framing, caps and every sample's content; runs in a worker thread (images decode here)."""
        d = self.require_ready()
        m = d.model
        try:
            req = decode_request(body)
        except WireError as e:
            raise BadRequest(f"malformed targets request: {e}") from None
        if not req.samples:
            raise InvalidSample("the request holds no samples")
        if len(req.samples) > self.cfg.max_request_samples:
            raise PayloadTooLarge(f"{len(req.samples)} samples in one request exceed the limit of "
                                  f"{self.cfg.max_request_samples}; split the request")
        if req.num_tokens > self.cfg.max_request_tokens:
            raise PayloadTooLarge(f"{req.num_tokens} tokens in one request exceed the limit of "
                                  f"{self.cfg.max_request_tokens}; split the request")
        common = self.common_vocab
        vocab_limit = common if req.vocab_limit is None else req.vocab_limit
        if not 1 <= vocab_limit <= common:
            raise InvalidSample(f"vocab_limit {vocab_limit} is out of range: it must be in [1, {common}] "
                                f"(the common vocabulary of the teacher's lm_head and tokenizer)")
        if not 1 <= req.k <= min(self.cfg.max_k, vocab_limit):
            raise InvalidSample(f"k={req.k} is out of range: it must be in [1, {min(self.cfg.max_k, vocab_limit)}] "
                                f"(server --max-k {self.cfg.max_k}, vocab_limit {vocab_limit})")
        if req.template is not None and req.template not in TEMPLATES:
            raise InvalidSample(f"template {req.template!r} is not supported; choose one of {sorted(TEMPLATES)}")
        inputs = [self._check_sample(i, s, req.template, m) for i, s in enumerate(req.samples)]
        return req, inputs, vocab_limit

    def _check_sample(self, i: int, s: WireSample, template: str | None, m) -> TeacherInput:
        who = _describe(i, s)
        ids = s.input_ids
        L = len(ids)
        if L < 2:
            raise InvalidSample(f"{who}: {L} token(s); a sample needs at least 2")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= m.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= m.vocab_size)][0])
            raise InvalidSample(f"{who}: token id {bad} is outside the teacher's vocabulary [0, {m.vocab_size}) "
                                f"(prepared with another tokenizer?)")
        r = s.response_positions
        if len(r) and (int(r.min()) < 0 or int(r.max()) > L - 2 or (len(r) > 1 and (np.diff(r) <= 0).any())):
            raise InvalidSample(f"{who}: response positions must be strictly ascending in [0, {L - 2}] "
                                f"(the logits at t predict token t+1)")
        n_image_tokens = int((ids == m.image_token_id).sum())
        pixels = None
        if s.image is not None:
            if s.num_visual != m.num_visual_tokens:
                raise InvalidSample(f"{who}: visual span of {s.num_visual} tokens, but this teacher uses "
                                    f"{m.num_visual_tokens} visual tokens per image ({m.vision_strategy} strategy); "
                                    f"prepare the data with the teacher's visual-token count")
            vs = s.visual_start
            if vs < 0 or vs + s.num_visual > L:
                raise InvalidSample(f"{who}: visual span [{vs}, {vs + s.num_visual}) lies outside the "
                                    f"{L}-token sample")
            if n_image_tokens != s.num_visual or not (ids[vs:vs + s.num_visual] == m.image_token_id).all():
                raise InvalidSample(f"{who}: the visual span [{vs}, {vs + s.num_visual}) must hold exactly the "
                                    f"{s.num_visual} image tokens (id {m.image_token_id}) of the sample; found "
                                    f"{n_image_tokens} image tokens")
            pixels = self._decode_image(who, s.image, m.image_size, m.image_aspect_ratio, self.cfg.max_image_pixels,
                                        self.engine.needs_pixels)
        else:
            if s.num_visual != 0 or n_image_tokens:
                raise InvalidSample(f"{who}: no image was sent, but the sample has num_visual={s.num_visual} "
                                    f"and {n_image_tokens} image tokens (id {m.image_token_id})")
        if template is not None:
            expect = sample_key(template, ids, image_hash(s.image) if s.image is not None else None, s.num_visual)
            if expect != s.key:
                raise InvalidSample(f"{who}: key {s.key!r} does not match the content (expected {expect!r} for "
                                    f"template {template!r}); the client's keys and tokens disagree")
        inp = TeacherInput(s.key, np.ascontiguousarray(ids, dtype=np.int64), np.asarray(r, dtype=np.int64),
                           s.visual_start if s.image is not None else -1, s.num_visual if s.image is not None else 0,
                           pixels)
        if self.engine.name != "hf":
            inp.image_bytes = s.image  # engines without our preprocessing get the file itself
        return inp

    @staticmethod
    def _decode_image(who: str, data: bytes, size: int, aspect_ratio: str, max_pixels: int,
                      decode: bool = True) -> np.ndarray | None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size  # from the header: refuse decompression bombs before decoding
                if w * h > max_pixels:
                    raise InvalidSample(f"{who}: the image is {w}x{h} pixels, more than the server decodes "
                                        f"({max_pixels} pixels, /v1/info max_image_pixels); downscale it")
                if not decode:  # the engine does not look at pixels (Engine.needs_pixels)
                    return None
                im.load()
                return preprocess_image(im, size, aspect_ratio)
        except InvalidSample:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            raise InvalidSample(f"{who}: the image ({len(data)} bytes) cannot be decoded: "
                                f"{type(e).__name__}: {e}") from None

    # -- the endpoint's work ------------------------------------------------------------------------
    async def targets(self, request) -> bytes:
        self.require_ready()
        body = await self.read_body(request)
        with self.admit():
            req, inputs, vocab_limit = await asyncio.to_thread(self.decode_and_check, body)
            del body
            tokens = sum(x.length for x in inputs)
            queued = self.engine.queued_tokens
            if queued and queued + tokens > self.cfg.max_queue_tokens:
                raise Overloaded(f"the queue holds {queued} tokens; {tokens} more would exceed the limit of "
                                 f"{self.cfg.max_queue_tokens}; retry later", self.retry_after())
            results = await self.engine.targets(inputs, req.k, vocab_limit)
            resp = TargetsResponse(results, req.k, vocab_limit, self.desc.model.fingerprint)
            return await asyncio.to_thread(encode_response, resp)
