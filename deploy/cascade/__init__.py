"""``ckd cascade CONFIG.yaml``: a whole cascade (student <- TA <- Teacher) from one config.

For every stage it starts the teacher server(s) as child processes on the teacher's devices, waits
for ``/readyz``, fills the caches the stage needs (or reuses a cache group that already holds every
sample for the same teacher, tokenizer, template and data), stops the servers, and runs the trainer
on the training devices; re-running after a crash or Ctrl-C resumes. The strategies (``none``,
``single``, ``bottom-up``, ``top-down``) are described in :mod:`deploy.cascade.plan`.

Modules, one job each:
  config     the typed, validated config (the trainer's per-step options derived from TrainConfig)
  plan       the strategies and the stages they run (the one owner of the strategies)
  supervise  child processes, and the signals that stop them all
  caches     is a teacher's cache complete? (prepared data and teacher fingerprints memoised per run)
  gaps       the student's capacity gap to every chain teacher, before and after each stage
  run        the orchestration: fills, training steps, eval, timeline and summary
"""
from deploy.cascade.config import CascadeConfig, TeacherSpec
from deploy.cascade.plan import STRATEGIES, Stage, Strategy, Teacher, chain, plan, teacher_chain
from deploy.cascade.run import Cascade, run_cascade
from deploy.cascade.supervise import CascadeError, Children

__all__ = ["CascadeConfig", "TeacherSpec", "STRATEGIES", "Strategy", "Stage", "Teacher", "plan", "chain",
           "teacher_chain", "Cascade", "run_cascade", "CascadeError", "Children"]
