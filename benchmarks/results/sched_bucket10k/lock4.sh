#!/bin/bash
# Locked session 4: the fleet at budget 0.2 with slack 1/8 and 1/4, from the experiment's tree (git archive 2ff2746, pure
# Python: the simulator's clock is logical, so the decisions are the compiled build's). lock3's two fleet runs started
# after the worktree's revert and ran main's code: discarded.
cd /tmp/bucket10k/x
export PYTHONPATH=/tmp/bucket10k/x
echo "start $(date -u +%T)"
fl(){ echo "== fleet $*"; env "$@" taskset -c 0 .venv/bin/kvsched simulate --generate --fleet --fp8-tier-blocks 0 --no-progress --policies kvsched 2>/dev/null | grep -E "^\| kvsched"; }
.venv/bin/python -c "import kvsched, kvsched.compiled as c; print(kvsched.__file__, c.mode)"
fl KVSCHED_PIN_BUDGET_FRACTION=0.2 KVSCHED_X_SLACK=8; fl KVSCHED_PIN_BUDGET_FRACTION=0.2 KVSCHED_X_SLACK=4
echo "end $(date -u +%T)"
