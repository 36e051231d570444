#!/usr/bin/env python3
"""CBAM in a 3-D model: torchvision's R3D-18 video network on (N, C, T, H, W) clips.

For 5-D feature maps the channel gate pools over time and space, and the spatial gate is a
Conv3d over the [mean ; max] channel descriptors: a spatio-temporal attention map. The script
patches the residual branches of R3D-18 (random weights, no download) with identity init,
checks that the outputs did not change, takes one training step, and exports the patched model
with ``save_model``.

Run::

    python examples/video_3d.py                          # clips of 8 frames at 112x112
    python examples/video_3d.py --frames 4 --size 32     # small, for a quick check
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from cbam_insert import CBAM, insert_cbam, load_model, save_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Patch torchvision's R3D-18 with 3-D CBAM")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = torchvision.models.video.r3d_18(num_classes=5)
    example = (torch.zeros(1, 3, args.frames, args.size, args.size),)
    patched = insert_cbam(model, after="block", example_inputs=example, init="identity", seed=0)
    for site in patched.cbam_report.used:
        print(f"{site.module_name:<22} refines {list(site.shape)}")
    dims = sorted({m.dims for m in patched.modules() if isinstance(m, CBAM)})
    print(f"{len(patched.cbam_report.modules)} CBAM modules, dims={dims}")

    clips = torch.rand(2, 3, args.frames, args.size, args.size)
    with torch.no_grad():
        same = torch.allclose(patched.eval()(clips), model.eval()(clips), atol=1e-5)
    print(f"identity init keeps the function: {same}")

    opt = torch.optim.SGD(patched.parameters(), lr=0.01)
    loss = F.cross_entropy(patched.train()(clips), torch.tensor([1, 3]))
    loss.backward()
    opt.step()
    moved = [n for n in patched.cbam_report.modules if patched.get_submodule(n).gamma.item() != 0.0]
    print(f"one training step: loss {loss.item():.3f}; {len(moved)} of {len(patched.cbam_report.modules)} gates moved")

    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(patched, Path(tmp) / "r3d18_cbam.safetensors")
        rebuilt = load_model(path, arch=torchvision.models.video.r3d_18(num_classes=5))
        with torch.no_grad():
            equal = torch.allclose(rebuilt.eval()(clips), patched.eval()(clips), atol=1e-5)
        print(f"saved {path.name} ({path.stat().st_size / 1e6:.1f} MB) and rebuilt it: equal outputs {equal}")
    return 0 if same and equal and len(moved) == len(patched.cbam_report.modules) else 1


if __name__ == "__main__":
    sys.exit(main())
