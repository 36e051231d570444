#!/usr/bin/env python3
"""Why identity init matters: insert CBAM into a trained network, then fine-tune.

A narrow ResNet (three stages of residual blocks, 16/32/64 channels) is trained to
convergence on scikit-learn's 8x8 handwritten digits (1,797 images that ship inside
scikit-learn: nothing is downloaded), with a fixed seed and a stratified 80/20 train/test
split. Then CBAM is spliced into the trained network with ``cbam_insert.insert_cbam``

* on every residual branch (``after="block"``) and on every conv unit (``after="conv"``),
* (a) with PyTorch's default initialisation and (b) with ``init="identity"``,

and the test accuracy is measured right after patching and after a short fine-tune of the
whole patched network. The unpatched network fine-tuned for the same steps is the control.

Run::

    python examples/finetune_digits.py            # the full run (under a minute of CPU time)
    python examples/finetune_digits.py --json     # the same table as JSON on stdout
    python examples/finetune_digits.py --quick    # a few epochs, for the tests
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from cbam_insert import insert_cbam


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn on the residual branch, a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A narrow ResNet for 1x8x8 inputs: stem, three stages (8x8, 4x4, 2x2), pooled linear head."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            stage = [BasicBlock(cin, w, 1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            cin = w
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits as (N, 1, 8, 8) floats in [0, 1], split 80/20, stratified by class."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed, stratify=y.numpy()
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


BATCH = 64


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    """Adam with a cosine schedule, light augmentation (one-pixel shifts)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(y) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), BATCH):
            batch = order[i : i + BATCH]
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(x[batch], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy, in eval mode."""
    model.eval()
    logits = model(x)
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def run(
    epochs: int,
    finetune_epochs: int,
    lr: float,
    finetune_lr: float,
    seed: int,
    placements: list[str],
    log=print,
) -> dict:
    """Train, patch, fine-tune; return the table as a dict."""
    cpu0 = time.process_time()
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_data(seed)
    model = DigitsResNet()
    train(model, x_train, y_train, epochs, lr, seed)
    base = evaluate(model, x_test, y_test)
    log(f"trained {epochs} epochs: test accuracy {base[0]:.4f}, loss {base[1]:.4f}")

    def row(name: str, after: str, init: str, sites: int, added: int, before: tuple, after_ft: tuple) -> dict:
        r = {"model": name, "after": after, "init": init, "sites": sites, "added_params": added,
             "acc_patched": before[0], "loss_patched": before[1], "acc_finetuned": after_ft[0], "loss_finetuned": after_ft[1]}  # fmt: skip
        log(f"{name}: accuracy {before[0]:.4f} -> {after_ft[0]:.4f}, loss {before[1]:.4f} -> {after_ft[1]:.4f}")
        return r

    # the control: the same fine-tune (same batches) without CBAM
    control = copy.deepcopy(model)
    train(control, x_train, y_train, finetune_epochs, finetune_lr, seed + 1)
    rows = [row("original (no CBAM)", "-", "-", 0, 0, base, evaluate(control, x_test, y_test))]
    example = (torch.zeros(1, 1, 8, 8),)
    for after in placements:
        for init in ("default", "identity"):
            patched = insert_cbam(model, after=after, example_inputs=example, init=init, reduction=4, seed=seed)
            added = sum(p.numel() for p in patched.parameters()) - sum(p.numel() for p in model.parameters())
            at_insertion = evaluate(patched, x_test, y_test)
            train(patched, x_train, y_train, finetune_epochs, finetune_lr, seed + 1)
            sites = len(patched.cbam_report.modules)
            rows.append(row(f"CBAM after {after}, {init} init", after, init, sites, added, at_insertion,
                            evaluate(patched, x_test, y_test)))  # fmt: skip
    return {
        "dataset": "sklearn digits 8x8",
        "train_size": len(y_train),
        "test_size": len(y_test),
        "epochs": epochs,
        "finetune_epochs": finetune_epochs,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    ft = result["finetune_epochs"]
    lines = [
        f"| model | sites | added params | right after patching: test acc. (loss) | after {ft} fine-tune epochs |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['sites']} | {r['added_params']:,} | "
                     f"{100 * r['acc_patched']:.2f}% ({r['loss_patched']:.3f}) | "
                     f"{100 * r['acc_finetuned']:.2f}% ({r['loss_finetuned']:.3f}) |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="training epochs for the base network")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="fine-tune epochs after patching")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--after", action="append", choices=["block", "conv", "stage"],
                        help="placement(s) to try (default: block and conv)")  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (the tensors are tiny: one is fastest)"
    )
    parser.add_argument("--quick", action="store_true", help="3 training epochs and 1 fine-tune epoch (for tests)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON on stdout, nothing else")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.finetune_epochs = 3, 1
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    result = run(args.epochs, args.finetune_epochs, args.lr, args.finetune_lr, args.seed,
                 args.after or ["block", "conv"], log)  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"\n{result['train_size']} training and {result['test_size']} test images; "
              f"{result['cpu_seconds']} s of CPU time on {result['threads']} thread(s)\n")  # fmt: skip
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
