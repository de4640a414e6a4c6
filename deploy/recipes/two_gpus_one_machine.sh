#!/usr/bin/env bash
# One machine, two GPUs: the teacher server on GPU 0, the trainer on GPU 1.
# They never share GPU memory; the cache on local disk is the only thing between them.
#   TEACHER=models/qwen2.5-3b-vlm STUDENT=models/student-init DATA=data bash deploy/recipes/two_gpus_one_machine.sh
set -euo pipefail
: "${TEACHER:?path of the teacher VLM (HF llava dir)}" "${STUDENT:?path of the student to train}" "${DATA:?data dir}"
CACHE=${CACHE:-cache/$(basename "$TEACHER")}
OUT=${OUT:-runs/$(basename "$TEACHER")-to-$(basename "$STUDENT")}
PORT=${PORT:-8765}
TOKEN_FILE=${TOKEN_FILE:-}

CUDA_VISIBLE_DEVICES=0 teacher_server serve --model "$TEACHER" --device cuda:0 --dtype bf16 \
    --port "$PORT" ${TOKEN_FILE:+--token-file "$TOKEN_FILE"} &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do sleep 2; kill -0 $SERVER; done

for split in "pretrain.json pretrain" "instruct.json qwen2_base"; do
  set -- $split
  logit_cache fill --server "http://127.0.0.1:$PORT" --data "$DATA/$1" --images "$DATA/images" \
      --template "$2" --k 64 --out "$CACHE" ${TOKEN_FILE:+--token-file "$TOKEN_FILE"}
done
kill $SERVER; wait $SERVER 2>/dev/null || true; trap - EXIT

CUDA_VISIBLE_DEVICES=1 student_trainer distill --cache "$CACHE" --step all --model "$STUDENT" \
    --pretrain-data "$DATA/pretrain.json" --instruct-data "$DATA/instruct.json" --images "$DATA/images" \
    --out "$OUT"
