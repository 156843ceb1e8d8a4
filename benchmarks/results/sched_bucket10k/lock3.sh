#!/bin/bash
# Locked session 3: deeper water marks (slack 1/8, 1/4 of the budget) in lockstep both ways; fleet at budget 0.2.
cd /work/wt_bucket10k
export PYTHONPATH=/work/wt_bucket10k
A=/tmp/bucket10k/a; B=/work/wt_bucket10k; O=/tmp/bucket10k/out
echo "start $(date -u +%T)"
for s in 4 8; do
echo "== slack $s $(date -u +%T)"
KVSCHED_X_SLACK=$s taskset -c 1 .venv/bin/python tools/sched_ab.py --cpu-time --sessions 10000 --out $O/ab_slack${s}_10000.json $A $B 4 300 2>/dev/null
echo "== slack $s swapped $(date -u +%T)"
KVSCHED_X_SLACK=$s taskset -c 1 .venv/bin/python tools/sched_ab.py --cpu-time --sessions 10000 --out $O/ab_slack${s}_10000_swapped.json $B $A 4 300 2>/dev/null
done
fl(){ echo "== fleet $*"; env "$@" taskset -c 0 .venv/bin/kvsched simulate --generate --fleet --fp8-tier-blocks 0 --no-progress --policies kvsched 2>/dev/null | grep -E "^\| kvsched"; }
fl KVSCHED_PIN_BUDGET_FRACTION=0.2 KVSCHED_X_SLACK=8; fl KVSCHED_PIN_BUDGET_FRACTION=0.2 KVSCHED_X_SLACK=4
echo "end $(date -u +%T)"
