"""Test helper, not a test: ``python tests/trainer_pause.py STEP READY_FILE ARGS...`` runs
``student_trainer ARGS`` and, once optimizer step STEP has been recorded, writes READY_FILE and
blocks until it is killed. A test waits for READY_FILE and then kills the run at exactly that point
(no sleeps, no race with a run that finishes first). The pause is injected here, from outside:
the trainer and its config carry no test hook."""
from __future__ import annotations

import sys
import threading
from pathlib import Path


def main() -> int:
    pause_at, ready, argv = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    from student_trainer import feedback
    from student_trainer.cli import main as trainer_main

    record = feedback.Feedback.step

    def step_then_pause(self, rec: dict) -> None:
        record(self, rec)  # metrics.jsonl has the step before the pause
        if rec["step"] == pause_at:
            ready.write_text(str(pause_at))
            threading.Event().wait()  # until killed

    feedback.Feedback.step = step_then_pause
    return trainer_main(argv)


if __name__ == "__main__":
    sys.exit(main())
