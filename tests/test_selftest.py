"""``ckd selftest``: the whole check on the tiny presets passes with a table and exit 0; a device that is
not there fails with a clear row and a non-zero exit; the config reports every problem at once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("versions", "devices", "deepspeed ops", "models", "prepare", "fused loss", "server cpu", "fill", "train pt",
        "train ft", "train sft", "train dpt", "train dft", "train dft ZeRO-3", "checkpoint round trip")


def _selftest(*args: str, tmp: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "deploy", "selftest", *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _rows(stdout: str) -> dict[str, str]:
    """The final table: check name -> result."""
    table = stdout[stdout.index("check "):]
    out = {}
    for line in table.splitlines()[2:]:
        if not line.strip():
            break
        for status in ("PASS", "FAIL", "SKIP"):
            if f"  {status}  " in line:
                out[line.split(f"  {status}  ")[0].strip()] = status
    return out


@pytest.mark.integration
def test_tiny_selftest_passes_every_check(tmp_path):
    r = _selftest("--tiny", "--device", "cpu", "--workdir", str(tmp_path / "work"), tmp=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rows = _rows(r.stdout)
    assert list(rows) == list(ROWS) and set(rows.values()) == {"PASS"}, rows
    assert f"ckd selftest: {len(ROWS)} passed, 0 failed, 0 skipped" in r.stdout
    assert "the same updated weights" in r.stdout and "--resume continued to the same step-2 loss" in r.stdout
    assert "built now: deepspeed_shm_comm" in r.stdout  # the CPU trainer's JIT op
    assert (tmp_path / "work" / "logs" / "train-dft.log").is_file()  # --workdir keeps everything


@pytest.mark.integration
def test_a_missing_device_fails_clearly_and_exits_non_zero(tmp_path):
    r = _selftest("--tiny", "--device", "cuda:7", tmp=tmp_path, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:]
    rows = _rows(r.stdout)
    assert rows["devices"] == "FAIL" and "device cuda:7 does not exist here" in r.stdout
    # what needs the device is skipped, saying why; what does not still ran
    assert {rows[c] for c in ("fused loss", "server cuda:7", "fill", "train pt", "train dft",
                              "checkpoint round trip")} == {"SKIP"}, rows
    assert rows["versions"] == rows["models"] == rows["prepare"] == "PASS"
    assert "needs devices" in r.stdout
    assert "logs in " in r.stdout and "Traceback" not in r.stdout + r.stderr


def test_config_reports_every_problem_at_once():
    from ckd_common.config import ConfigError
    from deploy.selftest import SelftestConfig

    cfg = SelftestConfig(device=["cpu", "cpu", "gpu0"], teacher_device=["tpu"], timeout_s=0)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    for needle in ("device 'gpu0': use cpu, cuda or cuda:N", "device 'tpu'", "one rank", "lists a device twice",
                   "timeout-s must be positive"):
        assert needle in msg, needle


def test_prepare_rate_is_read_from_the_report_not_the_command_time():
    """The rehearsal's prepare rate is the build's (``ckd data prepare``'s report line, as prepare_report
    writes it); a progress bar written to a log prints no rate, and the command's wall time is mostly
    start-up."""
    from ckd_common.cli import prepare_report
    from deploy.selftest_pipeline import build_rate, progress_rate

    class Prepared:  # what prepare_report reads of a PreparedData
        manifest = {"tokens": 9, "response_positions": 3, "records": 128, "seconds": 0.5, "workers": 2}
        template, fingerprint, path, skipped, notes, warnings = "pretrain", "f" * 32, "/p", {}, {}, []

        def __len__(self) -> int:
            return 128

    report = prepare_report(Prepared())
    bar = "prepare x.json [pretrain]: 100%|██████████| , 128 samples, 0 skipped [00:00<00:00]\n"
    assert build_rate(bar + report) == 256.0
    assert build_rate(bar) is None and progress_rate(bar) is None
    assert progress_rate("[00:02<00:00, 61.5sample/s]") == 61.5
