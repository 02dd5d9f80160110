"""The yardstick: the canonical PyTorch VAE example (pytorch/examples, vae/main.py), timed.

A faithful copy of its training: MLP 784-400-20, Adam at 1e-3, batch 128, torchvision's
MNIST with ToTensor in a shuffled DataLoader, the summed BCE + KL, a test pass and a
64-sample decode every epoch. It reports the wall time of its epochs and its test loss, so
that the trainer's main job can be held against it on the same machine.

    python benchmarks/canonical.py [--epochs 10] [--threads N] [--json] [--limit-train-samples N]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

import common
from vae_dist.data import datasets as idx


class VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h), self.fc22(h)
        return self.decode(mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)), mu, logvar


def loss_function(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy(recon, x.view(-1, 784), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit-train-samples", type=int, default=None, help="train on the first N images (smoke tests)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(1)  # the example's default --seed
    root = str(common.torchvision_root(idx.default_data_dir()))
    train_set = datasets.MNIST(root, train=True, transform=transforms.ToTensor())
    if args.limit_train_samples:
        train_set = Subset(train_set, range(args.limit_train_samples))
    train_loader = DataLoader(train_set, batch_size=128, shuffle=True)
    test_loader = DataLoader(datasets.MNIST(root, train=False, transform=transforms.ToTensor()), batch_size=128)
    model = VAE()
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    curve, started = [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        for x, _ in train_loader:
            optimizer.zero_grad()
            recon, mu, logvar = model(x)
            loss_function(recon, x, mu, logvar).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            test_loss = 0.0
            for x, _ in test_loader:
                recon, mu, logvar = model(x)
                test_loss += loss_function(recon, x, mu, logvar).item()
            model.decode(torch.randn(64, 20))
        curve.append({"epoch": epoch, "test_loss": test_loss / len(test_loader.dataset),
                      "elapsed_s": time.perf_counter() - started})
        common.log(f"epoch {epoch}: test loss {curve[-1]['test_loss']:.2f}, {curve[-1]['elapsed_s']:.1f} s")
    result = {"mode": "canonical", "epochs": args.epochs, "wall_s": curve[-1]["elapsed_s"],
              "final_test_loss": curve[-1]["test_loss"], "curve": curve, **common.environment(torch.device("cpu"))}
    with common.json_stdout(args.json) as emit:
        emit(result)
    if not args.json:
        print(f"canonical example: {args.epochs} epochs in {result['wall_s']:.1f} s, test loss {result['final_test_loss']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
