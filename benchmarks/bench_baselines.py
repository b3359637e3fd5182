"""LipNeXt against the LiResNet-style and BRONet-style baselines and the peer orthogonal
methods: the commands behind the tables of docs/BENCHMARKS.md, in one script.

    python benchmarks/bench_baselines.py [--quick] [--race] [--out runs/bench]

Runs ``lipnext bench`` three times (models at equal parameter counts, fp32 and bf16;
orthogonal updates at C = 256, 1024, 4096; with --race the 10-minute budget race on
../shared/data/cifar10-subset.npz) and prints the ratio tables. --quick uses small
sizes (a smoke test, a few minutes on a CPU).
"""
from __future__ import annotations

import argparse
import sys

from lipnext.cli import main

SMALL = "lipnext_l8w128,liresnet_l7w64,bronet_l6w96"
MEDIUM = "lipnext_l12w256,liresnet_l11w128,bronet_l12w172"


def commands(out: str, quick: bool, race: bool) -> list[list[str]]:
    steps = ["--steps", "1", "--warmup", "0"] if quick else ["--steps", "3", "--warmup", "1"]
    cmds = [["bench", "--models", SMALL, "--dtype", "fp32,bf16", *steps, "--out", f"{out}/small"]]
    if not quick:
        cmds.append(["bench", "--models", MEDIUM, "--dtype", "fp32", *steps, "--out", f"{out}/medium"])
    cmds.append(["bench", "--orthogonal", "--sizes", "64,128" if quick else "256,1024", *steps,
                 "--out", f"{out}/orthogonal"])
    if not quick:
        cmds.append(["bench", "--orthogonal", "--sizes", "4096", "--steps", "1", "--warmup", "0",
                     "--methods", "lipnext_manifold_adam,fast_exp,matrix_exp,cayley,"
                     "geoopt_radam_stiefel,torch_orthogonal_cayley,torchlip_spectral_linear", "--out", f"{out}/orthogonal4096"])
    if race:
        cmds.append(["bench", "--race", "--data", "npz:../shared/data/cifar10-subset.npz",
                     "--holdout", "1000", "--budget-minutes", "0.5" if quick else "10",
                     "--models", SMALL, "--out", "runs/race"])
    return cmds


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--race", action="store_true")
    p.add_argument("--out", default="runs/bench")
    a = p.parse_args()
    for cmd in commands(a.out, a.quick, a.race):
        print("$ lipnext " + " ".join(cmd), flush=True)
        rc = main(cmd)
        if rc:
            sys.exit(rc)
