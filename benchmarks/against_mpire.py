"""asyncsched against mpire ``WorkerPool.map`` on tiny tasks, in alternating rounds.

    python benchmarks/against_mpire.py [--tasks 20000] [--pairs 6]

Each round measures, each in a fresh interpreter: asyncsched (the suite's
throughput measurement: per-task timeouts and an events consumer on, store
off, workers warm), mpire with its defaults (which start new workers for every
``map()``, inside the timing: most runs land near one rate, a few near twice
that), and mpire with ``keep_alive=True`` (warm workers, like asyncsched's).
It prints every round and the ratios, then the medians.
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
    cold: list[float] = []
    warm: list[float] = []
    for pair in range(args.pairs):
        ours.append(in_fresh_process("suite.py", "throughput", json.dumps([args.tasks, False]))["tasks_per_s"])
        cold.append(args.tasks / in_fresh_process("peers.py", "mpire WorkerPool.map", str(args.tasks))["elapsed"])
        warm.append(args.tasks / in_fresh_process("peers.py", "mpire WorkerPool.map (keep_alive)",
                                                  str(args.tasks))["elapsed"])
        print(f"round {pair + 1}: asyncsched {ours[-1]:9,.0f}/s   mpire {cold[-1]:9,.0f}/s "
              f"(ratio {ours[-1] / cold[-1]:.2f})   mpire keep_alive {warm[-1]:9,.0f}/s "
              f"(ratio {ours[-1] / warm[-1]:.2f})")
    median = statistics.median
    print(f"medians: asyncsched {median(ours):,.0f}/s; mpire {median(cold):,.0f}/s, ratio "
          f"{median(ours) / median(cold):.2f}; mpire keep_alive {median(warm):,.0f}/s, ratio "
          f"{median(ours) / median(warm):.2f}")


if __name__ == "__main__":
    main()
