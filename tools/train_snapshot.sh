#!/bin/sh
# train_snapshot.sh - at a given UTC time, write the weights-only snapshot of a running stage
# (models/checkpoints/<stage>.pt, float16, see `train.py snapshot`) and commit that one file, so that a
# long training's progress survives when its processes are stopped and $CM_TRAIN is lost. Retries while
# another commit holds .git/index.lock.
#
#   nohup tools/train_snapshot.sh 20:57 base >"$CM_TRAIN/logs/snapshot.log" 2>&1 &
set -eu
cd "$(dirname "$0")/.."
at=$1
stage=${2:-base}
now=$(date -u +%s)
then=$(date -u -d "$at" +%s)
[ "$then" -gt "$now" ] && sleep $((then - now))
nice -n 19 /usr/bin/python3 tools/train.py snapshot --stage "$stage"
f=models/checkpoints/$stage.pt
step=$(/usr/bin/python3 -c "import torch; print(torch.load('$f')['step'])")
for i in 1 2 3 4 5 6 7 8 9 10; do
    if [ ! -e .git/index.lock ] && git add "$f" && \
        git commit -q -m "models/checkpoints/$stage.pt: weights-only snapshot at step $step (resume: docs/training.md)" -- "$f"; then
        echo "committed $f at step $step"
        exit 0
    fi
    sleep 10
done
echo "could not commit $f" >&2
exit 1
