"""info, verify, gc and compact (the operations behind the CLI)."""
from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
from tqdm import tqdm

from .encoding import ids_hi_bits, join_ids
from .errors import CacheCorruptError
from .layout import POSITION_KINDS, array_names, concat_blocks
from .reader import CacheReader
from .store import COMPACT_CLEVEL, MANIFESTS, SEGMENTS, CacheGroup, Manifest, SegmentData, verify_manifest_arrays

DEFAULT_COMPACT_BYTES = 1 << 30  # encoded bytes per merged segment (held in memory while merging)


def info(group: CacheGroup) -> dict[str, Any]:
    """Counts, stored bytes (per array, per position, per image sample) and, in format 2, the
    distribution of the autocorrelation factors' ranks and captured shares."""
    meta = group.meta
    ms = group.committed()
    n = sum(m.num_samples for m in ms)
    tp = sum(m.text_positions for m in ms)
    vp = sum(m.visual_positions for m in ms)
    by_array: dict[str, int] = {}
    for m in ms:
        for name in array_names(meta):
            by_array[name] = by_array.get(name, 0) + group.storage.du(group.name, SEGMENTS, m.segment, name)
    stored = sum(group.storage.du(group.name, SEGMENTS, m.segment) for m in ms)
    stored_ac = sum(v for k, v in by_array.items() if k.startswith("autocorr"))
    image = vp // meta.num_visual_tokens if meta.num_visual_tokens else 0
    image_bytes = sum(v for k, v in by_array.items() if k.startswith(("visual_", "autocorr")))
    raw = 0  # float32 logprobs + int32 ids + float32 tail per position, float32 autocorr upper triangle
    for m in ms:
        nv = meta.num_visual_tokens
        tri = m.autocorr_values  # format 1; format 2 is compared with the triangle it replaces
        if meta.format_version >= 2 and nv and "autocorr" in meta.target_kinds:
            tri = (m.visual_positions // nv) * nv * (nv + 1) // 2
        raw += (m.text_positions + m.visual_positions) * (meta.k * 8 + 4) + tri * 4
    pos = tp + vp
    out = {"group": group.url, "meta": meta.to_dict(), "format_version": meta.format_version, "segments": len(ms),
           "uncommitted_segments": len(group.uncommitted_segments()),
           "damaged_manifests": sorted(group.damaged_manifests()), "samples": n,
           "text_positions": tp, "visual_positions": vp, "image_samples": image,
           "stored_bytes": stored, "stored_autocorr_bytes": stored_ac, "stored_bytes_by_array": by_array,
           "bytes_per_position": ((stored - stored_ac) / pos) if pos else None,  # top-k targets, autocorr excluded
           "bytes_per_image_sample": (image_bytes / image) if image else None,   # visual_* + autocorr*
           "compression_ratio_vs_float32": (raw / stored) if stored else None}
    if meta.format_version >= 2 and "autocorr" in meta.target_kinds and ms:
        shares, ranks = [], []
        for m in ms:
            arrs = group.segment_arrays(m.segment)
            has = np.diff(arrs["visual_offsets"][...]) > 0
            shares.append(arrs["autocorr_share"][...][has])
            ranks.append(np.diff(arrs["autocorr_offsets"][...])[has])
        sh, rk = np.concatenate(shares), np.concatenate(ranks)
        if sh.size:
            out["autocorr_factor"] = {
                "rank_mean": float(rk.mean()), "rank_median": float(np.median(rk)), "rank_max": int(rk.max()),
                "share_min": float(sh.min()), "share_median": float(np.median(sh)),
                "worst_rel_loss_error_bound": float(2 * np.sqrt(max(0.0, 1.0 - float(sh.min()))))}
    return out


def _check_segment(group: CacheGroup, m: Manifest, data: SegmentData) -> None:
    """Offsets, value ranges and (format 2) the factor's codes, scales and shares of one segment."""
    meta, a = group.meta, data.arrays
    where = f"{group.url}/{SEGMENTS}/{m.segment}"
    if len(a["keys"]) != m.num_samples:
        raise CacheCorruptError(f"{where}: {len(a['keys'])} keys, manifest says {m.num_samples}")
    ac_total = m.autocorr_values if meta.format_version == 1 else m.autocorr_columns
    for kind, total in (("text", m.text_positions), ("visual", m.visual_positions), ("autocorr", ac_total)):
        o = a[f"{kind}_offsets"]
        if len(o) != m.num_samples + 1 or o[0] != 0 or o[-1] != total or (np.diff(o) < 0).any():
            raise CacheCorruptError(f"{where}/{kind}_offsets: not a monotone 0..{total} offset array of "
                                    f"length {m.num_samples + 1}")
        data_len = len(a["autocorr"] if kind == "autocorr" else a[f"{kind}_ids"])
        if data_len != total:
            raise CacheCorruptError(f"{where}: {kind} data has {data_len} rows, offsets end at {total}")
    hb = ids_hi_bits(meta.vocab_size) if meta.format_version >= 2 else 0
    for kind in POSITION_KINDS:
        ids = join_ids(a[f"{kind}_ids"], a.get(f"{kind}_ids_hi"), hb)
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
    if meta.format_version == 1:
        if a["autocorr"].size and not np.isfinite(a["autocorr"].astype(np.float32)).all():
            raise CacheCorruptError(f"{where}/autocorr: non-finite values")
        return
    codes, scale, share = a["autocorr"], a["autocorr_scale"], a["autocorr_share"]
    ranks = np.diff(a["autocorr_offsets"])
    nv_rows = np.diff(a["visual_offsets"])
    if len(scale) != len(codes) or len(share) != m.num_samples:
        raise CacheCorruptError(f"{where}/autocorr_scale|share: {len(scale)} scales for {len(codes)} columns, "
                                f"{len(share)} shares for {m.num_samples} samples")
    if codes.size and (codes == -128).any():
        raise CacheCorruptError(f"{where}/autocorr: code -128 (codes lie in [-127, 127])")
    if scale.size and (not np.isfinite(scale).all() or (scale < 0).any()):
        raise CacheCorruptError(f"{where}/autocorr_scale: scales must be finite and >= 0")
    if share.size and (not np.isfinite(share).all() or share.min() < 0 or share.max() > 1):
        raise CacheCorruptError(f"{where}/autocorr_share: shares must lie in [0, 1]")
    tail = a.get("autocorr_tail")  # format 3; NaN = unknown (a server that predates it)
    if tail is not None and (len(tail) != m.num_samples or np.isinf(tail).any()):
        raise CacheCorruptError(f"{where}/autocorr_tail: {len(tail)} values for {m.num_samples} samples, or infinite ones")
    if ((ranks > 0) & (nv_rows == 0)).any() or (ranks > nv_rows).any():
        raise CacheCorruptError(f"{where}/autocorr_offsets: a sample has factor columns without (or beyond) its "
                                f"visual positions")
    if codes.size and (nv_rows[ranks > 0] != codes.shape[1]).any():
        raise CacheCorruptError(f"{where}/autocorr: factor width {codes.shape[1]} differs from a sample's "
                                f"visual positions")


def verify(group: CacheGroup, progress: bool = True) -> dict[str, Any]:
    """Damaged manifests, checksums, offsets, value ranges, tails in [0,1] and every committed key
    readable. Returns a report; raises CacheCorruptError on the first problem."""
    group.check_no_damage()
    ms = group.committed()
    seen: set[str] = set()
    dups = 0
    nsamp = 0
    for m in tqdm(ms, desc=f"verify {group.name}", unit="segment", disable=not progress):
        data = verify_manifest_arrays(group, m)
        _check_segment(group, m, data)
        for r in range(len(data)):  # every committed key decodes into a valid SampleTargets
            s = data.sample(r)
            if s.key in seen:
                dups += 1
            seen.add(s.key)
            nsamp += 1
    return {"group": group.url, "format_version": group.meta.format_version, "segments": len(ms),
            "samples": nsamp, "unique_keys": len(seen), "duplicates": dups,
            "uncommitted_segments": group.uncommitted_segments(), "ok": True}


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


def gc(group: CacheGroup, min_age_s: float = 3600.0, dry_run: bool = False,
       remove_damaged: bool = False) -> dict[str, list[str]]:
    """Remove uncommitted segments of dead writers (same host: pid gone; other hosts: older than
    ``min_age_s``) and segments a compaction replaced. A segment whose manifest file exists is never
    "uncommitted": one with a damaged manifest is removed (manifest and segment) only with
    ``remove_damaged``, and otherwise listed under ``kept_damaged``."""
    removed_unc, removed_rep, removed_dmg = [], [], []
    damaged = group.damaged_manifests()
    for seg in sorted(damaged) if remove_damaged else []:
        removed_dmg.append(seg)
        if not dry_run:
            group.storage.rm(group.name, SEGMENTS, seg, recursive=True)
            group.storage.rm(group.name, MANIFESTS, f"{seg}.json")
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
    return {"removed_uncommitted": removed_unc, "removed_replaced": removed_rep, "removed_damaged": removed_dmg,
            "kept_damaged": [] if remove_damaged else sorted(damaged)}


def _is_local_writer(group: CacheGroup, seg: str) -> bool:
    try:
        w = dict(group.storage.zgroup(group.name, SEGMENTS, seg, mode="r").attrs).get("writer", {})
        return w.get("host") == socket.gethostname()
    except Exception:  # noqa: BLE001
        return False


def _encoded_bytes(m: Manifest) -> int:
    return sum(int(np.prod(a["shape"], dtype=np.int64)) * np.dtype(a["dtype"]).itemsize for a in m.arrays.values())


def compact(group: CacheGroup, target_rows: int = 65536, small_rows: int | None = None,
            target_bytes: int = DEFAULT_COMPACT_BYTES, clevel: int = COMPACT_CLEVEL, progress: bool = True) -> list[str]:
    """Merge committed segments smaller than ``small_rows`` (default target_rows // 2) and half of
    ``target_bytes`` into segments of up to ``target_rows`` samples and ``target_bytes`` encoded bytes
    (what is held in memory). Samples are copied as stored (nothing decoded, so nothing re-quantised:
    ``SegmentData.take``, one gather per array) and recompressed at ``clevel`` (default 6: ~4 %
    smaller than the writers' fast default), every chunk with a fresh crc32c. Each output segment's
    manifest names the segments it replaces, so it is the single atomic commit point; the old
    segments are then deleted (gc finishes the job if this process dies first). Duplicate keys are
    dropped. Every input segment is verified against its manifest first. Returns the new segment ids."""
    group.check_writable()
    group.check_no_damage()
    small_rows = target_rows // 2 if small_rows is None else small_rows
    ms = [m for m in group.committed() if m.num_samples < small_rows and _encoded_bytes(m) < target_bytes // 2]
    if len(ms) < 2:
        return []
    batches, cur, rows, size = [], [], 0, 0
    for m in ms:
        if cur and (rows + m.num_samples > target_rows or size + _encoded_bytes(m) > target_bytes):
            batches.append(cur)
            cur, rows, size = [], 0, 0
        cur.append(m)
        rows += m.num_samples
        size += _encoded_bytes(m)
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
        out = group.write_segment(concat_blocks(blocks, group.meta), replaces=replaces, clevel=clevel)
        new.append(out.segment)
        for seg in replaces:  # committed above: removing the old ones is now only cleanup
            group.storage.rm(group.name, SEGMENTS, seg, recursive=True)
            group.storage.rm(group.name, MANIFESTS, f"{seg}.json")
    bar.close()
    return new

