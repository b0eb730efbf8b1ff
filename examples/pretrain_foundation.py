"""A stand-in foundation model trained outside lorkd (plain PyTorch + MONAI), for
``configs/medmnist_foundation.yaml``: a MONAI ResNet-18 (half width) trained on the BreastMNIST and
PneumoniaMNIST train splits with 4 outputs (breast: 0..1, pneumonia: 2..3), saved as a state dict
with a DDP-style ``module.`` prefix, the way checkpoints trained elsewhere often come.

    python examples/pretrain_foundation.py --epochs 3 --out runs/foundation.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import resnet18

FILES = ("breastmnist/breastmnist.npz", "pneumoniamnist/pneumoniamnist_reconstructed.npz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/foundation.pt"))
    args = parser.parse_args()
    torch.manual_seed(0)
    xs, ys, ts = [], [], []
    for t, name in enumerate(FILES):
        d = np.load(args.data / name)  # train split only: val and test stay unseen
        xs.append(torch.tensor(d["train_images"]).float().div(255).sub(0.5).div(0.5)[:, None])
        ys.append(torch.tensor(d["train_labels"]).long().view(-1))
        ts.append(torch.full((len(xs[-1]),), t))
    x, y, t = torch.cat(xs), torch.cat(ys), torch.cat(ts)
    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=4, widen_factor=0.5, conv1_t_stride=2)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.time()
    for epoch in range(args.epochs):
        net.train()
        perm, total = torch.randperm(len(x)), 0.0
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            logits = net(x[idx]).view(len(idx), 2, 2)[torch.arange(len(idx)), t[idx]]  # the sample's task's pair
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        print(f"epoch {epoch}: loss {total / len(x):.4f} ({time.time() - start:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
