"""Shared fixtures (tiny model presets and synthetic data, built once per test session) and the
test tiers, enforced:

- unmarked: fast unit tests, in this process only;
- ``integration``: starts a process (subprocess, fork, DataLoader workers), a server (binds a
  socket) or DeepSpeed / torch.distributed. An unmarked test (or a fixture it sets up) that does
  any of these fails at that call, naming the test — so ``make test-fast`` (``-m "not integration
  and not gpu and not slow"``) stays in-process by construction, not by convention;
- ``slow``: in-process, but seconds of CPU each (real-shape forwards); left out of ``make test-fast``;
- ``gpu``: needs CUDA; skipped without it.
"""
from __future__ import annotations

import json
import lzma
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# ---------------------------------------------------------------------------------------------
# the tier guard: what an unmarked test may not do


class TierViolation(RuntimeError):
    """An unmarked (fast, in-process) test started a process, a server or DeepSpeed."""


# Python's audit events for starting a process or a server (https://docs.python.org/3/library/audit_events.html).
# os.fork covers multiprocessing's fork start method and torch's DataLoader workers.
_GUARDED_EVENTS = {
    "subprocess.Popen": "starts a subprocess",
    "os.fork": "forks a process",
    "os.forkpty": "forks a process",
    "os.posix_spawn": "spawns a process",
    "os.spawn": "spawns a process",
    "os.system": "runs a shell command",
    "os.exec": "replaces the test process",
    "socket.bind": "binds a socket (starts a server)",
}


class _Guard:
    """Which unmarked test is running (None: no guard), and what it did that only integration tests may."""

    test: str | None = None
    violations: list[str] = []


def _audit(event: str, args: tuple) -> None:
    test = _Guard.test
    if test is None or event not in _GUARDED_EVENTS or _importing():
        return
    what = f"{_GUARDED_EVENTS[event]} ({event}{_describe(args)})"
    _Guard.violations.append(what)
    raise TierViolation(f"{test} {what} but is not marked integration: mark it @pytest.mark.integration "
                        "(the fast tier runs in-process only)")


def _importing() -> bool:
    """A module being imported (a library probing its platform at import, e.g. for a compiler or a
    GPU): not something the test starts, and which test pays for the import depends on the order."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _describe(args: tuple) -> str:
    if not args:
        return ""
    first = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else args[0]
    text = " ".join(map(str, first)) if isinstance(first, (list, tuple)) else str(first)
    return f": {text[:120]}"


sys.addaudithook(_audit)  # hooks cannot be removed; outside a guarded test phase it returns at once


def _audit_fork_exec() -> None:
    """multiprocessing's spawn and forkserver start methods call _posixsubprocess.fork_exec directly,
    which raises no audit event: give it one (subprocess keeps its own reference, and audits itself)."""
    try:
        import _posixsubprocess
    except ImportError:  # pragma: no cover - not POSIX
        return
    real = _posixsubprocess.fork_exec

    def fork_exec(*args, **kw):
        sys.audit("os.posix_spawn", args[1] if len(args) > 1 else "")  # (its executable list)
        return real(*args, **kw)

    _posixsubprocess.fork_exec = fork_exec


_audit_fork_exec()


def _ds_initialize_guard() -> None:
    """Wrap deepspeed.initialize once deepspeed is imported: with a process group already up (an
    earlier in-process integration test), a DeepSpeed engine starts without initialising one."""
    ds = sys.modules.get("deepspeed")
    if ds is None or getattr(ds.initialize, "_tier_guarded", False):
        return
    real = ds.initialize

    def initialize(*args, **kw):
        if _Guard.test is not None:
            what = "starts a DeepSpeed engine (deepspeed.initialize)"
            _Guard.violations.append(what)
            raise TierViolation(f"{_Guard.test} {what} but is not marked integration: mark it "
                                "@pytest.mark.integration")
        return real(*args, **kw)

    initialize._tier_guarded = True
    ds.initialize = initialize


def _distributed_initialized() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _guarded_phase(item):
    """Generator body of the setup/call/teardown wrappers: an unmarked test's phase runs guarded."""
    if item.get_closest_marker("integration") is not None:
        return (yield)
    _ds_initialize_guard()
    had_process_group = _distributed_initialized()
    _Guard.test, _Guard.violations = item.nodeid, []
    try:
        result = yield
    finally:
        _Guard.test = None
    violations = list(_Guard.violations)
    if not had_process_group and _distributed_initialized():
        violations.append("initialises torch.distributed")
    if violations:  # also when the code under test caught the TierViolation
        pytest.fail(f"{item.nodeid} is not marked integration but {'; '.join(dict.fromkeys(violations))}: "
                    "mark it @pytest.mark.integration", pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guarded_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guarded_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _guarded_phase(item))


@pytest.fixture(scope="session", autouse=True)
def _prepared_data_root(tmp_path_factory):
    """Prepared datasets (ckd_common.prepared) made by this session, in-process or by the processes it
    starts, go to a temporary root: never the user's ~/.cache."""
    os.environ["CKD_PREPARED_DIR"] = str(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'tiny-student': dir, 'tiny-ta': dir, 'tiny-teacher': dir} ('full' strategy)."""
    from ckd_common.model import PRESETS, init_preset

    root = tmp_path_factory.mktemp("models")
    return {name: init_preset(name, root / name) for name in PRESETS}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from ckd_common.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=0, n_pretrain=24, n_instruct=24, n_eval=10)
    return out


@pytest.fixture(scope="session")
def wide_synth_dir(synth_dir, tmp_path_factory):
    """The synthetic data with every image cropped to 112x64: there 'pad' and 'square' preprocessing
    give different pixels (the synthetic images are square)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("wide-synth")
    (root / "images").mkdir()
    for img in (synth_dir / "images").glob("*.png"):
        Image.open(img).crop((0, 0, 112, 64)).save(root / "images" / img.name)
    for f in ("pretrain.json", "instruct.json", "eval.jsonl"):
        shutil.copy(synth_dir / f, root / f)
    return root


@pytest.fixture(scope="session")
def student(tiny_models):
    from ckd_common.model import load_vlm

    return load_vlm(tiny_models["tiny-student"])


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread while a module trains: OpenMP spin-waits collapse on a shared 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


QWEN2_TOKENIZER = Path(__file__).parent / "fixtures" / "qwen2-tokenizer"  # vendored, see its README


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory) -> Path:
    """The real Qwen2 tokenizer as published (Instruct configuration: eos <|im_end|>, pad
    <|endoftext|>, a ChatML chat template), decompressed into a temporary directory."""
    out = tmp_path_factory.mktemp("qwen2-tokenizer")
    for f in QWEN2_TOKENIZER.iterdir():
        if f.suffix == ".xz":
            (out / f.stem).write_bytes(lzma.decompress(f.read_bytes()))
        elif f.suffix == ".json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def qwen2_base_tokenizer_dir(qwen2_tokenizer_dir, tmp_path_factory) -> Path:
    """The same tokenizer in the base models' configuration (Qwen2.5-0.5B/1.5B/3B, what
    TinyLLaVA-Factory saves beside a qwen2_base checkpoint): eos = pad = <|endoftext|>, no chat template."""
    out = tmp_path_factory.mktemp("qwen2-base-tokenizer")
    for f in qwen2_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=2048, padding_side="right")
    cfg.pop("chat_template")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    smap = json.loads((out / "special_tokens_map.json").read_text())
    smap["eos_token"] = dict(smap["eos_token"], content="<|endoftext|>")
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2))
    return out
