"""Atomic checkpoints: the HF llava layout (loads with stock ``from_pretrained``) plus the
DeepSpeed state for ``--resume``.

Layout under ``--out``::

    student_trainer.json        resolved config of the run
    metrics.jsonl               one line per optimizer step (rank 0)
    checkpoint-000050/          periodic: HF files + student_trainer.json + trainer_state.json + ds/
    final/                      HF files + student_trainer.json + summary.json + ds/
    .tmp-<name>/                a save in progress: never looks complete

Every save is written into ``.tmp-<name>`` by all ranks (DeepSpeed's save is collective), then
rank 0 writes ``trainer_state.json`` and renames the directory into place — a single atomic
``rename``. A crash mid-save leaves only a ``.tmp-`` directory, removed on the next start.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch

DS_DIR = "ds"
DS_TAG = "state"
STATE_FILE = "trainer_state.json"
FINAL = "final"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete periodic checkpoint, ascending."""
    found = []
    if out.is_dir():
        for d in out.iterdir():
            m = _CKPT.match(d.name)
            if m and d.is_dir() and (d / STATE_FILE).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def resumable_candidates(out: Path) -> list[Path]:
    """Every checkpoint that looks complete (its marker written), newest first: final, then by step."""
    final = out / FINAL
    found = [final] if (final / STATE_FILE).is_file() and (final / DS_DIR).is_dir() else []
    return found + [d for _, d in reversed(complete_checkpoints(out))]


def latest_resumable(out: Path) -> Path | None:
    """The newest checkpoint holding DeepSpeed state (final first, then the highest step); whether it
    loads is :func:`find_resumable`'s question."""
    found = resumable_candidates(out)
    return found[0] if found else None


def damage(d: Path) -> str | None:
    """Why ``--resume`` could not continue from checkpoint ``d`` (None: it loads).

    Reads everything a resume reads: the two JSON files, and every DeepSpeed state file in full —
    torch writes a zip archive with a CRC-32 per record, so a truncated file fails on its missing
    central directory and a flipped byte fails its record's CRC, before DeepSpeed is asked to load it
    (which would fail with a bare PytorchStreamReader error, or load damaged bytes)."""
    from student_trainer.config import CONFIG_FILE

    for name in (STATE_FILE, CONFIG_FILE):
        try:
            json.loads((d / name).read_text())
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return f"{name} is unreadable or not valid JSON ({e})"
    state = d / DS_DIR / DS_TAG
    files = sorted(state.glob("*.pt")) if state.is_dir() else []
    if not files:
        return f"{DS_DIR}/{DS_TAG}/ holds no DeepSpeed state files"
    for f in files:
        rel = f.relative_to(d)
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()  # reads every record and checks its CRC-32
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
            return f"{rel} is truncated or damaged ({e})"
        if bad is not None:
            return f"{rel} is damaged (record {bad} fails its CRC check)"
    return None


def find_resumable(out: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that loads, and the newer ones skipped with the reason each is damaged.
    Nothing is deleted: a damaged checkpoint stays for the user to inspect (a later save of the same
    step replaces it atomically)."""
    skipped = []
    for d in resumable_candidates(out):
        why = damage(d)
        if why is None:
            return d, skipped
        skipped.append((d, why))
    return None, skipped


def clean_partial(out: Path) -> list[str]:
    """Remove leftovers of interrupted saves (.tmp-*); returns their names."""
    removed = []
    if out.is_dir():
        for d in out.iterdir():
            if d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
    return removed


def save_hf(model, tokenizer, out_dir: Path, template: str, zero_stage: int) -> None:
    """HF llava layout (model + tokenizer + processor, with ``template`` — the step's — as the chat
    template, see ckd_common.model.save_vlm). Under ZeRO-3 the weights are gathered."""
    from ckd_common.model import save_vlm

    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if _rank() == 0:
                save_vlm(model, tokenizer, out_dir, template)
    elif _rank() == 0:
        save_vlm(model, tokenizer, out_dir, template)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(engine, model, tokenizer, out: Path, name: str, *, template: str, zero_stage: int,
                    state: dict, config, extra_files: dict[str, str] | None = None, with_ds: bool = True) -> Path:
    """Write checkpoint ``out/name`` atomically; returns its path. Collective: call on every rank."""
    from student_trainer.config import CONFIG_FILE

    final = out / name
    tmp = out / f".tmp-{name}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if with_ds:
        engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, client_state=state.get("client_state", {}),
                               exclude_frozen_parameters=True)
    save_hf(model, tokenizer, tmp, template, zero_stage)
    _barrier()
    if _rank() == 0:
        config.save(tmp / CONFIG_FILE)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        public = {k: v for k, v in state.items() if k != "client_state"}
        (tmp / STATE_FILE).write_text(json.dumps(public, indent=2))  # marker: written last
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. final after a resume): swap, then drop the old
            old = out / f".tmp-old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(out)
    _barrier()
    return final


def prune(out: Path, keep_last: int) -> None:
    if _rank() != 0:
        return
    for _, d in complete_checkpoints(out)[:-keep_last]:
        # rename first so a crash mid-delete cannot leave a directory that still looks complete
        doomed = d.with_name(f".tmp-del-{d.name}")
        os.replace(d, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
