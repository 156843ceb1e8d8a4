"""`kvsched bench agents` as a script: `python benchmarks/agents.py [options]` (same options, see `--help`)."""

import sys

from kvsched.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "agents", *sys.argv[1:]]))
