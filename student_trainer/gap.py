"""The capacity gap: how far a student is from a teacher's cached targets, on samples it never trained on.

  ckd gap --model STUDENT --cache CACHE --data FILE.json [--images DIR] [--template NAME] [--json-out F]

:func:`measure_gap` runs the student over the held-out slice of the data (ckd_common.holdout: the
samples every training step leaves out, chosen by sample-key hash) and averages, exactly as the
training loss does (mean over a sample's positions, then over the samples having the term), the
sparse divergences between the cached teacher and the student (docs/design.md §4.8):

  kl_text  the KD divergence on the response positions (default: forward KL at T = 1, full k)
  kl_vis   the same on the visual span
  rel      the relation distance 1 - cos(R_T, R_S) of the visual autocorrelations
  ce       the student's cross-entropy on the held-out responses (no teacher involved)

A smaller gap means a student closer to that teacher. measure_gap is the function a cascade's summary
calls to record the gap to every teacher of its chain before the first stage and after each stage.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ckd_common.config import CommandConfig, ConfigError, add_arguments, from_args, path_problems
from ckd_common.holdout import DEFAULT_HOLDOUT, split_positions
from ckd_common.kd.objective import DEFAULT_JSD_BETA, DIVERGENCES, KDObjective
from ckd_common.templates import TEMPLATE_NAMES

__all__ = ["GapConfig", "GapError", "add_gap_arguments", "measure_gap", "run_gap"]

TERMS = ("kl_text", "kl_vis", "rel", "ce")


class GapError(RuntimeError):
    """A problem the user can fix; the message says which and how."""


def _opt(default=None, **meta):
    return field(default=default, metadata=meta)


@dataclass
class GapConfig(CommandConfig):
    """``ckd gap``: one student against one teacher's cache."""

    model: Path = _opt(help="the student: an HF llava directory (e.g. a run's final/)")
    cache: str = _opt(help="the teacher's logit cache root (path or fsspec URL)")
    data: Path = _opt(help="the LLaVA json / jsonl the cache was filled from")
    images: Path | None = _opt(None, help="image root of the data's 'image' fields")
    template: str | None = _opt(None, choices=TEMPLATE_NAMES,
                                help="the data's template (default: the one template the cache root holds)")
    teacher_fingerprint: str | None = _opt(None, help="require the cache group to come from this teacher")
    holdout: float | None = _opt(None, help="held-out fraction (default: the student's training config's, "
                                 f"else {DEFAULT_HOLDOUT})")
    max_samples: int | None = _opt(None, help="measure on at most this many held-out samples")
    max_length: int = _opt(2048, help="the --max-length the cache was filled with")
    micro_batch: int = _opt(4, help="samples per forward")
    divergence: str = _opt("forward_kl", choices=DIVERGENCES, help="divergence of kl_text / kl_vis")
    jsd_beta: float = _opt(DEFAULT_JSD_BETA, help="--divergence jsd: TRL's beta")
    json_out: Path | None = _opt(None, help="also write the result as JSON here")
    progress: bool = _opt(True, help="progress bar")

    def problems(self) -> list[str]:
        p = path_problems(model=(self.model, "dir"), data=(self.data, "file"))
        if self.model is not None and Path(self.model).is_dir() and not (Path(self.model) / "config.json").is_file():
            p.append(f"model: {self.model} has no config.json (expected an HF llava directory)")
        if not self.cache:
            p.append("cache is required")
        if self.images is not None and not Path(self.images).is_dir():
            p.append(f"images: directory {self.images} does not exist")
        if self.holdout is not None and not 0 < self.holdout < 0.5:
            p.append(f"holdout must be in (0, 0.5), got {self.holdout}")
        if self.max_samples is not None and self.max_samples < 1:
            p.append(f"max_samples must be >= 1, got {self.max_samples}")
        if self.micro_batch < 1:
            p.append(f"micro_batch must be >= 1, got {self.micro_batch}")
        try:
            KDObjective(self.divergence, self.jsd_beta)
        except ValueError as e:
            p.append(str(e))
        return p


def _saved_holdout(model_dir: Path) -> float | None:
    """The holdout the student was trained with (its final/ holds the run's student_trainer.json)."""
    from student_trainer.config import CONFIG_FILE

    f = Path(model_dir) / CONFIG_FILE
    if not f.is_file():
        return None
    try:
        value = json.loads(f.read_text()).get("holdout")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _template_of(cache_root: str, template: str | None) -> str:
    if template is not None:
        return template
    from logit_cache import CacheMeta, list_groups

    try:
        templates = sorted({m.template for m in list_groups(cache_root).values() if isinstance(m, CacheMeta)})
    except Exception as e:  # noqa: BLE001 - the root itself is unreadable: say so in one line
        raise GapError(f"cache {cache_root}: cannot list its groups ({e})") from None
    if len(templates) != 1:
        held = ", ".join(templates) if templates else "no logit_cache groups"
        raise GapError(f"cache {cache_root} holds {held}; pass --template to say which data it is")
    return templates[0]


def measure_gap(model_dir, cache_root: str, data, images=None, *, template: str | None = None,
                teacher_fingerprint: str | None = None, holdout: float | None = None, max_samples: int | None = None,
                max_length: int = 2048, micro_batch: int = 4, objective: KDObjective = KDObjective(),
                device=None, progress: bool = False) -> dict:
    """The student's gap to the teacher whose targets ``cache_root`` holds, on the held-out slice.

    model_dir: the student (HF llava directory); cache_root: the teacher's cache root; data/images:
    the data the cache was filled from (its template: ``template`` or the one the root holds).
    holdout: the held-out fraction, by default the one the student was trained with (its
    student_trainer.json), else DEFAULT_HOLDOUT; max_samples caps the slice (its first samples in
    data order). Held-out samples without cached targets are left out and counted.

    Returns {"kl_text", "kl_vis", "rel", "ce": means (NaN where no held-out sample has the term),
    "samples", "text_samples", "image_samples", "missing_targets", "holdout", "template", "cache",
    "teacher_fingerprint", "k", "objective", "model"}. Raises GapError for problems the user can fix.
    """
    import torch

    from ckd_common.prepared import PrepareSpec, obtain, sample_keys, subset
    from ckd_common.kd import KDWeights
    from ckd_common.model import load_vlm, model_info
    from student_trainer.data import MicroBatches, TrainerError, expected_cache_meta, open_cache
    from student_trainer.trainer import StudentLoss

    model_dir = Path(model_dir)
    fraction = holdout if holdout is not None else (_saved_holdout(model_dir) or DEFAULT_HOLDOUT)
    template = _template_of(str(cache_root), template)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vlm, tok = load_vlm(model_dir, dtype=torch.float32, device=device)
    vlm.eval()
    info = model_info(vlm, tok)
    # the prepared dataset the trainer used (opened, or built once): the same samples and keys
    dataset = obtain(PrepareSpec.of(data, images, template, info, max_length), tok, progress=progress)
    _, held_at = split_positions(sample_keys(dataset.samples), fraction)
    held = list(subset(dataset.samples, held_at))
    if not held:
        raise GapError(f"{data}: none of its {len(dataset)} samples falls in the held-out slice of {fraction:g}; "
                       f"pass a larger --holdout (and train with the same --holdout) or use more data")
    try:
        reader = open_cache(str(cache_root), expected_cache_meta(dataset, info, teacher_fingerprint))
    except TrainerError as e:
        raise GapError(str(e)) from None
    present = [s for s in held if s.key in reader]
    missing = len(held) - len(present)
    if max_samples is not None:
        present = present[:max_samples]
    if not present:
        raise GapError(f"none of the {len(held)} held-out samples of {data} has targets in {reader.group.url}; "
                       f"finish filling the cache")

    loss = StudentLoss(vlm, 256, "flat", head_trainable=False, objective=objective,  # W^T W once
                       teacher_vocab=reader.meta.vocab_size)
    micro = [list(range(i, min(i + micro_batch, len(present)))) for i in range(0, len(present), micro_batch)]
    batches = MicroBatches(present, micro, tok.pad_token_id, info.image_size, reader,
                           aspect_ratio=info.image_aspect_ratio)
    sums = dict.fromkeys(TERMS, 0.0)
    counts = dict.fromkeys(TERMS, 0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(present), desc="gap", unit="sample", file=sys.stderr)
    with torch.no_grad():
        for i in range(len(batches)):
            batch = batches[i]
            targets = batch["targets"]
            n_text = sum(1 for n in targets.text_counts() if n)
            n_vis = sum(1 for n in targets.vis_counts() if n)
            n_rel = sum(1 for n, a in zip(targets.vis_counts(), targets.autocorr) if n and a is not None)
            kw = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            if "pixel_values" in batch:
                kw["pixel_values"] = batch["pixel_values"].to(device)
            out = loss(targets=targets.to(device), visual_start=batch["visual_start"], weights=KDWeights(), **kw)
            for term, n in (("kl_text", n_text), ("ce", n_text), ("kl_vis", n_vis), ("rel", n_rel)):
                sums[term] += float(out[term]) * n  # the batch's term is the mean over its n samples
                counts[term] += n
            if bar is not None:
                bar.update(len(micro[i]))
    if bar is not None:
        bar.close()
    result = {t: (sums[t] / counts[t] if counts[t] else math.nan) for t in TERMS}
    result.update(samples=len(present), text_samples=counts["kl_text"], image_samples=counts["kl_vis"],
                  missing_targets=missing, holdout=fraction, template=template, cache=reader.group.url,
                  teacher_fingerprint=reader.meta.teacher_fingerprint, k=reader.meta.k,
                  objective=objective.describe(), model=str(model_dir))
    return result


def format_gap(r: dict) -> str:
    """One line: the three gap terms and what they were measured on."""
    return (f"gap to {r['teacher_fingerprint'][:12]}: kl_text {r['kl_text']:.4f}  kl_vis {r['kl_vis']:.4f}  "
            f"rel {r['rel']:.4f}  (ce {r['ce']:.4f}; {r['samples']} held-out samples, {r['image_samples']} with "
            f"an image, holdout {r['holdout']:g}, {r['objective']}, k={r['k']})")


# ---------------------------------------------------------------------------------------------
# command line (`ckd gap`)
def add_gap_arguments(parser) -> None:
    add_arguments(parser, GapConfig, overrides={"model": {"required": True}, "cache": {"required": True},
                                                "data": {"required": True}})


def run_gap(args) -> int:
    """`ckd gap`: measure, print one line (and the JSON with --json-out); 2 on a user error."""
    from ckd_common.data import DataError
    from ckd_common.model import ModelLoadError

    try:
        cfg = from_args(GapConfig, args).validate()
        result = measure_gap(cfg.model, cfg.cache, cfg.data, cfg.images, template=cfg.template,
                             teacher_fingerprint=cfg.teacher_fingerprint, holdout=cfg.holdout,
                             max_samples=cfg.max_samples, max_length=cfg.max_length, micro_batch=cfg.micro_batch,
                             objective=KDObjective(cfg.divergence, cfg.jsd_beta), progress=cfg.progress)
    except (ConfigError, GapError, DataError, ModelLoadError) as e:
        print(f"ckd gap: error: {e}", file=sys.stderr)
        return 2
    print(format_gap(result))
    if cfg.json_out is not None:
        Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_out).write_text(json.dumps({"config": cfg.to_dict(), **result}, indent=2))
    return 0
