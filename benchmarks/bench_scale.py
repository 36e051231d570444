"""How long the graph pass takes on torchvision's largest classifier.

    python benchmarks/bench_scale.py [--model regnet_y_128gf] [--after block]

Prints the time to build the model (not ours), to find the sites, and to patch it (deep copy of
the weights included), plus the graph size: the pass is linear in the number of nodes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam_insert import find_sites, insert_cbam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="regnet_y_128gf")
    parser.add_argument("--after", default="block")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = torchvision.models.get_model(args.model, weights=None)
    t1 = time.perf_counter()
    sites = find_sites(model, after=args.after)
    t2 = time.perf_counter()
    patched = insert_cbam(model, after=args.after)
    t3 = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    print(f"model            {args.model} ({params / 1e6:.1f} M parameters, {len(list(patched.graph.nodes))} graph nodes)")
    print(f"build (torchvision) {t1 - t0:8.2f} s")
    print(f"find_sites          {t2 - t1:8.2f} s   ({sum(s.used for s in sites)} sites used of {len(sites)})")
    print(f"insert_cbam         {t3 - t2:8.2f} s   (includes a deep copy of the weights)")


if __name__ == "__main__":
    main()
