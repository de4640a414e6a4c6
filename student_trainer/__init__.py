"""student_trainer: the DeepSpeed trainer of the student VLM.

Job: train a small LLaVA student (stock transformers LlavaForConditionalGeneration) with one
configurable trainer — the TinyLLaVA PT/FT baselines and LLaVA-KD's SFT without a teacher, and
LLaVA-KD's DPT/DFT distillation from a logit cache (teacher top-k + tail and visual
autocorrelation read by sample key; no teacher loaded). Checkpoints are HF llava directories plus
DeepSpeed state for exact ``--resume``.

Run::

    student_trainer train   --step pt|ft|sft --model DIR --data FILE.json --images DIR --out DIR
    student_trainer distill --step dpt|dft|all --cache ROOT --model DIR --data FILE.json --images DIR --out DIR
    torchrun --nproc_per_node 2 -m student_trainer distill ...      # several ranks
    student_trainer eval ...                                        # benchmarks (= ckd_eval, its own package)

(or ``python -m student_trainer``). Modules: ``config`` (step table, typed config), ``data`` (cache
join, schedule, prefetching loader), ``trainer`` (the loop), ``checkpoint`` (atomic saves),
``feedback`` (progress, TensorBoard, curve, summary).
"""
