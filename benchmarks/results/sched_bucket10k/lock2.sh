#!/bin/bash
# Locked session 2: the slack variant (the one that changes no simulate/Mooncake decision) in lockstep, A/A, 256; fleet at budget 0.2.
cd /work/wt_bucket10k
export PYTHONPATH=/work/wt_bucket10k
A=/tmp/bucket10k/a; B=/work/wt_bucket10k; O=/tmp/bucket10k/out; mkdir -p $O
echo "start $(date -u +%T)"
KVSCHED_X_SLACK=16 taskset -c 1 .venv/bin/python tools/sched_ab.py --cpu-time --sessions 10000 --out $O/ab_slack16_10000.json $A $B 4 300 2>/dev/null
echo "== swapped $(date -u +%T)"
KVSCHED_X_SLACK=16 taskset -c 1 .venv/bin/python tools/sched_ab.py --cpu-time --sessions 10000 --out $O/ab_slack16_10000_swapped.json $B $A 4 300 2>/dev/null
echo "== aa $(date -u +%T)"
taskset -c 1 .venv/bin/python tools/sched_ab.py --cpu-time --sessions 10000 --out $O/aa_10000_b.json $A $A 4 300 2>/dev/null
echo "== 256 $(date -u +%T)"
KVSCHED_X_SLACK=16 taskset -c 1 .venv/bin/python tools/sched_ab.py --cpu-time --sessions 256 --out $O/ab_slack16_256.json $A $B 4 300 2>/dev/null
echo "== aa 256 $(date -u +%T)"
taskset -c 1 .venv/bin/python tools/sched_ab.py --cpu-time --sessions 256 --out $O/aa_256.json $A $A 4 300 2>/dev/null
echo "== fleet at budget 0.2 $(date -u +%T)"
fl(){ echo "== fleet $*"; env "$@" taskset -c 0 .venv/bin/kvsched simulate --generate --fleet --fp8-tier-blocks 0 --no-progress --policies kvsched 2>/dev/null | grep -E "^\| kvsched"; }
fl KVSCHED_PIN_BUDGET_FRACTION=0.2; fl KVSCHED_PIN_BUDGET_FRACTION=0.2 KVSCHED_X_SLACK=16; fl KVSCHED_PIN_BUDGET_FRACTION=0.2 KVSCHED_X_SLACK=32
echo "end $(date -u +%T)"
