"""The dirichlet hash's draws: sharetune's sorted lookups (`hashes.categorical`) against NumPy's
`Generator.choice(p=...)`, which draws the same values (tested), timed in one process.

    python benchmarks/bench_hashes.py [--weights 8000000] [--entries 4000000]

The lookups miss the cache once the table outgrows it (a large ArbNet's first layer: 150 528 inputs
x 200 units at compression 0.5); below that the two are alike.
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import compare

from sharetune.models.hashes import categorical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=int, default=8_000_000)
    parser.add_argument("--entries", type=int, default=4_000_000)
    parser.add_argument("--seconds", type=float, default=30.0, help="time per side")
    args = parser.parse_args()
    probs = np.random.default_rng(0).dirichlet(np.full(args.entries, 1.0))
    probs /= probs.sum()
    ours, numpys = np.random.default_rng(1), np.random.default_rng(1)
    ratio, spread, base = compare(lambda: categorical(probs, args.weights, ours),
                                  lambda: numpys.choice(args.entries, size=args.weights, p=probs), "cpu", args.seconds, block=0.0)
    print(f"{args.weights} draws over {args.entries} entries: Generator.choice {base:.2f} s; "
          f"categorical {ratio:.2f}x of it ({spread})")


if __name__ == "__main__":
    main()
