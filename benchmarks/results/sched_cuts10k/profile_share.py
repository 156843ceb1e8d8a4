"""Shares of a `py-spy record -f raw` profile's samples inside `_Round.step` under one frame (helper cuts10k):

    python profile_share.py PROFILE.raw FRAME [EXCLUDED_FRAME ...]

prints the frame's inclusive share of the step's samples (leaving out stacks through an excluded frame, e.g. the
budget pass under `SessionPins.on_request_finished`) and the shares of every frame below it."""

from __future__ import annotations

import collections
import sys


def main() -> int:
    path, focus, excluded = sys.argv[1], sys.argv[2], sys.argv[3:]
    total = under = 0
    shares: collections.Counter[str] = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, n_text = line.rstrip("\n").rsplit(" ", 1)
            n = int(n_text)
            frames = [fr.split(" (")[0] for fr in stack.split(";")]
            if "_Round.step" not in frames:
                continue
            total += n
            if focus not in frames:
                continue
            frames = frames[frames.index(focus):]
            if any(e in frames for e in excluded):
                continue
            under += n
            for fr in set(frames):
                shares[fr] += n
    print(f"step samples {total}; {focus} (excluding {excluded}) {under} = {100 * under / total:.2f}%")
    for name, n in shares.most_common(60):
        print(f"{100 * n / total:6.2f}% {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
