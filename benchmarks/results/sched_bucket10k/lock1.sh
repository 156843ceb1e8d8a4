#!/bin/bash
# One locked session: lockstep 10,000 (A vs B combo, A/A), per-pass costs, fleet quality of the variants.
cd /work/wt_bucket10k
export PYTHONPATH=/work/wt_bucket10k
A=/tmp/bucket10k/a; B=/work/wt_bucket10k; O=/tmp/bucket10k/out; mkdir -p $O
echo "start $(date -u +%T)"
KVSCHED_RI_RESCORE=0 KVSCHED_X_SLACK=16 taskset -c 1 .venv/bin/python tools/sched_ab.py --cpu-time --sessions 10000 --out $O/ab_combo_10000.json $A $B 4 300 2>/dev/null
echo "ab done $(date -u +%T)"
taskset -c 1 .venv/bin/python tools/sched_ab.py --cpu-time --sessions 10000 --out $O/aa_10000.json $A $A 4 300 2>/dev/null
echo "aa done $(date -u +%T)"
run(){ echo "== $1 $2 $3"; (cd $1; PYTHONPATH=$1 env $2 $3 taskset -c 1 .venv/bin/python /tmp/bucket10k/passcost.py 10000 300 2>/dev/null | tail -4 | cut -c1-600); }
run $A X=0; run $B KVSCHED_RI_RESCORE=0; run $B KVSCHED_X_SLACK=16; run $B KVSCHED_RI_RESCORE=0 KVSCHED_X_SLACK=16; run $B KVSCHED_RI_RESCORE=0 KVSCHED_RI_BUCKET_SHIFT=50; run $A X=0
echo "passcost done $(date -u +%T)"
fl(){ echo "== fleet $*"; env "$@" taskset -c 0 .venv/bin/kvsched simulate --generate --fleet --fp8-tier-blocks 0 --no-progress --policies kvsched 2>/dev/null | grep -E "^\| kvsched|share"; }
fl X=0; fl KVSCHED_RI_RESCORE=0; fl KVSCHED_RI_RESCORE=0 KVSCHED_RI_BUCKET_SHIFT=50; fl KVSCHED_RI_RESCORE=0 KVSCHED_RI_BUCKET_SHIFT=53
echo "end $(date -u +%T)"
