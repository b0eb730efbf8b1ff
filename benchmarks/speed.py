"""Training-step speed, memory and operation count: plain network vs lorkd vs the papers' grouped convolution.

    python benchmarks/speed.py --out runs/bench.json                  # same as `lorkd bench`
    python benchmarks/speed.py --models resnet18_2d --tasks 2 10 --ranks 4 --count-ops --no-timing

See ``lorkd.bench`` for what is measured and how (students with per-task BatchNorm).
"""

from lorkd.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
