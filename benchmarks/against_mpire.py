"""asyncsched against mpire ``WorkerPool.map`` on tiny tasks, in alternating pairs.

    python benchmarks/against_mpire.py [--tasks 20000] [--pairs 6]

mpire's throughput on this kind of machine is not one number: from one run to
the next it lands near one of two rates, about a factor of two apart. One pair
says little, so this runs several pairs, each measurement in a fresh
interpreter (the suite's throughput measurement for asyncsched: per-task
timeouts and an events consumer on, store off), and prints every pair and
its ratio, then the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics

from _common import in_fresh_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    ours: list[float] = []
    theirs: list[float] = []
    for pair in range(args.pairs):
        ours.append(in_fresh_process("suite.py", "throughput", json.dumps([args.tasks, False]))["tasks_per_s"])
        theirs.append(args.tasks / in_fresh_process("peers.py", "mpire WorkerPool.map", str(args.tasks))["elapsed"])
        print(f"pair {pair + 1}: asyncsched {ours[-1]:9,.0f}/s   mpire {theirs[-1]:9,.0f}/s   "
              f"ratio {ours[-1] / theirs[-1]:.2f}")
    print(f"medians: asyncsched {statistics.median(ours):,.0f}/s, mpire {statistics.median(theirs):,.0f}/s; "
          f"ratios from {min(a / b for a, b in zip(ours, theirs, strict=True)):.2f} "
          f"to {max(a / b for a, b in zip(ours, theirs, strict=True)):.2f}")


if __name__ == "__main__":
    main()
