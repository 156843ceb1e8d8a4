"""Grid runner: python run.py TRACE [TRACE...]  (env SETS=comma names, PRESSURES=comma)
(Adversarial review, stop 37: traces from gen.py where kvsched must not compute more prefill than LRU.)
Runs kvsched simulate for each trace x setting x pressure (2 in parallel), appends a row per run to results.tsv."""
import json, os, subprocess, sys, itertools
from concurrent.futures import ThreadPoolExecutor
import pathlib
ROOT = pathlib.Path(__file__).resolve().parents[2]
KV = str(ROOT / ".venv/bin/kvsched")
OUT = os.environ.get("OUT_DIR", "/tmp/rev_adv")
SETS = {
    "default": {},
    "ttl60": {"KVSCHED_DEFAULT_TTL_S": "60"},
    "ttl600": {"KVSCHED_DEFAULT_TTL_S": "600", "KVSCHED_MAX_TTL_S": "600"},
    "ttl86400": {"KVSCHED_DEFAULT_TTL_S": "86400", "KVSCHED_MAX_TTL_S": "86400"},
    "ttl30_pb8": {"KVSCHED_PAYBACK_SAMPLING": "8"},
    "pb0": {"KVSCHED_PAYBACK_SAMPLING": "0"},
    "pb1": {"KVSCHED_PAYBACK_SAMPLING": "1"},
    "pb2": {"KVSCHED_PAYBACK_SAMPLING": "2"},
    "pb4": {"KVSCHED_PAYBACK_SAMPLING": "4"},
    "pb16": {"KVSCHED_PAYBACK_SAMPLING": "16"},
    "pb32": {"KVSCHED_PAYBACK_SAMPLING": "32"},
    "gain_down0.5": {"KVSCHED_PAYBACK_GAIN_DOWN": "0.5"},
    "gain_down1": {"KVSCHED_PAYBACK_GAIN_DOWN": "1"},
    "gain_down2": {"KVSCHED_PAYBACK_GAIN_DOWN": "2"},
    "gain_down3": {"KVSCHED_PAYBACK_GAIN_DOWN": "3"},
    "gain_down4": {"KVSCHED_PAYBACK_GAIN_DOWN": "4"},
    "gain_down6": {"KVSCHED_PAYBACK_GAIN_DOWN": "6"},
    "deadband1.5": {"KVSCHED_PAYBACK_DEADBAND": "1.5"},
    "ttl600_switch": {"KVSCHED_DEFAULT_TTL_S": "600", "KVSCHED_PAYBACK_START_TTL_S": "0"},
    "ttl600_budget1": {"KVSCHED_DEFAULT_TTL_S": "600", "KVSCHED_PIN_BUDGET_FRACTION": "1.0"},
    "max86400": {"KVSCHED_MAX_TTL_S": "86400"},
    "ttl29": {"KVSCHED_DEFAULT_TTL_S": "29.9"},
    "ttl31": {"KVSCHED_DEFAULT_TTL_S": "31"},
    "budget0.5": {"KVSCHED_PIN_BUDGET_FRACTION": "0.5"},
    "ret0.5": {"KVSCHED_RETURN_THRESHOLD": "0.5"},
}
def one(trace, sname, p):
    base = os.path.basename(trace).rsplit(".", 1)[0]
    out = f"{OUT}/out/{base}__{sname}__p{p}.json"
    env = dict(os.environ, **SETS[sname])
    for k in list(env):
        if k.startswith("KVSCHED_") and k not in SETS[sname]: del env[k]
    r = subprocess.run([KV, "simulate", trace, "--pressure", str(p), "--pressure-basis", "live", "--policies",
                        "lru,kvsched", "--out", out, "--no-progress"], env=env, capture_output=True, text=True)
    if r.returncode:
        return f"{base}\t{sname}\t{p}\tERROR {r.stderr.strip()[-300:]}"
    d = json.load(open(out))
    l, k = d["lru"]["prefill_tokens_computed"], d["kvsched"]["prefill_tokens_computed"]
    ks = d["kvsched"]
    return (f"{base}\t{sname}\t{p}\t{l}\t{k}\t{k/l if l else float('nan'):.4f}\t{d['config']['capacity_blocks_per_replica']}"
            f"\tpins={ks.get('pins')}\tcap={ks.get('payback_ttl_cap_s','-')}\tbal={ks.get('payback_balance','-')}\t{out}")
if __name__ == "__main__":
    sets = os.environ.get("SETS", "default,ttl60,ttl600,ttl86400").split(",")
    ps = [float(x) for x in os.environ.get("PRESSURES", "1.1,1.5,3,6").split(",")]
    done = set()
    if os.path.exists(f"{OUT}/results.tsv"):
        for l in open(f"{OUT}/results.tsv"):
            f = l.split("\t")
            if len(f) > 4 and not f[3].startswith("ERROR"): done.add((f[0], f[1], float(f[2])))
    jobs = [j for j in itertools.product(sys.argv[1:], sets, ps)
            if (os.path.basename(j[0]).rsplit(".", 1)[0], j[1], j[2]) not in done]
    with ThreadPoolExecutor(int(os.environ.get("JOBS","1"))) as ex, open(f"{OUT}/results.tsv", "a") as f:
        for line in ex.map(lambda j: one(*j), jobs):
            print(line, flush=True); f.write(line + "\n"); f.flush()
