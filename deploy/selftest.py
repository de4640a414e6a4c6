"""``ckd selftest``: check a machine before a long job (cf. ``accelerate test``, ``ds_report``).

    ckd selftest [--device cuda:0 [--device cuda:1]] [--teacher-device cuda:2 ...] [--tiny] [--workdir DIR]

Runs the toolkit's own commands end to end on the given devices, at the paper's shapes (random-
initialised Qwen2.5-0.5B student and Qwen2.5-1.5B teacher on SigLIP-so400m-384, 728 visual tokens,
vocabulary 151,936, the real Qwen2 tokenizer) or, with ``--tiny``, on the tiny presets (a quick
check of the installation, ~5 minutes on 2 CPU cores):

  versions, devices         installed packages; CPU/RAM, every GPU (memory, bf16 matmul), the devices asked for
  deepspeed ops             DeepSpeed's op report (installed / JIT-compatible); JIT-builds the ops the trainer
                            needs here (on CPU the shared-memory comm op; none on GPU); --compile-ops builds all
  models, prepare           the models; ``ckd data prepare`` of LLaVA-format captions and instructions
  fused loss                the trainer's fused loss against the plain one on the training device
  server DEV                one ``teacher_server serve`` per teacher device, until /readyz
  fill                      ``logit_cache fill`` of both splits through every server; ``logit_cache verify``
  train pt|ft|sft|dpt|dft   one optimizer step of every step kind (two micro-batches: gradient accumulation)
                            on the training devices: bf16 on GPU, the fused loss, ZeRO-2, checkpointing auto
  dft ZeRO-3                the DFT step again under ZeRO-3: the same loss as ZeRO-2
  checkpoint round trip     the PT run's checkpoint loads in stock transformers (model + processor + a forward)
                            and ``--resume`` from it continues exactly (the same step-2 loss)

Each result is printed as it comes, then a pass/fail table; the exit code is 0 only if nothing
failed. Logs stay in the work directory when something fails (or with ``--workdir``). At the real
shapes on a 2-core CPU machine the whole check takes ~20 minutes and ~15 GB; on a GPU, minutes.
A step's outputs are deleted once no later check reads them: at the real shapes each step writes
fp32 weights and optimizer states of several GB, and keeping all of them took ~47 GB of disk.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckd_common.config import CommandConfig
from ckd_common.templates import PRETRAIN, QWEN2_BASE
from deploy import selftest_pipeline as P

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
STEP_ORDER = ("pt", "ft", "sft", "dpt", "dft")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class SelftestConfig(CommandConfig):
    device: list[str] = field(default_factory=list, metadata=_help(
        "training device, repeat for several GPUs (one rank each): cpu, cuda, cuda:N (default: cuda:0 when "
        "there is a GPU, else cpu)"))
    teacher_device: list[str] = field(default_factory=list, metadata=_help(
        "device of a teacher server, repeat for one server per device (default: the first training device)"))
    tiny: bool = field(default=False, metadata=_help("the tiny presets instead of the paper's shapes (quick)"))
    strategy: str = field(default="patch", metadata=_help("visual tokens: patch = 728, full = 729 (real shapes)",
                                                          choices=("patch", "full")))
    tokenizer: str | None = field(default=None, metadata=_help(
        "a Qwen2 tokenizer directory for the real shapes (default: the one vendored in tests/fixtures)"))
    compile_ops: bool = field(default=False, metadata=_help("JIT-build every compatible DeepSpeed op (minutes)"))
    workdir: str | None = field(default=None, metadata=_help("work here and keep everything (default: a temp dir)"))
    timeout_s: float = field(default=3600.0, metadata=_help("limit per command, seconds"))

    def resolved(self) -> "SelftestConfig":
        import torch

        devices = [("cuda:0" if d == "cuda" else d) for d in self.device] or \
            (["cuda:0"] if torch.cuda.is_available() else ["cpu"])
        teachers = [("cuda:0" if d == "cuda" else d) for d in self.teacher_device] or devices[:1]
        return SelftestConfig(**{**self.__dict__, "device": devices, "teacher_device": teachers})

    def problems(self) -> list[str]:
        p = []
        for d in [*self.device, *self.teacher_device]:
            if d != "cpu" and not (d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
                p.append(f"device {d!r}: use cpu, cuda or cuda:N")
        if "cpu" in self.device and len(self.device) > 1:
            p.append("--device cpu trains one rank; several --device values are for GPUs")
        if len(set(self.device)) != len(self.device):
            p.append(f"--device lists a device twice: {self.device}")
        if self.timeout_s <= 0:
            p.append("--timeout-s must be positive")
        return p

    @property
    def ranks(self) -> int:
        return len(self.device)

    @property
    def cuda(self) -> bool:
        return self.device[0].startswith("cuda")


@dataclass
class Check:
    name: str
    status: str
    seconds: float
    detail: str


class SelftestFailure(RuntimeError):
    """A check's finding (one line)."""


@dataclass
class Selftest:
    cfg: SelftestConfig
    work: Path
    checks: list[Check] = field(default_factory=list)
    state: dict = field(default_factory=dict)

    def status(self, name: str) -> str | None:
        return next((c.status for c in self.checks if c.name == name), None)

    def check(self, name: str, fn, needs: tuple[str, ...] = ()) -> None:
        missing = [n for n in needs if self.status(n) != PASS]
        if missing:
            self._record(Check(name, SKIP, 0.0, f"needs {', '.join(missing)}"))
            return
        t0 = time.perf_counter()
        try:
            status, detail = PASS, fn()
        except (SelftestFailure, P.ProbeError) as e:
            status, detail = FAIL, str(e)
        except Exception as e:  # a check must never end the self-test: the table is the point
            status, detail = FAIL, f"{type(e).__name__}: {e}"
        self._record(Check(name, status, time.perf_counter() - t0, detail))

    def _record(self, c: Check) -> None:
        self.checks.append(c)
        first = c.detail.strip().splitlines()[0] if c.detail.strip() else ""
        print(f"[{c.status}] {c.name} ({c.seconds:.0f}s): {first}", flush=True)

    def table(self) -> str:
        w = max(len(c.name) for c in self.checks)
        rows = [f"{'check':<{w}}  result  {'time':>7}  detail", f"{'-' * w}  ------  {'-' * 7}  ------"]
        for c in self.checks:
            first = c.detail.strip().splitlines()[0] if c.detail.strip() else ""
            rows.append(f"{c.name:<{w}}  {c.status:<6}  {c.seconds:>6.0f}s  {first[:150]}")
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
def probe(name: str, env: dict, log: Path, timeout_s: float, **args) -> dict:
    """Run a deploy.selftest_probes probe in a child; its JSON answer."""
    m = P.run_measured(P.python("-m", "deploy.selftest_probes", name, json.dumps(args)), log, env, timeout_s)
    lines = m.log.read_text(errors="replace").splitlines()
    if m.rc != 0:
        raise SelftestFailure(next((ln for ln in reversed(lines) if ln.strip()), f"exit {m.rc}") + f" (log {log})")
    return json.loads(next(ln for ln in reversed(lines) if ln.startswith("{")))


def run_selftest(cfg: SelftestConfig) -> int:
    cfg = cfg.resolved()
    cfg.validate()
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="ckd-selftest-"))
    work.mkdir(parents=True, exist_ok=True)
    shapes = "tiny presets" if cfg.tiny else (f"real shapes: Qwen2.5-0.5B student, Qwen2.5-1.5B teacher, SigLIP-so400m-384 "
                                              f"({728 if cfg.strategy == 'patch' else 729} visual tokens), vocab 151,936")
    print(f"ckd selftest: training on {', '.join(cfg.device)}, teacher server(s) on {', '.join(cfg.teacher_device)}; "
          f"{shapes}; work directory {work}", flush=True)
    t0 = time.perf_counter()
    st = Selftest(cfg, work)
    try:
        _run_checks(st)
    except KeyboardInterrupt:
        print("ckd selftest: interrupted", file=sys.stderr)
        return 130
    finally:
        for server in st.state.get("servers", []):
            server.stop()
    failed = [c for c in st.checks if c.status == FAIL]
    print(f"\n{st.table()}\n")
    n = {s: sum(c.status == s for c in st.checks) for s in (PASS, FAIL, SKIP)}
    print(f"ckd selftest: {n[PASS]} passed, {n[FAIL]} failed, {n[SKIP]} skipped in {time.perf_counter() - t0:.0f}s"
          + (f"; logs in {work / 'logs'}" if failed or cfg.workdir else ""))
    if not cfg.workdir:
        for sub in ("models", "runs", "cache", "data"):
            shutil.rmtree(work / sub, ignore_errors=True)  # GBs; the logs stay when something failed
        if not failed:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _run_checks(st: Selftest) -> None:
    cfg, work = st.cfg, st.work
    logs = work / "logs"
    cpu_env = P.child_env("cpu")
    all_env = P.child_env("cuda") if cfg.cuda or any(d != "cpu" for d in cfg.teacher_device) else cpu_env
    train_env = P.child_env(cfg.device)  # cuda:N... renumbered from 0: the trainer's rank r uses cuda:r
    timeout = cfg.timeout_s

    # -- the machine ---------------------------------------------------------------------------
    def versions() -> str:
        r = st.state["machine"] = probe("machine", all_env, logs / "machine.log", timeout,
                                        wanted=",".join([*cfg.device, *cfg.teacher_device]))
        v = r["versions"]
        if r["missing"]:
            raise SelftestFailure(f"missing: {', '.join(r['missing'])} (pip install 'llava-ckd[all]')")
        return ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers", "deepspeed", "zarr") if k in v) + \
            f", CUDA {v['torch.cuda']}"

    def devices() -> str:
        r = st.state["machine"]["devices"]
        c = r["cpu"]
        gpus = "; ".join(f"cuda:{g['index']} {g['name']} {g['free_gib']}/{g['total_gib']} GiB free, "
                         f"bf16 {'yes' if g['bf16'] and g['bf16_matmul'] else 'NO'}" for g in r["cuda"])
        bad = [f"cuda:{g['index']}: bf16 matmul failed" for g in r["cuda"] if not g["bf16_matmul"]]
        if r["problems"] or bad:
            raise SelftestFailure("; ".join(r["problems"] + bad))
        return (f"{c['cores']} CPU cores, {c['mem_available_gib']}/{c['mem_total_gib']} GiB RAM available"
                + (f"; {gpus}" if gpus else "; no GPU"))

    def ds_ops() -> str:
        r = probe("ds_ops", train_env, logs / "ds_ops.log", timeout, compile_needed=True, compile_all=cfg.compile_ops)
        detail = (f"accelerator {r['accelerator']}; installed: {', '.join(r['installed']) or 'none'}; "
                  f"JIT-compatible: {', '.join(r['compatible']) or 'none'}; not usable here: "
                  f"{', '.join(r['incompatible']) or 'none'}; built now: {', '.join(r['built']) or 'none'}")
        failed_needed = {k: v for k, v in r["build_failed"].items() if k in r["needed"]}
        if failed_needed or (r["needed"] and not r["ninja"]):
            raise SelftestFailure(f"the trainer needs {', '.join(r['needed'])}, which did not build: "
                                  f"{failed_needed or 'ninja is missing'} (install g++ and ninja)")
        if r["build_failed"]:
            detail += f"; failed to build: {', '.join(r['build_failed'])}"
        return detail

    st.check("versions", versions)
    st.check("devices", devices, needs=("versions",))
    st.check("deepspeed ops", ds_ops, needs=("versions",))

    # -- models and data -----------------------------------------------------------------------
    from deploy.selftest_models import write_llava_data

    student, teacher = work / "models" / "student", work / "models" / "teacher"
    n = 2 * cfg.ranks  # two micro-batches per rank: gradient accumulation is exercised

    def models() -> str:
        if cfg.tiny:
            code = ("import sys; from deploy.selftest_models import build_tiny_vlm as b; "
                    "b('tiny-student', sys.argv[1]); b('tiny-ta', sys.argv[2])")
            args = [str(student), str(teacher)]
        else:
            code = ("import sys; from deploy.selftest_models import qwen2_base_tokenizer as q, build_real_vlm as b; "
                    "t = q(sys.argv[3], sys.argv[5] or None); b('0.5b', sys.argv[1], t, sys.argv[4], seed=0); "
                    "b('1.5b', sys.argv[2], t, sys.argv[4], seed=1)")
            args = [str(student), str(teacher), str(work / "models" / "tokenizer"), cfg.strategy, cfg.tokenizer or ""]
        m = P.run_measured(P.python("-c", code, *args), logs / "models.log", cpu_env, timeout).check("building the models")
        gib = sum(f.stat().st_size for f in (work / "models").rglob("*") if f.is_file()) / P.GIB
        return f"student and teacher written in {m.seconds:.0f}s ({gib:.1f} GiB on disk)"

    st.check("models", models, needs=("versions",))
    words = 40 if cfg.tiny else 120
    data = write_llava_data(work / "data", n, n, instruction_words=words, rounds=2, seed=0)
    splits = (("pretrain", PRETRAIN), ("instruct", QWEN2_BASE))

    def prepare() -> str:
        out = []
        for split, template in splits:
            m, _ = P.prepare(student, data[split], data["images"], template, logs / f"prepare-{split}.log", cpu_env,
                             timeout)
            # the report's first line ("N samples, T tokens, ..."), not the progress bar's ("..., N samples, ...")
            report = next((ln for ln in m.log.read_text().splitlines() if re.match(r"\d+ samples, ", ln)), "")
            if not report.startswith(f"{n} samples"):
                raise SelftestFailure(f"ckd data prepare {split}: expected {n} samples, got: {report or 'no report'}")
            out.append(f"{split} {n} samples,{report.split(',')[1]}")
        return "; ".join(out)

    st.check("prepare", prepare, needs=("models",))

    def fused_loss() -> str:
        shape = dict(vocab=512, dim=64, nv=4, text=32, k=8) if cfg.tiny else \
            dict(vocab=151936, dim=896, nv=728 if cfg.strategy == "patch" else 729, text=256, k=64)
        dev = cfg.device[0]
        r = probe("fused_loss", all_env, logs / "fused_loss.log", timeout, device=dev, **shape)
        if r["max_rel_term_diff"] > 1e-4 or r["max_rel_grad_diff"] > 1e-3:
            raise SelftestFailure(f"the fused loss differs from the plain one on {dev}: terms {r['max_rel_term_diff']:.2e}, "
                                  f"gradients {r['max_rel_grad_diff']:.2e} (relative)")
        return (f"{dev}, {r['positions']} positions x vocab {r['vocab']}: terms within {r['max_rel_term_diff']:.1e}, "
                f"gradients within {r['max_rel_grad_diff']:.1e} of the plain loss")

    st.check("fused loss", fused_loss, needs=("versions", "devices"))

    # -- teacher servers and the fill ------------------------------------------------------------
    servers = st.state.setdefault("servers", [])
    for dev in cfg.teacher_device:
        def serve(dev=dev) -> str:
            s = P.start_server(teacher, dev, work / "servers", all_env, wait_s=timeout)
            servers.append(s)
            info = s.info()
            return (f"ready in {s.load_seconds:.0f}s at {s.url}: engine {info.engine}, {info.num_visual_tokens} visual "
                    f"tokens, vocab {info.vocab_size}, fingerprint {info.teacher_fingerprint[:12]}")

        st.check(f"server {dev}", serve, needs=("models", "devices"))

    cache = work / "cache"
    k = 8 if cfg.tiny else 64

    def fill() -> str:
        if not servers:
            raise SelftestFailure("no teacher server is running")
        out = []
        for split, template in splits:
            m = P.fill([s.url for s in servers], data[split], data["images"], template, k, cache,
                       logs / f"fill-{split}.log", cpu_env, timeout)
            out.append(f"{split} {n} samples in {m.seconds:.0f}s")
        for g in P.cache_bytes(cache, cpu_env):
            v = P.run_measured(P.python("-m", "logit_cache", "--quiet", "verify", str(cache), g.name),
                               logs / f"verify-{g.name}.log", cpu_env, timeout)
            if v.rc != 0:
                raise SelftestFailure(f"logit_cache verify {g.name} failed: {v.last_line()[:300]} (log {v.log})")
        return "; ".join(out) + f" through {len(servers)} server(s); verified"

    st.check("fill", fill, needs=tuple(f"server {d}" for d in cfg.teacher_device[:1]))
    for s in servers:  # the trainer may need the teacher's GPU memory
        s.stop()
    servers.clear()

    # -- training ------------------------------------------------------------------------------
    # --standalone: the rendezvous picks its own free port (no probed port another process can take)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(cfg.ranks)) if cfg.ranks > 1 else ()
    runs = work / "runs"
    results: dict[str, list[dict]] = {}

    def train(step: str, tag: str, *extra: str, global_batch: int = n, max_steps: int = 1) -> str:
        from student_trainer.config import STEPS

        split = STEPS[step].split
        m, rec = P.train(step, student, data[split], data["images"], runs / tag, logs / f"train-{tag}.log", train_env,
                         cache=cache if STEPS[step].uses_teacher else None, global_batch=global_batch,
                         micro_batch=1, max_steps=max_steps, extra=extra, launcher=launcher, timeout_s=timeout)
        if m.rc != 0:
            raise SelftestFailure(f"exit {m.rc}: {m.last_line()[:300]} (log {m.log})")
        if len(rec) != max_steps or not all(r["total"] == r["total"] for r in rec):  # NaN != NaN
            raise SelftestFailure(f"expected {max_steps} finite steps in metrics.jsonl, got {rec}")
        results[tag] = rec
        banner = m.log.read_text()
        engine = next((ln.strip() for ln in banner.splitlines() if ln.strip().startswith("ranks ")), "")
        gc = banner[banner.find("gradient checkpointing"):].splitlines()[0] if "gradient checkpointing" in banner else ""
        return (f"loss {rec[-1]['total']:.3f}, {rec[-1]['step_time']:.1f} s/step, peak RSS {m.peak_rss_gib:.1f} GiB; "
                f"{engine.split(';')[0]}; {gc}")

    def drop(*tags: str) -> None:
        """Delete step outputs no later check reads (real-shape checkpoints are several GB each)."""
        for tag in tags:
            shutil.rmtree(runs / tag, ignore_errors=True)

    def train_then_drop(step: str) -> str:
        try:
            return train(step, step)
        finally:
            drop(step)

    for step in STEP_ORDER:
        needs = ("devices", "prepare", "fill") if step in ("dpt", "dft") else ("devices", "prepare")
        if step == "pt":  # two steps, a checkpoint after the first: the round trip below resumes from it
            st.check("train pt", lambda: train("pt", "pt", "--save-every", "1", global_batch=cfg.ranks, max_steps=2),
                     needs=needs)
        elif step == "dft":  # kept for the ZeRO-3 comparison below; no warm-up, so its one step moves the weights
            st.check("train dft", lambda: train("dft", "dft", *NO_WARMUP), needs=needs)
        else:
            st.check(f"train {step}", lambda step=step: train_then_drop(step), needs=needs)

    def zero3() -> str:
        try:
            return _zero3()
        finally:
            drop("dft", "dft-zero3")

    def _zero3() -> str:
        detail = train("dft", "dft-zero3", "--zero-stage", "3", *NO_WARMUP)
        a, b = results["dft-zero3"][0]["total"], results["dft"][0]["total"]
        tol = 2e-2 if cfg.cuda else 1e-4  # bf16 on GPU
        if abs(a - b) > tol * max(1.0, abs(b)):
            raise SelftestFailure(f"ZeRO-3 loss {a:.6f} differs from ZeRO-2's {b:.6f}")
        # the loss is the forward; the update is the optimizer step: compare what both saved
        w2, w3, w0 = (_some_weights(d) for d in (runs / "dft" / "final", runs / "dft-zero3" / "final", student))
        for name in w2:
            scale = max(float(w2[name].abs().max()), 1e-6)
            if float((w3[name] - w2[name]).abs().max()) > tol * scale:
                raise SelftestFailure(f"after one step, {name} differs between ZeRO-3 and ZeRO-2")
        moved = sum(not bool((w2[n] == w0[n]).all()) for n in w2)
        if moved == 0:  # equal because nothing changed proves nothing about ZeRO-3's update
            raise SelftestFailure(f"the DFT step moved none of the {len(w2)} compared tensors: nothing to compare")
        return (f"same loss ({a:.5f} vs {b:.5f}) and the same updated weights ({len(w2)} tensors, {moved} moved by "
                f"the step) as ZeRO-2; " + detail)

    st.check("train dft ZeRO-3", zero3, needs=("train dft",))
    if "dft" in results and "dft-zero3" not in results:  # ZeRO-3 did not run: nothing reads DFT's outputs
        drop("dft")

    def round_trip() -> str:
        try:
            return _round_trip()
        finally:
            drop("pt")

    def _round_trip() -> str:
        from student_trainer import checkpoint as ckpt

        run = runs / "pt"
        first = results["pt"]
        checkpoint = run / ckpt.checkpoint_name(1)
        r = probe("stock_load", cpu_env, logs / "stock-load.log", timeout, model_dir=str(checkpoint))
        if not r["finite"]:
            raise SelftestFailure(f"{checkpoint}: stock transformers gave non-finite logits")
        os.replace(run / ckpt.FINAL, run / "final-first-run")  # resume from checkpoint 1, not from the end
        detail = train("pt", "pt", "--save-every", "1", "--resume", global_batch=cfg.ranks, max_steps=2)
        again = results["pt"]
        tol = 1e-2 if cfg.cuda else 1e-6
        if abs(again[1]["total"] - first[1]["total"]) > tol * max(1.0, abs(first[1]["total"])):
            raise SelftestFailure(f"resumed step 2 loss {again[1]['total']:.6f} != the uninterrupted run's "
                                  f"{first[1]['total']:.6f}")
        return (f"{checkpoint.name} loads in stock transformers (model + processor, {r['tokens']} tokens, vocab "
                f"{r['vocab']}); --resume continued to the same step-2 loss ({again[1]['total']:.5f}); " + detail)

    st.check("checkpoint round trip", round_trip, needs=("train pt",))


# (part, key suffix) of a few trained tensors; the file's key prefixes differ between transformers versions
WEIGHT_PROBES = (("multi_modal_projector", "linear_2.weight"), ("language_model", "layers.0.self_attn.q_proj.weight"),
                 ("language_model", "layers.0.mlp.down_proj.weight"), ("language_model", "norm.weight"))


# one optimizer step with the default warm-up (ceil(3 % of 1 step) = 1 step) runs at learning rate 0
NO_WARMUP = ("--warmup-ratio", "0")


def _some_weights(model_dir: Path) -> dict:
    """A few trained tensors of a saved model (connector, first LLM layer, final norm), read lazily."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                for part, suffix in WEIGHT_PROBES:
                    if part in key and key.endswith("." + suffix):
                        out[f"{part}.{suffix}"] = st.get_tensor(key).float()
    missing = [f"{p}.{s}" for p, s in WEIGHT_PROBES if f"{p}.{s}" not in out]
    if missing:
        raise SelftestFailure(f"{model_dir}: no {missing[0]} in its safetensors files")
    return out


def add_selftest_arguments(p) -> None:
    from ckd_common.config import add_arguments

    add_arguments(p, SelftestConfig)


def main_from_args(args) -> int:
    from ckd_common.config import ConfigError, from_args

    try:
        cfg = from_args(SelftestConfig, args)
        return run_selftest(cfg)
    except ConfigError as e:
        print(f"ckd selftest: {e}", file=sys.stderr)
        return 2
    except P.ProbeError as e:
        print(f"ckd selftest: {e}", file=sys.stderr)
        return 1
