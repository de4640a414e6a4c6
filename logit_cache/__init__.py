"""logit_cache: a versioned, compressed, crash-safe Zarr v3 store of teacher targets.

Job: storage only. One teacher pass over a dataset, reused by every student, stage and loss
variant: per sample the text top-k (ids, log-probs, tail mass) at the response positions, the
visual top-k over the visual span and the Frobenius-normalised visual autocorrelation. Layout,
encodings and the commit protocol are specified in ``logit_cache/FORMAT.md`` (format 2 is written,
format 1 is read); the targets' types are ``ckd_common.targets``. No HTTP here: filling a cache from teacher servers is
``deploy.fill`` (still run as ``logit_cache fill``; see ``logit_cache/cli.py``).

Run: ``logit_cache info|verify|ls|gc|compact ROOT [GROUP] ...`` (or ``python -m logit_cache``).

Writer::

    meta = CacheMeta.for_dataset(dataset, teacher_fingerprint=..., ...)   # the one metadata factory
    g = open_group(root, meta=meta, create=True)
    done = g.committed_keys()
    with g.writer(segment_rows=4096) as w:
        for s in targets: w.add(s)                  # SampleTargets

Reader (trainer side)::

    r = open_for_training(root, expected=CacheMeta.expected_for(dataset, ...))  # CacheMismatchError / ...
    s = r.get(key); batch = r.get_many(keys)
"""
from .errors import (CacheCorruptError, CacheError, CacheMismatchError, GroupNotFoundError,
                     KeyNotCachedError, UnknownFormatVersion)
from .meta import FORMAT_VERSION, TARGET_KINDS, VALUE_ENCODINGS, CacheMeta, group_name
from .reader import CacheReader, open_for_training, verify_segments
from .store import CacheGroup, CacheWriter, find_group, list_groups, open_group

__all__ = ["FORMAT_VERSION", "VALUE_ENCODINGS", "TARGET_KINDS", "CacheMeta", "CacheGroup", "CacheWriter",
           "CacheReader", "open_group", "find_group", "list_groups", "open_for_training", "group_name",
           "CacheError", "CacheMismatchError", "UnknownFormatVersion", "GroupNotFoundError",
           "CacheCorruptError", "KeyNotCachedError", "verify_segments"]
