"""The one trainer: every step (PT, FT, SFT, DPT, DFT) is this loop under a different StepSpec.

Per optimizer step the trainer takes one global batch of the deterministic schedule, runs this
rank's micro-batches through a DeepSpeed engine and steps once. The loss is ckd_common's chunked
fused student loss (CE-only targets for steps without a teacher). Each micro-batch's terms are
reweighted by the share of the global batch's samples it holds, so the optimizer sees exactly the
per-sample mean over the global batch, whatever the micro-batch size or the number of ranks:

    grad = sum_micro (n_term,micro / n_term,global) * grad(term_micro)

(DeepSpeed divides by gradient-accumulation steps and averages over ranks; the weights undo both.)
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ckd_common.holdout import split_positions
from ckd_common.kd import KDObjective, KDWeights, fused_kd_loss, lm_head_gram
from ckd_common.prepared import sample_keys, subset
from student_trainer import checkpoint as ckpt
from student_trainer.config import CONFIG_FILE, GC_AUTO_MIN_LLM_PARAMS, TrainConfig
from student_trainer.data import (MicroBatches, TrainerError, build_schedule, expected_cache_meta, join_targets,
                                  make_loader, open_cache)
from student_trainer.feedback import CURVE, SUMMARY, Feedback, plot_curve, read_metrics, summarize


# ---------------------------------------------------------------------------------------------
# distributed set-up
def setup_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); a plain
    ``python -m student_trainer`` becomes a one-rank job. Returns (rank, world_size)."""
    launched = all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not launched:
        if int(os.environ.get("WORLD_SIZE") or 1) > 1:
            raise TrainerError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but MASTER_ADDR/MASTER_PORT are not set: "
                               "launch several ranks with torchrun (or deepspeed), which sets them")
        # One rank: an in-process store. A TCP store on a probed "free" port races with every other
        # process on the machine that binds a port between the probe and the store's listen. (RANK and
        # WORLD_SIZE alone may be inherited from a parent that ran a one-rank job in-process.)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                                 store=torch.distributed.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel("WARNING")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------
# model parts and loss module
def part_modules(vlm) -> dict[str, list[torch.nn.Module]]:
    """The three parts of a transformers LlavaForConditionalGeneration."""
    return {"vision": [vlm.model.vision_tower], "connector": [vlm.model.multi_modal_projector],
            "llm": [vlm.model.language_model, vlm.lm_head]}


def unique_numel(modules) -> int:
    """Parameters of ``modules`` counted once each: a tied lm_head IS embed_tokens' tensor."""
    return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())


def set_trainable(vlm, trainable: tuple[str, ...]) -> dict[str, int]:
    """Freeze everything, then unfreeze the step's parts; the vision tower always stays frozen.
    Returns the parameters of each part (a tied head counted once)."""
    vlm.requires_grad_(False)
    counts = {}
    for part, mods in part_modules(vlm).items():
        on = part in trainable and part != "vision"
        for m in mods:
            m.requires_grad_(on)
        counts[part] = unique_numel(mods)
    return counts


def use_gradient_checkpointing(vlm, setting: bool | None) -> tuple[bool, str]:
    """Turn activation checkpointing of the LLM's decoder layers on or off (``None``: auto, on for an
    LLM of >= GC_AUTO_MIN_LLM_PARAMS parameters); returns (on, why) for the banner.

    Non-reentrant torch checkpointing: it needs no input that requires grad (DPT trains the connector
    only, so the LLM's own parameters are frozen), composes with DeepSpeed ZeRO-3's parameter hooks,
    and leaves the final norm and the fused loss outside the recompute. transformers checkpoints only
    modules in training mode: the trainer puts the model in train() (from_pretrained returns eval()).
    """
    llm = vlm.model.language_model
    n = unique_numel([llm])
    on = n >= GC_AUTO_MIN_LLM_PARAMS if setting is None else bool(setting)
    why = (f"auto: LLM {n / 1e6:.1f}M parameters {'>=' if on else '<'} {GC_AUTO_MIN_LLM_PARAMS // 10**6}M"
           if setting is None else "--gradient-checkpointing" if on else "--no-gradient-checkpointing")
    new_names = hasattr(llm, "activation_checkpointing_enable")  # transformers 5.2x renamed them (old names warn)
    if not on:
        llm.activation_checkpointing_disable() if new_names else llm.gradient_checkpointing_disable()
    elif new_names:
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return on, why


class StudentLoss(torch.nn.Module):
    """The VLM body + the fused chunked loss (the lm_head never materialises [tokens, V] logits)."""

    def __init__(self, vlm, chunk_size: int, rel_variant: str, head_trainable: bool,
                 objective: KDObjective = KDObjective(), teacher_vocab: int | None = None):
        super().__init__()
        self.vlm = vlm
        self.chunk_size, self.rel_variant, self.head_trainable = chunk_size, rel_variant, head_trainable
        self.objective, self.teacher_vocab = objective, teacher_vocab
        self._gram = None

    def forward(self, input_ids, attention_mask, labels, targets, visual_start, weights: KDWeights, pixel_values=None):
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.vlm.model.vision_tower.dtype)
        out = self.vlm.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             use_cache=False)
        weight = self.vlm.lm_head.weight
        gram = None
        if not self.head_trainable and any(a is not None for a in targets.autocorr):
            if self._gram is None:  # W is frozen (DPT): W^T W once
                self._gram = lm_head_gram(weight.detach())
            gram = self._gram
        return fused_kd_loss(out.last_hidden_state, weight, labels, targets, visual_start, weights=weights,
                             objective=self.objective, chunk_size=self.chunk_size, rel_variant=self.rel_variant,
                             gram=gram, teacher_vocab=self.teacher_vocab)


# ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    out: Path
    final: Path
    steps: int
    summary: dict


def _counts(samples, idx, has_vis: bool, has_rel: bool) -> tuple[int, int, int]:
    """Samples of ``idx`` that carry the text terms, kl_vis, rel."""
    n_t = sum(1 for i in idx if len(samples[i].response_positions))
    n_v = sum(1 for i in idx if samples[i].has_image) if has_vis else 0
    n_r = sum(1 for i in idx if samples[i].has_image) if has_rel else 0
    return n_t, n_v, n_r


def _find_resumable(out: Path, is0: bool, world: int) -> Path:
    """The newest checkpoint of ``out`` that loads; damaged newer ones are named and skipped (kept on
    disk). Rank 0 reads the files and tells the others, so every rank resumes from the same one."""
    found = [ckpt.find_resumable(out) if is0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(found, src=0)
    resume_from, skipped = found[0]
    if resume_from is None and skipped:
        damaged = "; ".join(f"{d.name}: {why}" for d, why in skipped)
        raise TrainerError(f"--resume: no checkpoint in {out} loads ({damaged}); nothing was changed. Fix: restore "
                           f"one of them from a copy, or start afresh without --resume in a new --out")
    if resume_from is None:
        raise TrainerError(f"--resume: {out} holds no complete checkpoint to resume from "
                           f"(run without --resume to start, or use --save-every to write periodic checkpoints)")
    if is0:
        for d, why in skipped:
            print(f"student_trainer: --resume: skipping {d}: {why} (left in place); resuming from the newest "
                  f"checkpoint that loads, {resume_from}")
    return resume_from


# Elements per ZeRO gradient-reduction / all-gather bucket. DeepSpeed's default (5e8) preallocates a
# 1.9 GiB fp32 staging buffer per rank at the first backward, whatever the model's size; 5e7 keeps
# buckets of 100-200 MB (still large messages for NCCL/gloo) and 1.7 GiB off a real-shape step. The
# reduction of each element is the same, so the numerics do not change (tests: 2 ranks = 1 rank).
ZERO_BUCKET_ELEMENTS = 50_000_000


def deepspeed_config(cfg: TrainConfig, world: int, bf16: bool) -> dict:
    return {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.global_batch // (cfg.micro_batch * world),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, "reduce_bucket_size": ZERO_BUCKET_ELEMENTS,
                              "allgather_bucket_size": ZERO_BUCKET_ELEMENTS},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def train(cfg: TrainConfig) -> RunResult:
    """Run one step to completion (or continue it with ``cfg.resume``); returns where it wrote."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    from ckd_common.model import load_vlm, model_info
    from ckd_common.prepared import keys_digest, sample_lengths
    from student_trainer.dataset import training_data

    cuda = torch.cuda.is_available()
    cfg = cfg.resolved()
    cfg.validate(cuda=cuda)
    rank, world = setup_distributed()
    cfg.validate(world_size=world, cuda=cuda)
    spec, out = cfg.spec, Path(cfg.out)
    is0 = rank == 0

    # -- the run directory: fresh, or resumed from its newest complete checkpoint --------------
    if is0:
        out.mkdir(parents=True, exist_ok=True)
        for name in ckpt.clean_partial(out):
            print(f"student_trainer: removed the leftovers of an interrupted save: {out / name}")
    _barrier()
    resume_from = None
    if cfg.resume:
        resume_from = _find_resumable(out, is0, world)
        saved = TrainConfig.load(resume_from / CONFIG_FILE).resolved()
        diffs = cfg.resume_differences(saved)
        if diffs:
            raise TrainerError("--resume: the config differs from the checkpoint's, so the run could not continue "
                               "exactly:\n  " + "\n  ".join(diffs))
    elif ckpt.latest_resumable(out) is not None or (out / ckpt.FINAL).exists():
        raise TrainerError(f"{out} already holds a run (checkpoints or final/); pass --resume to continue it "
                           f"or choose another --out")

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    torch.manual_seed(cfg.seed)

    # -- model, data, cache -------------------------------------------------------------------
    vlm, tok = load_vlm(cfg.model, dtype=torch.float32, device=device)
    info = model_info(vlm, tok)
    dataset = training_data(cfg, spec.template, info, tok, rank, world)  # prepared once, memory-mapped
    train_at, held_at = split_positions(sample_keys(dataset.samples), cfg.holdout)  # `ckd gap` measures on held_out
    samples, held_out = subset(dataset.samples, train_at), subset(dataset.samples, held_at)
    n_missing, reader = 0, None
    has_vis = has_rel = False
    if spec.uses_teacher:
        reader = open_cache(cfg.cache, expected_cache_meta(dataset, info, cfg.teacher_fingerprint))
        if cfg.kd_top_k is not None and cfg.kd_top_k > reader.meta.k:
            raise TrainerError(f"--kd-top-k {cfg.kd_top_k} exceeds the k={reader.meta.k} the cache {reader.group.url} "
                               f"was filled with; choose k' <= {reader.meta.k} (or refill at a larger k)")
        samples, n_missing = join_targets(samples, reader, cfg.on_missing)
        has_vis = "visual" in reader.meta.target_kinds and cfg.visual_kd
        has_rel = "autocorr" in reader.meta.target_kinds and cfg.visual_kd
        if n_missing and is0:
            print(f"student_trainer: --on-missing skip: {n_missing} of {len(dataset)} samples have no cached "
                  f"targets and are left out")
    train_set = keys_digest(samples)
    if resume_from is not None:
        was = json.loads((resume_from / ckpt.STATE_FILE).read_text()).get("train_set")
        if was is not None and was != train_set:
            raise TrainerError(f"--resume: the training samples differ from the checkpoint's ({len(samples)} now; "
                               f"the data file, the cache's committed keys with --on-missing skip, or preparation "
                               f"changed), so the run could not continue exactly; start a new --out")
    schedule = build_schedule(sample_lengths(samples), cfg.global_batch, cfg.micro_batch, world, cfg.seed,
                              cfg.epochs, cfg.group_by_length, cfg.max_steps)
    total_steps = len(schedule)
    gas = cfg.global_batch // (cfg.micro_batch * world)

    # -- engine --------------------------------------------------------------------------------
    counts = set_trainable(vlm, cfg.trainable_parts)
    grad_ckpt, grad_ckpt_why = use_gradient_checkpointing(vlm, cfg.gradient_checkpointing)
    vlm.train()  # from_pretrained returns eval(): checkpointing (and any dropout) only acts in training mode
    vlm.model.vision_tower.eval()  # frozen; no dropout either way
    module = StudentLoss(vlm, cfg.chunk_size, cfg.rel_variant, head_trainable="llm" in cfg.trainable_parts,
                         objective=cfg.objective, teacher_vocab=reader.meta.vocab_size if reader else None)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=deepspeed_config(cfg, world, bf16))
    if cfg.zero_stage == 3:  # the loss reads lm_head.weight outside lm_head.forward
        deepspeed.zero.register_external_parameter(module, vlm.lm_head.weight)

    start_step = 0
    if resume_from is not None:
        try:
            load_path, client = engine.load_checkpoint(str(resume_from / ckpt.DS_DIR), tag=ckpt.DS_TAG,
                                                       load_module_strict=False)
        except Exception as e:  # checked beforehand (ckpt.damage); what is left is e.g. another model's state
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise TrainerError(f"--resume: DeepSpeed could not load {resume_from / ckpt.DS_DIR} "
                               f"({type(e).__name__}: {first}); was it written by this model and step?") from None
        if load_path is None:
            raise TrainerError(f"--resume: DeepSpeed could not load {resume_from / ckpt.DS_DIR}")
        start_step = int(client["step"])
        torch.set_rng_state(client["torch_rng"])
        if cuda and client.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(client["cuda_rng"])

    if is0:
        cfg.save(out / CONFIG_FILE)
        print(cfg.describe())
        trainable = ", ".join(f"{k} {v / 1e6:.3f}M {'trainable' if k in cfg.trainable_parts and k != 'vision' else 'frozen'}"
                              for k, v in counts.items())
        print(f"student_trainer {spec.name}: {spec.description}\n  ranks {world}, {'bf16' if bf16 else 'fp32'}, "
              f"ZeRO-{cfg.zero_stage}, micro-batch {cfg.micro_batch} x {gas} accumulation x {world} = global "
              f"{cfg.global_batch}; {len(samples)} samples -> {total_steps} steps "
              f"({schedule.dropped_per_epoch} per epoch left out of the last partial batch); warm-up {warmup}\n"
              f"  parts: {trainable} (a tied lm_head counted once); gradient checkpointing "
              f"{'on' if grad_ckpt else 'off'} ({grad_ckpt_why}); {len(held_out)} samples held out "
              f"(--holdout {cfg.holdout:g})"
              + (f"\n  cache: {reader.group.url} (k={reader.meta.k}, {len(reader)} samples); KD terms: "
                 f"{cfg.objective.describe()}{'' if cfg.visual_kd else ', text only'}" if reader else "")
              + (f"\n  resuming from {resume_from} at step {start_step}" if resume_from else ""))

    terms = ("total", "ce", "kl_text", "kl_vis", "rel") if spec.uses_teacher else ("total", "ce")
    feedback = Feedback(out, total_steps, start_step, enabled=is0, progress=cfg.progress,
                        tensorboard=cfg.tensorboard, terms=terms, desc=f"{spec.name}")
    micro = [mb for st in schedule.steps[start_step:] for mb in st[rank]]
    loader = make_loader(MicroBatches(samples, micro, tok.pad_token_id, info.image_size, reader,
                                      aspect_ratio=info.image_aspect_ratio),
                         cfg.num_workers, cfg.prefetch)
    it = iter(loader)
    weights = cfg.weights
    wait_total = time_total = 0.0
    t_run = time.perf_counter()

    def state(step: int) -> dict:
        client = {"step": step, "torch_rng": torch.get_rng_state(),
                  "cuda_rng": torch.cuda.get_rng_state() if cuda else None}
        return {"step": step, "total_steps": total_steps, "samples_seen": step * cfg.global_batch,
                "train_set": train_set, "client_state": client}

    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            wait = 0.0
            N_t, N_v, N_r = _counts(samples, schedule.global_batches[step], has_vis, has_rel)
            lr = optimizer.param_groups[0]["lr"]
            sums = torch.zeros(4, dtype=torch.float64)
            for _ in range(gas):
                tw = time.perf_counter()
                batch = next(it)
                wait += time.perf_counter() - tw
                n_t, n_v, n_r = _counts(samples, batch["indices"], has_vis, has_rel)
                share = (n_t / N_t if N_t else 0.0, n_v / N_v if N_v else 0.0, n_r / N_r if N_r else 0.0)
                scale = gas * world
                micro_weights = KDWeights(ce=weights.ce * share[0] * scale, kl_text=weights.kl_text * share[0] * scale,
                                          kl_vis=weights.kl_vis * share[1] * scale, rel=weights.rel * share[2] * scale)
                kw = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
                if "pixel_values" in batch:
                    kw["pixel_values"] = batch["pixel_values"].to(device)
                targets = batch["targets"] if cfg.visual_kd else batch["targets"].text_only()
                res = engine(targets=targets.to(device), visual_start=batch["visual_start"],
                             weights=micro_weights, **kw)
                engine.backward(res["total"])
                engine.step()
                sums += torch.tensor([float(res["ce"]) * share[0], float(res["kl_text"]) * share[0],
                                      float(res["kl_vis"]) * share[1], float(res["rel"]) * share[2]],
                                     dtype=torch.float64)
            if world > 1:
                red = sums.to(device)
                torch.distributed.all_reduce(red)
                sums = red.cpu()
            ce, klt, klv, rel = sums.tolist()
            dt = time.perf_counter() - t0
            if step > start_step:  # the first step includes worker start-up
                wait_total += wait
                time_total += dt
            rec = {"step": step + 1, "total": weights.total(ce, klt, klv, rel), "ce": ce}
            if spec.uses_teacher:
                rec.update(kl_text=klt, kl_vis=klv, rel=rel)
            rec.update(lr=lr, samples_per_s=cfg.global_batch / dt, step_time=dt,
                       data_wait_fraction=wait / dt if dt > 0 else 0.0)
            feedback.step(rec)
            done = step + 1
            if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
                ckpt.save_checkpoint(engine, vlm, tok, out, ckpt.checkpoint_name(done), template=spec.template,
                                     zero_stage=cfg.zero_stage, state=state(done), config=cfg)
                ckpt.prune(out, cfg.keep_last)
    finally:
        feedback.close()
        del it

    wait_fraction = wait_total / time_total if time_total > 0 else 0.0
    summary = None
    extra = {}
    if is0:
        records = read_metrics(out)
        summary = summarize(records, terms, {
            "step_name": spec.name, "model": str(cfg.model), "data": str(cfg.data), "cache": cfg.cache,
            "samples": len(samples), "held_out": len(held_out), "skipped_missing_targets": n_missing, "skipped_bad_records": dataset.skipped,
            "world_size": world, "global_batch": cfg.global_batch, "total_steps": total_steps,
            "wall_s_this_process": time.perf_counter() - t_run, "data_wait_fraction": wait_fraction,
            "final": str(out / ckpt.FINAL)})
        extra = {SUMMARY: json.dumps(summary, indent=2)}
    final = ckpt.save_checkpoint(engine, vlm, tok, out, ckpt.FINAL, template=spec.template,
                                 zero_stage=cfg.zero_stage, state=state(total_steps), config=cfg, extra_files=extra)
    if is0:
        (out / SUMMARY).write_text(extra[SUMMARY])
        records = read_metrics(out)
        if records:
            plot_curve(records, terms, out / CURVE, f"{spec.name}: {cfg.model.name} on {cfg.data.name}")
        print(f"student_trainer {spec.name}: done, {total_steps} steps; final model {final} "
              f"(loads with LlavaForConditionalGeneration.from_pretrained); data-wait fraction {wait_fraction:.3f}; "
              f"summary {out / SUMMARY}, curve {out / CURVE}")
    _barrier()
    return RunResult(out, final, total_steps, summary or {})
