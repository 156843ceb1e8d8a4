"""`kvsched bench sched` as a script: `python benchmarks/sched.py [options]` (same options, see `--help`)."""

import sys

from kvsched.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "sched", *sys.argv[1:]]))
