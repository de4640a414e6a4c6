#!/usr/bin/env bash
# Several machines: N teacher replicas (one per GPU on the teacher nodes) feed ONE fill into a cache
# on shared storage (NFS/Lustre path or an s3:// URL); then DeepSpeed trains across the hostfile.
# Each replica is an independent `teacher_server serve`; the fill spreads samples over all of them
# and every writer commits its own segments, so replicas never contend for a cache file.
#   SERVERS="http://tnode1:8000 http://tnode1:8001 http://tnode2:8000" CACHE=/mnt/nfs/cache/7b \
#   STUDENT=/mnt/nfs/models/student DATA=/mnt/nfs/data bash deploy/recipes/multi_node/run.sh
set -euo pipefail
: "${SERVERS:?space-separated teacher server URLs}" "${CACHE:?}" "${STUDENT:?}" "${DATA:?}"
here=$(cd "$(dirname "$0")" && pwd)
args=(); for s in $SERVERS; do args+=(--server "$s"); done
logit_cache fill "${args[@]}" --data "$DATA/pretrain.json" --images "$DATA/images" --template pretrain --k 64 --out "$CACHE"
logit_cache fill "${args[@]}" --data "$DATA/instruct.json" --images "$DATA/images" --template qwen2_base --k 64 --out "$CACHE"
logit_cache verify "$CACHE"
deepspeed --hostfile "$here/hostfile" --module student_trainer.cli distill --cache "$CACHE" --step all \
    --model "$STUDENT" --pretrain-data "$DATA/pretrain.json" --instruct-data "$DATA/instruct.json" \
    --images "$DATA/images" --out "${OUT:-/mnt/nfs/runs/multi-node}" --zero-stage "${ZERO:-3}"
