#!/usr/bin/env bash
# One machine, several GPUs for the student: DeepSpeed ZeRO over GPUs 1..N-1 while GPU 0 serves
# the teacher (or the cache is already filled). The global batch stays what the recipe says;
# DeepSpeed derives gradient accumulation from it and the number of ranks.
#   CACHE=cache/3b STUDENT=models/student-init DATA=data NGPU=4 bash deploy/recipes/multi_gpu_deepspeed.sh
set -euo pipefail
: "${CACHE:?}" "${STUDENT:?}" "${DATA:?}"
NGPU=${NGPU:-4}
INCLUDE="localhost:$(seq -s, 1 $((NGPU - 1)))"
deepspeed --include "$INCLUDE" --module student_trainer.cli distill --cache "$CACHE" --step all \
    --model "$STUDENT" --pretrain-data "$DATA/pretrain.json" --instruct-data "$DATA/instruct.json" \
    --images "$DATA/images" --out "${OUT:-runs/multi-gpu}" --zero-stage "${ZERO:-2}"
