"""Training-step speed and memory: plain network vs lorkd vs the papers' grouped convolution.

    python benchmarks/speed.py --out runs/bench.json      # same as `lorkd bench`

See ``lorkd.bench`` for what is measured and how.
"""

from lorkd.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
