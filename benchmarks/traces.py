"""`kvsched bench traces` as a script: `python benchmarks/traces.py [options]` (same options, see `--help`)."""

import sys

from kvsched.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "traces", *sys.argv[1:]]))
