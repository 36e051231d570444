#!/usr/bin/env python3
"""Rebuild a patched model from a saved state dict and its recipe.

A patched model is an ``fx.GraphModule``; pickling one stores generated code. The portable way
to keep it is its weights plus the *recipe* (``patched.cbam_recipe``, plain JSON: placement,
selection, CBAM options, the module names it produced). Replaying the recipe on a freshly built
copy of the same architecture gives the same module names, so the state dict loads with
``strict=True``. This script shows that three ways:

1. by hand, with nothing but PyTorch files: ``torch.save(state_dict)`` + the recipe as JSON,
   then ``apply_recipe(fresh_model, recipe)`` and ``load_state_dict``;
2. with ``save_model(patched, "p.safetensors")`` (the recipe goes into the safetensors
   metadata) and ``load_model("p.safetensors", arch="torchvision:resnet18")``;
3. with ``save_model(patched, "p.pth")`` (the recipe goes beside it as ``p.pth.recipe.json``),
   rebuilt on an architecture given as a module: ``load_model("p.pth", arch=fresh_model)`` (the
   form to use when the builder needs arguments, e.g. ``num_classes``, or is your own class).

Each rebuilt model must give the same outputs as the patched one, in eval mode.

Run::

    python examples/rebuild_from_recipe.py                 # files go to a temporary directory
    python examples/rebuild_from_recipe.py --out-dir out   # keep them
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

from cbam_insert import apply_recipe, insert_cbam, load_model, save_model


def fresh_resnet18() -> torch.nn.Module:
    """The architecture as anyone would build it; its random weights get replaced on load."""
    return torchvision.models.resnet18()


def check(name: str, rebuilt: torch.nn.Module, patched: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        diff = (rebuilt.eval()(x) - patched.eval()(x)).abs().max().item()
    ok = diff <= 1e-5
    print(f"{name:<52} max |difference| = {diff:.2e}  {'OK' if ok else 'MISMATCH'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Save a patched ResNet-18 as weights + recipe and rebuild it")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    parser.add_argument("--size", type=int, default=64, help="example input side")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # the patched model; a few optimizer steps stand in for real training
    model = fresh_resnet18()
    example = (torch.zeros(1, 3, args.size, args.size),)
    patched = insert_cbam(model, after="block", example_inputs=example, include="layer[34].*",
                          reduction=8, variant="official", seed=0)  # fmt: skip
    opt = torch.optim.SGD(patched.parameters(), lr=0.05)
    for _ in range(2):
        loss = patched.train()(torch.rand(8, 3, args.size, args.size)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.rand(4, 3, args.size, args.size)
    print(f"patched: {len(patched.cbam_report.modules)} CBAM modules ({', '.join(patched.cbam_report.modules)})")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        ok = True

        # 1. by hand: a plain state dict and the recipe as JSON
        torch.save(patched.state_dict(), out / "weights.pth")
        (out / "recipe.json").write_text(json.dumps(patched.cbam_recipe, indent=2))
        recipe = json.loads((out / "recipe.json").read_text())
        rebuilt = apply_recipe(fresh_resnet18(), recipe)
        rebuilt.load_state_dict(torch.load(out / "weights.pth", weights_only=True), strict=True)
        ok &= check("1. apply_recipe + load_state_dict(strict=True)", rebuilt, patched, x)

        # 2. safetensors: the recipe travels in the file's metadata
        save_model(patched, out / "patched.safetensors")
        ok &= check("2. load_model(.safetensors, arch=...)",
                    load_model(out / "patched.safetensors", arch="torchvision:resnet18"), patched, x)  # fmt: skip

        # 3. a .pth state dict with its recipe beside it
        save_model(patched, out / "patched.pth")
        print(f"   wrote {sorted(p.name for p in out.iterdir() if p.name.startswith('patched'))}")
        ok &= check("3. load_model(.pth + .pth.recipe.json, arch=module)",
                    load_model(out / "patched.pth", arch=fresh_resnet18()), patched, x)  # fmt: skip

        # the original architecture's checkpoint still loads into the patched model: only CBAM keys are new
        missing, unexpected = rebuilt.load_state_dict(fresh_resnet18().state_dict(), strict=False)
        only_cbam = all(".cbam" in k or k.startswith("cbam") for k in missing) and not unexpected
        print(f"an unpatched checkpoint loads into the patched model: {len(missing)} CBAM keys missing, "
              f"{len(unexpected)} unexpected -> {'OK' if only_cbam else 'MISMATCH'}")  # fmt: skip
        ok &= only_cbam
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
