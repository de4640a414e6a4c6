"""logit_cache: a versioned, compressed, crash-safe Zarr v3 store of teacher targets.

One teacher pass over a dataset, reused by every student, stage and loss variant: per sample the
text top-k (ids, log-probs, tail mass) at the response positions, the visual top-k over the visual
span and the Frobenius-normalised visual autocorrelation (DESIGN.md §3-§4). Layout, encodings
and the commit protocol are specified in ``logit_cache/FORMAT.md``.

Run: ``logit_cache info|verify|ls|gc|compact ROOT [GROUP] ...`` (or ``python -m logit_cache``).

Writer (teacher-server side)::

    g = open_group(root, meta=CacheMeta(...), create=True)
    done = g.committed_keys()
    with g.writer(segment_rows=4096) as w:
        for s in targets: w.add(s)                  # SampleTargets

Reader (trainer side)::

    r = open_for_training(root, expected={...})     # CacheMismatchError / UnknownFormatVersion
    s = r.get(key); batch = r.get_many(keys)
"""
from .errors import (CacheCorruptError, CacheError, CacheMismatchError, GroupNotFoundError,
                     KeyNotCachedError, UnknownFormatVersion)
from .meta import FORMAT_VERSION, CacheMeta, group_name, teacher_fingerprint
from .reader import CacheReader, open_for_training, to_torch
from .store import CacheGroup, CacheWriter, find_group, list_groups, open_group

__all__ = ["FORMAT_VERSION", "CacheMeta", "CacheGroup", "CacheWriter", "CacheReader", "open_group",
           "find_group", "list_groups", "open_for_training", "to_torch", "group_name", "teacher_fingerprint",
           "CacheError", "CacheMismatchError", "UnknownFormatVersion", "GroupNotFoundError",
           "CacheCorruptError", "KeyNotCachedError"]
