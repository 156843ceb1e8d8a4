#!/bin/bash
# Locked session 5: slack 1/4 again (B = git archive 2ff2746 built in place), both ways, and an A/A, to resolve lock3's.
cd /work/wt_bucket10k
export PYTHONPATH=/work/wt_bucket10k
A=/tmp/bucket10k/a; B=/tmp/bucket10k/x; O=/tmp/bucket10k/out
echo "start $(date -u +%T)"
KVSCHED_X_SLACK=4 taskset -c 1 .venv/bin/python tools/sched_ab.py --cpu-time --sessions 10000 --out $O/ab_slack4_10000_r2.json $A $B 4 300 2>/dev/null
echo "== swapped $(date -u +%T)"
KVSCHED_X_SLACK=4 taskset -c 1 .venv/bin/python tools/sched_ab.py --cpu-time --sessions 10000 --out $O/ab_slack4_10000_swapped_r2.json $B $A 4 300 2>/dev/null
echo "== aa $(date -u +%T)"
taskset -c 1 .venv/bin/python tools/sched_ab.py --cpu-time --sessions 10000 --out $O/aa_10000_c.json $A $A 4 300 2>/dev/null
echo "end $(date -u +%T)"
