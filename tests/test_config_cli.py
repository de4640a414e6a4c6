"""The command line derived from a config dataclass (ckd_common.config): one declaration per option,
parsed by argparse, written back as a command line, and parsed from YAML values the same way."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ckd_common.config import CommandConfig, add_arguments, from_args, options, parse_value, to_argv


@dataclass
class Toy(CommandConfig):
    name: str = field(metadata={"help": "required: no default"})
    out: Path | None = None
    lr: float | None = field(default=None, metadata={"group": "optim", "help": "learning rate"})
    steps: int = field(default=3, metadata={"group": "optim", "choices": (1, 2, 3, 4)})
    betas: tuple[float, float] = (0.9, 0.999)
    progress: bool = True
    resume: bool = False
    server: list[str] = field(default_factory=list)
    secret: int = field(default=0, metadata={"hidden": True})
    internal: str = field(default="x", metadata={"cli": False})


def build_parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    add_arguments(p, Toy, groups={"optim": "optimisation"}, **kw)
    return p


def test_options_follow_the_field_types_defaults_and_metadata(capsys):
    by = {o.name: o for o in options(Toy)}
    assert "internal" not in by and by["name"].required and not by["out"].required
    assert (by["betas"].kind, by["betas"].nargs) == ("tuple", 2)
    assert by["progress"].kind == "bool" and by["server"].kind == "list" and by["steps"].choices == (1, 2, 3, 4)
    a = build_parser().parse_args(["--name", "n", "--lr", "1e-3", "--steps", "2", "--betas", "0.8", "0.9", "--no-progress",
                              "--resume", "--server", "a", "--server", "b", "--secret", "7", "--out", "o"])
    cfg = from_args(Toy, a)
    assert cfg == Toy(name="n", out=Path("o"), lr=1e-3, steps=2, betas=(0.8, 0.9), progress=False, resume=True,
                      server=["a", "b"], secret=7)
    assert from_args(Toy, build_parser().parse_args(["--name", "n"])) == Toy(name="n")
    build_parser().print_help()
    help_text = capsys.readouterr().out
    assert "--secret" not in help_text and "--internal" not in help_text and "optimisation:" in help_text
    assert "--progress, --no-progress" in help_text and "learning rate" in help_text
    for bad in (["--lr", "1e-3"], ["--name", "n", "--steps", "9"], ["--name", "n", "--lr", "fast"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


def test_to_argv_parses_back_to_the_same_config():
    configs = [Toy(name="n"), Toy(name="x y", out=Path("/tmp/o"), lr=3e-5, steps=1, betas=(0.5, 0.25), progress=False,
                                  resume=True, server=["http://a:1", "http://b:2"], secret=-2),
               Toy(name="n", lr=0.1 + 0.2)]  # a float that only repr() writes exactly
    for cfg in configs:
        argv = to_argv(cfg)
        assert from_args(Toy, build_parser().parse_args(argv), internal=cfg.internal) == cfg, argv
    assert to_argv(Toy(name="n")) == ["--name", "n"]  # defaults are left out
    assert to_argv(Toy(name="n", progress=False), skip=["progress"]) == ["--name", "n"]


def test_parse_value_takes_yaml_values_like_the_command_line():
    assert parse_value(Toy, "lr", "1e-3") == 1e-3  # PyYAML reads 1e-3 (no dot) as a string
    assert parse_value(Toy, "lr", 2) == 2.0 and parse_value(Toy, "lr", None) is None
    assert parse_value(Toy, "betas", [0.5, 1]) == (0.5, 1.0) and parse_value(Toy, "progress", "false") is False
    assert parse_value(Toy, "out", "x") == Path("x") and parse_value(Toy, "server", "a") == ["a"]
    for name, value, reason in [("steps", "many", "'many' is not int"), ("steps", 2.5, "is not int"),
                                ("steps", 9, "9 is not one of [1, 2, 3, 4]"), ("lr", True, "is not float"),
                                ("betas", [1], "not a list of 2 values"), ("progress", "maybe", "not a boolean"),
                                ("steps", None, "must not be empty")]:
        with pytest.raises(ValueError, match=re.escape(reason)):
            parse_value(Toy, name, value)


def test_a_list_options_choices_are_checked_element_by_element():
    from student_trainer.config import TrainConfig

    assert parse_value(TrainConfig, "trainable", ["connector", "llm"]) == ["connector", "llm"]
    assert parse_value(TrainConfig, "trainable", "llm") == ["llm"]
    with pytest.raises(ValueError, match=re.escape("'vision' is not one of ['connector', 'llm']")):
        parse_value(TrainConfig, "trainable", ["connector", "vision"])


def test_trainer_cli_is_derived_from_train_config():
    from student_trainer.cli import build_parser as trainer_parser
    from student_trainer.config import TEACHER_GROUP, TrainConfig

    train, distill = (trainer_parser()._subparsers._group_actions[0].choices[c] for c in ("train", "distill"))
    flags = {c: {s for a in p._actions for s in a.option_strings} for c, p in (("train", train), ("distill", distill))}
    for o in options(TrainConfig):
        assert o.flag in flags["distill"], o.flag
        assert (o.flag in flags["train"]) == (o.group != TEACHER_GROUP), o.flag
    assert "--step-delay" not in flags["distill"]  # test hooks live in the tests (tests/trainer_pause.py)
    # every option a run used to take still parses
    old = ["--step", "dft", "--model", "m", "--data", "d", "--out", "o", "--cache", "c", "--teacher-fingerprint", "f",
           "--on-missing", "skip", "--lr", "1e-3", "--global-batch", "8", "--micro-batch", "2", "--epochs", "2",
           "--max-steps", "3", "--warmup-ratio", "0.1", "--weight-decay", "0.01", "--grad-clip", "0", "--max-length",
           "64", "--seed", "1", "--zero-stage", "3", "--precision", "fp32", "--gradient-checkpointing", "--alpha", "1",
           "--beta", "0.5", "--gamma", "0", "--delta", "2", "--rel-variant", "column", "--chunk-size", "8",
           "--no-group-by-length", "--num-workers", "0", "--prefetch", "1", "--data-on-error", "skip", "--save-every",
           "2", "--keep-last", "1", "--resume", "--no-progress", "--no-tensorboard", "--local_rank=0"]
    cfg = from_args(TrainConfig, trainer_parser().parse_args(["distill", *old]))
    assert (cfg.cache, cfg.on_missing, cfg.zero_stage, cfg.group_by_length, cfg.resume, cfg.tensorboard) == (
        "c", "skip", 3, False, True, False)
    assert from_args(TrainConfig, trainer_parser().parse_args(["distill", *to_argv(cfg)])) == cfg
