"""The evaluation command line is derived from its typed config (ckd_common.config.add_arguments):
every flag the command had keeps working and parses to the same EvalConfig."""
from __future__ import annotations

import argparse

import pytest

from ckd_common.config import options
from ckd_eval.cli import config_from_args, configure_parser
from ckd_eval.config import EvalConfig


def _parse(argv: list[str]) -> EvalConfig:
    return config_from_args(configure_parser(argparse.ArgumentParser(prog="ckd_eval")).parse_args(argv))


def test_every_flag_parses_to_the_config_field_it_names():
    cfg = _parse(["--bench", "synth,pope", "--model", "m", "--data-root", "d", "--out", "o", "--template", "pretrain",
                  "--batch-size", "3", "--max-new-tokens", "7", "--limit", "5", "--device", "cuda:1",
                  "--dtype", "bfloat16", "--annotation", "pope=a", "--annotation", "synth=b", "--overwrite",
                  "--allow-partial", "--no-progress", "--answers", "x.jsonl", "--annotations", "y",
                  "--questions", "q"])
    assert cfg == EvalConfig(action="run", bench="synth,pope", model="m", data_root="d", out="o", template="pretrain",
                             batch_size=3, max_new_tokens=7, limit=5, device="cuda:1", dtype="bfloat16",
                             annotation=["pope=a", "synth=b"], overwrite=True, allow_partial=True, progress=False,
                             answers="x.jsonl", annotations="y", questions="q")
    assert _parse(["score", "--bench", "gqa"]) == EvalConfig(action="score", bench="gqa")
    assert _parse([]) == EvalConfig()  # every default is the field's
    # every field but the positional ACTION is an option of the same name
    assert {o.name for o in options(EvalConfig)} == {f for f in EvalConfig.__dataclass_fields__} - {"action"}


@pytest.mark.parametrize("argv", [["--dtype", "float64"], ["--batch-size", "many"], ["sideways"]])
def test_bad_values_are_refused_by_the_parser(argv):
    with pytest.raises(SystemExit):
        _parse(argv)
