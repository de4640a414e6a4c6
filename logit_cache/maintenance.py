"""info, verify, gc and compact (the operations behind the CLI)."""
from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
from tqdm import tqdm

from .errors import CacheCorruptError
from .reader import CacheReader
from .store import MANIFESTS, SEGMENTS, CacheGroup, Manifest, concat_blocks, verify_manifest_arrays


def info(group: CacheGroup) -> dict[str, Any]:
    ms = group.committed()
    n = sum(m.num_samples for m in ms)
    tp = sum(m.text_positions for m in ms)
    vp = sum(m.visual_positions for m in ms)
    stored = sum(group.storage.du(group.name, SEGMENTS, m.segment) for m in ms)
    stored_ac = sum(group.storage.du(group.name, SEGMENTS, m.segment, "autocorr") for m in ms)
    raw = 0  # float32 logprobs + int32 ids + float32 tail per position, float32 autocorr upper triangle
    for m in ms:
        raw += (m.text_positions + m.visual_positions) * (group.meta.k * 8 + 4) + m.autocorr_values * 4
    pos = tp + vp
    return {"group": group.url, "meta": group.meta.to_dict(), "segments": len(ms),
            "uncommitted_segments": len(group.uncommitted_segments()), "samples": n,
            "text_positions": tp, "visual_positions": vp,
            "stored_bytes": stored, "stored_autocorr_bytes": stored_ac,
            "bytes_per_position": ((stored - stored_ac) / pos) if pos else None,  # top-k targets, autocorr excluded
            "compression_ratio_vs_float32": (raw / stored) if stored else None}


def verify(group: CacheGroup, progress: bool = True) -> dict[str, Any]:
    """Checksums, offsets, value ranges, tails in [0,1] and every committed key readable.
    Returns a report; raises CacheCorruptError on the first problem."""
    meta = group.meta
    ms = group.committed()
    seen: set[str] = set()
    dups = 0
    nsamp = 0
    for m in tqdm(ms, desc=f"verify {group.name}", unit="segment", disable=not progress):
        where = f"{group.url}/{SEGMENTS}/{m.segment}"
        data = verify_manifest_arrays(group, m)
        a = data.arrays
        if len(a["keys"]) != m.num_samples:
            raise CacheCorruptError(f"{where}: {len(a['keys'])} keys, manifest says {m.num_samples}")
        for kind, total in (("text", m.text_positions), ("visual", m.visual_positions), ("autocorr", m.autocorr_values)):
            o = a[f"{kind}_offsets"]
            if len(o) != m.num_samples + 1 or o[0] != 0 or o[-1] != total or (np.diff(o) < 0).any():
                raise CacheCorruptError(f"{where}/{kind}_offsets: not a monotone 0..{total} offset array of "
                                        f"length {m.num_samples + 1}")
            data_len = len(a["autocorr"] if kind == "autocorr" else a[f"{kind}_ids"])
            if data_len != total:
                raise CacheCorruptError(f"{where}: {kind} data has {data_len} rows, offsets end at {total}")
        for kind in ("text", "visual"):
            ids = a[f"{kind}_ids"]
            if ids.size and int(ids.max()) >= meta.vocab_size:
                raise CacheCorruptError(f"{where}/{kind}_ids: id {int(ids.max())} >= vocab_size {meta.vocab_size}")
            tail = a[f"{kind}_tail"].astype(np.float32)
            if tail.size and (not np.isfinite(tail).all() or tail.min() < 0 or tail.max() > 1):
                raise CacheCorruptError(f"{where}/{kind}_tail: tail masses outside [0, 1]")
            if meta.value_encoding == "f16":
                lp = a[f"{kind}_lp"]
                if lp.size and (np.isnan(lp).any() or (lp > 1e-3).any()):
                    raise CacheCorruptError(f"{where}/{kind}_lp: log-probs must be <= 0 and not NaN")
            else:
                lp0 = a[f"{kind}_lp0"].astype(np.float32)
                if lp0.size and (not np.isfinite(lp0).all() or (lp0 > 1e-3).any()):
                    raise CacheCorruptError(f"{where}/{kind}_lp0: row maxima must be finite and <= 0")
        if a["autocorr"].size and not np.isfinite(a["autocorr"].astype(np.float32)).all():
            raise CacheCorruptError(f"{where}/autocorr: non-finite values")
        for r in range(len(data)):  # every committed key decodes into a valid SampleTargets
            s = data.sample(r)
            if s.key in seen:
                dups += 1
            seen.add(s.key)
            nsamp += 1
    return {"group": group.url, "segments": len(ms), "samples": nsamp, "unique_keys": len(seen),
            "duplicates": dups, "uncommitted_segments": group.uncommitted_segments(), "ok": True}


def _writer_alive(group: CacheGroup, seg: str) -> bool:
    try:
        w = dict(group.storage.zgroup(group.name, SEGMENTS, seg, mode="r").attrs).get("writer", {})
    except Exception:  # noqa: BLE001 - no metadata yet: treat by age only
        return False
    if w.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(w.get("pid", -1)), 0)
        return True
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True


def _segment_age_s(seg: str) -> float:
    try:
        t = datetime.strptime(seg.split("-", 1)[0], "%Y%m%dT%H%M%S%f").replace(tzinfo=timezone.utc)
        return time.time() - t.timestamp()
    except ValueError:
        return float("inf")


def gc(group: CacheGroup, min_age_s: float = 3600.0, dry_run: bool = False) -> dict[str, list[str]]:
    """Remove uncommitted segments of dead writers (same host: pid gone; other hosts: older than
    ``min_age_s``) and segments a compaction replaced."""
    removed_unc, removed_rep = [], []
    for seg in group.uncommitted_segments():
        local_dead = not _writer_alive(group, seg)
        if (local_dead and _is_local_writer(group, seg)) or _segment_age_s(seg) >= min_age_s:
            removed_unc.append(seg)
            if not dry_run:
                group.storage.rm(group.name, SEGMENTS, seg, recursive=True)
    for fn in group.storage.ls(group.name, MANIFESTS):  # temp files of a killed atomic manifest write
        if ".json.tmp-" in fn:
            try:
                os.kill(int(fn.split(".json.tmp-")[1].split("-")[0]), 0)
                continue
            except (ProcessLookupError, ValueError):
                removed_unc.append(f"{MANIFESTS}/{fn}")
                if not dry_run:
                    group.storage.rm(group.name, MANIFESTS, fn)
            except PermissionError:
                continue
    for seg in group.replaced_segments():
        removed_rep.append(seg)
        if not dry_run:
            group.storage.rm(group.name, SEGMENTS, seg, recursive=True)
            group.storage.rm(group.name, MANIFESTS, f"{seg}.json")
    return {"removed_uncommitted": removed_unc, "removed_replaced": removed_rep}


def _is_local_writer(group: CacheGroup, seg: str) -> bool:
    try:
        w = dict(group.storage.zgroup(group.name, SEGMENTS, seg, mode="r").attrs).get("writer", {})
        return w.get("host") == socket.gethostname()
    except Exception:  # noqa: BLE001
        return False


def compact(group: CacheGroup, target_rows: int = 65536, small_rows: int | None = None,
            progress: bool = True, target_bytes: int = 1 << 30) -> list[str]:
    """Merge committed segments smaller than ``small_rows`` (default target_rows // 2) and half of
    ``target_bytes`` into segments of up to ``target_rows`` samples and ``target_bytes`` stored
    (uncompressed) bytes: the memory it needs. Stored bytes are moved as they are (nothing is
    decoded). Each output segment's manifest names the segments it replaces, so it is the single
    atomic commit point; the old segments are then deleted (gc finishes the job if this process
    dies first). Duplicate keys are dropped. Returns the new segment ids."""
    small_rows = target_rows // 2 if small_rows is None else small_rows
    ms = [m for m in group.committed() if m.num_samples < small_rows and _stored_bytes(m) < target_bytes // 2]
    if len(ms) < 2:
        return []
    batches, cur, rows, nbytes = [], [], 0, 0
    for m in ms:
        if cur and (rows + m.num_samples > target_rows or nbytes + _stored_bytes(m) > target_bytes):
            batches.append(cur)
            cur, rows, nbytes = [], 0, 0
        cur.append(m)
        rows += m.num_samples
        nbytes += _stored_bytes(m)
    if cur:
        batches.append(cur)
    all_manifests = group.manifests()
    reader = CacheReader(group)  # first-occurrence owner of each key
    new = []
    bar = tqdm(total=sum(m.num_samples for m in ms), desc=f"compact {group.name}", unit="sample", disable=not progress)
    for batch in batches:
        if len(batch) < 2:
            bar.update(batch[0].num_samples)
            continue
        blocks: list[dict[str, np.ndarray]] = []
        keys: set[str] = set()
        for m in batch:
            data = verify_manifest_arrays(group, m)
            rows_kept = []
            for r in range(len(data)):
                k = data.key(r)
                if k not in keys and reader.locate(k) == (m.segment, r):
                    keys.add(k)
                    rows_kept.append(r)
                bar.update(1)
            blocks.append(data.take(rows_kept))
            del data
        replaces = sorted({m.segment for m in batch} | {r for m in batch for r in all_manifests[m.segment].replaces})
        out = group.write_segment(concat_blocks(blocks), replaces=replaces)
        new.append(out.segment)
        for seg in replaces:  # committed above: removing the old ones is now only cleanup
            group.storage.rm(group.name, SEGMENTS, seg, recursive=True)
            group.storage.rm(group.name, MANIFESTS, f"{seg}.json")
    bar.close()
    return new


def _stored_bytes(m: Manifest) -> int:
    """Uncompressed bytes of a committed segment's arrays, from its manifest."""
    return sum(int(np.prod(a["shape"], dtype=np.int64)) * np.dtype(a["dtype"]).itemsize for a in m.arrays.values())
