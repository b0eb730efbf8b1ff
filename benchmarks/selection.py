"""Selection cost of ``data.select`` (:func:`lorkd.select`): seconds to pick ``--select`` of
``--pool`` feature vectors of width ``--dim``, per method, on the CPU.

    python benchmarks/selection.py                                   # the issue's size: 50k x 512 -> 1k
    python benchmarks/selection.py --pool 2000 --select 100 --threads 1   # a quick check

The pool is synthetic (seeded): ``--clusters`` Gaussian clusters with unequal weights, as pooled
features of a foundation model roughly are. Reading the features from a teacher is not timed here:
it is one forward pass over the pool (:func:`lorkd.data.select.task_features`). Prints the
machine, the threads, the sizes and the seconds; ``--out`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from lorkd import select
from lorkd.bench import describe_machine, machine_info


def synthetic_pool(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """``[n, dim]`` float32: points around ``clusters`` random centres (Zipf-like weights)."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(clusters, dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, clusters + 1)
    which = g.choice(clusters, size=n, p=weights / weights.sum())
    return centres[which] + 0.5 * g.normal(size=(n, dim)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="selection", description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=50_000, help="feature vectors in the pool (default 50000)")
    p.add_argument("--dim", type=int, default=512, help="feature width (default 512)")
    p.add_argument("--select", type=int, default=1000, help="vectors to select (default 1000)")
    p.add_argument("--clusters", type=int, default=64, help="clusters of the synthetic pool (default 64)")
    p.add_argument("--methods", nargs="+", default=["diverse", "kcenter"], choices=["diverse", "kcenter", "random"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(torch.get_num_threads(), "cpu")
    print(describe_machine(info))
    t0 = time.perf_counter()
    pool = synthetic_pool(args.pool, args.dim, args.clusters)
    print(f"pool: {args.pool} x {args.dim} float32 ({pool.nbytes / 2**20:.0f} MiB), made in "
          f"{time.perf_counter() - t0:.1f} s; selecting {args.select}")
    rows = []
    for method in args.methods:
        t0 = time.perf_counter()
        picked = select(pool, args.select, method)
        seconds = time.perf_counter() - t0
        rows.append({"method": method, "seconds": round(seconds, 3), "distinct": len(set(picked.tolist()))})
        print(f"{method:8s} {seconds:8.2f} s  ({len(picked)} picked)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory {peak:.0f} MiB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": info, "pool": args.pool, "dim": args.dim, "select": args.select,
                                        "clusters": args.clusters, "results": rows, "peak_rss_mib": round(peak)},
                                       indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
