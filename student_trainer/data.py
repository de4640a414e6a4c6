"""The trainer's data path: prepared samples joined with their cached targets by sample key, a
deterministic length-grouped schedule of global batches, and a prefetching loader.

* :func:`open_cache` picks the cache group matching the prepared data's fingerprint + template and
  checks every field the student must agree with; when no group matches it lists what the root
  holds and which fields differ. Corrupted bytes are never trained on: a format-2 cache checks a
  crc32c on every chunk it reads (an error naming the segment stops the run), and a format-1
  cache, whose chunks have no checksums, is verified against its manifests when it is opened
  (each rank checks its share of the segments).
* :func:`join_targets` finds the samples without committed targets: an error with the count and
  the first keys, or (``on_missing='skip'``) drops and counts them.
* :func:`build_schedule` is a pure function of (lengths, seed, batch sizes, world size): every
  step is one global batch split into micro-batches, micro-batch j going to rank j % world. The
  same global batches are formed for any number of ranks, so runs with 1 or N ranks see the same
  samples per optimizer step, and ``--resume`` continues the same order by skipping done steps.
* :class:`MicroBatches` is the map-style dataset a torch DataLoader with workers prefetches:
  each item is one collated micro-batch plus its BatchTargets (cache reads and image decoding
  happen in the workers).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckd_common.data import PreparedSample, collate
from ckd_common.kd import collate_targets
from ckd_common.prepared import sample_keys, subset
from ckd_common.targets import SampleTargets, SparseTopK


class TrainerError(RuntimeError):
    """A problem the user can fix (message says which and how); the CLI prints it without a traceback."""


# ---------------------------------------------------------------------------------------------
# cache
def expected_cache_meta(dataset, info, teacher_fingerprint: str | None = None) -> dict:
    """What the cache must agree with for this student (``info``: its ckd_common.model.ModelInfo)
    and prepared dataset; the rule itself is logit_cache's (CacheMeta.expected_for)."""
    from logit_cache import CacheMeta

    return CacheMeta.expected_for(dataset, tokenizer_hash=info.tokenizer_hash, vocab_size=info.common_vocab,
                                  vision_strategy=info.vision_strategy, num_visual_tokens=info.num_visual_tokens,
                                  image_aspect_ratio=info.image_aspect_ratio,
                                  teacher_fingerprint=teacher_fingerprint)


def open_cache(root: str, expected: dict):
    """The CacheReader of the group for ``expected``; TrainerError naming the fields otherwise."""
    from logit_cache import (CacheError, CacheMeta, CacheMismatchError, GroupNotFoundError, list_groups,
                             open_for_training)

    try:
        reader = open_for_training(root, expected)
    except CacheMismatchError as e:
        raise TrainerError(f"cache refused: {e}") from None
    except GroupNotFoundError:
        groups = list_groups(root) if Path(str(root)).exists() or "://" in str(root) else {}
        lines = []
        for name, meta in groups.items():
            if isinstance(meta, CacheMeta):
                diffs = meta.differences(expected)
                lines.append(f"  {name}: " + "; ".join(f"{f} differs (expected {e!r}, cache has {c!r})"
                                                         for f, e, c in diffs))
            else:
                lines.append(f"  {name}: unreadable ({meta})")
        held = "\n".join(lines) if lines else "  (no logit_cache groups)"
        raise TrainerError(
            f"cache refused: no group in {root} was filled for this data "
            f"(dataset_fingerprint={expected['dataset_fingerprint']}, template={expected['template']}; the fingerprint "
            f"covers the data, tokenizer, template, visual-token count and --max-length). "
            f"The cache holds:\n{held}\nFix: fill the cache for this data/template with the teacher "
            f"(teacher_server / logit_cache fill), or point --cache at the right root.") from None
    except CacheError as e:
        raise TrainerError(f"cache {root}: {e}") from None
    if reader.meta.format_version < 2:
        _verify_format1(reader)
    return reader


def _verify_format1(reader) -> None:
    """Format-1 chunks carry no checksums: check every segment's arrays against the sha256 in its
    manifest before training (rank r of W checks segments r, r+W, ...)."""
    import time

    from logit_cache import CacheError, verify_segments

    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = reader.manifests[rank::world]
    t0 = time.perf_counter()
    if rank == 0:
        print(f"student_trainer: {reader.group.url} is logit_cache format {reader.meta.format_version} (no per-chunk "
              f"checksums): checking {len(reader.manifests)} segments against their manifests first")
    try:
        n = verify_segments(reader.group, mine, progress=rank == 0)
    except CacheError as e:
        raise TrainerError(f"cache refused: {e}") from None
    if rank == 0:
        print(f"student_trainer: {n} samples checked in {time.perf_counter() - t0:.1f} s")


def join_targets(samples: Sequence[PreparedSample], reader, on_missing: str) -> tuple[Sequence[PreparedSample], int]:
    """Samples that have committed targets, and the number skipped (on_missing='skip')."""
    keys = sample_keys(samples)  # one array read for a memory-mapped dataset, not sample by sample
    missing_at = [i for i, k in enumerate(keys) if k not in reader]
    if missing_at and on_missing != "skip":
        missing = [samples[i] for i in missing_at[:5]]
        first = ", ".join(f"{s.key} ({s.id})" for s in missing)
        raise TrainerError(
            f"{len(missing_at)} of {len(samples)} samples have no targets in cache group {reader.group.url}; "
            f"first: {first}. Fix: finish filling the cache (a resumed fill adds missing keys), or pass "
            f"--on-missing skip to train without them.")
    if not missing_at:
        return samples, 0
    gone = set(missing_at)
    return subset(samples, [i for i in range(len(keys)) if i not in gone]), len(missing_at)


def ce_only_targets(sample: PreparedSample) -> SampleTargets:
    """Targets carrying no teacher mass (k = 1 padding, tail 0): the fused loss then reduces to
    the chunked CE, so steps without a teacher use the same loss code."""
    n = len(sample.response_positions)
    return SampleTargets(sample.key, SparseTopK(np.zeros((n, 1), np.int64), np.full((n, 1), -np.inf, np.float32),
                                                np.zeros(n, np.float32)))


# ---------------------------------------------------------------------------------------------
# schedule
@dataclass
class Schedule:
    """steps[s][r] = the micro-batches (lists of sample indices) of rank r at optimizer step s."""

    steps: list[list[list[list[int]]]]
    global_batches: list[list[int]]
    dropped_per_epoch: int

    def __len__(self) -> int:
        return len(self.steps)


def num_steps(n: int, global_batch: int, epochs: float = 1.0, max_steps: int | None = None) -> int:
    """Optimizer steps of a run over ``n`` samples (what :func:`build_schedule` schedules): whole global
    batches per epoch (the remainder is dropped), times ``epochs``, at most ``max_steps``."""
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise TrainerError(f"{n} samples is fewer than one global batch of {global_batch}; lower --global-batch")
    total = max(1, int(math.floor(per_epoch * epochs)))
    return total if max_steps is None else min(total, max_steps)


def build_schedule(lengths: list[int], global_batch: int, micro_batch: int, world: int, seed: int,
                   epochs: float = 1.0, group_by_length: bool = True, max_steps: int | None = None) -> Schedule:
    n = len(lengths)
    per_epoch = n // global_batch
    total = num_steps(n, global_batch, epochs, max_steps)
    lengths_arr = np.asarray(lengths)
    steps, globals_ = [], []
    epoch = 0
    while len(steps) < total:
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        for b in range(per_epoch):
            if len(steps) >= total:
                break
            idx = perm[b * global_batch:(b + 1) * global_batch]
            if group_by_length:  # similar lengths share a micro-batch: less padding
                idx = idx[np.argsort(-lengths_arr[idx], kind="stable")]
            micro = [idx[i:i + micro_batch].tolist() for i in range(0, global_batch, micro_batch)]
            steps.append([micro[r::world] for r in range(world)])
            globals_.append(idx.tolist())
        epoch += 1
    return Schedule(steps, globals_, n - per_epoch * global_batch)


# ---------------------------------------------------------------------------------------------
# loader
class MicroBatches(torch.utils.data.Dataset):
    """Item i = the collated i-th micro-batch of this rank (from ``start_step`` on), with targets."""

    def __init__(self, samples: list[PreparedSample], micro: list[list[int]], pad_id: int, image_size: int,
                 reader=None, aspect_ratio: str | None = None):
        self.samples, self.micro, self.pad_id, self.image_size, self.reader = samples, micro, pad_id, image_size, reader
        self.aspect_ratio = aspect_ratio  # the student's image preprocessing (ModelInfo.image_aspect_ratio)

    def __len__(self) -> int:
        return len(self.micro)

    def __getitem__(self, i: int) -> dict:
        batch_samples = [self.samples[j] for j in self.micro[i]]
        batch = collate(batch_samples, self.pad_id, self.image_size, aspect_ratio=self.aspect_ratio)
        if self.reader is not None:
            from logit_cache import CacheError

            try:
                targets = self.reader.get_many([s.key for s in batch_samples])
            except CacheError as e:  # a loader worker would re-raise it wrapped in its traceback text
                return {LOADER_ERROR: f"cache read failed: {e}"}
        else:
            targets = [ce_only_targets(s) for s in batch_samples]
        batch["targets"] = collate_targets(targets)
        batch["visual_start"] = [s.visual_start for s in batch_samples]
        batch["indices"] = list(self.micro[i])
        return batch


LOADER_ERROR = "loader_error"  # a micro-batch that could not be built: its message, raised by the consumer


class _Loader:
    """A DataLoader whose micro-batches that failed to load raise TrainerError (one clean line) in
    the training process, instead of a worker's exception wrapped in its traceback text."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if LOADER_ERROR in batch:
                raise TrainerError(batch[LOADER_ERROR])
            yield batch


def make_loader(dataset: MicroBatches, num_workers: int, prefetch: int):
    kw = {}
    if num_workers > 0:
        kw = dict(num_workers=num_workers, prefetch_factor=prefetch, multiprocessing_context="fork",
                  persistent_workers=False)
    return _Loader(torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, collate_fn=lambda x: x, **kw))
