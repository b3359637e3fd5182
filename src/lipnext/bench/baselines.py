"""LipNeXt against the LiResNet-style and BRONet-style baselines and the peer orthogonal
methods: the ``lipnext bench`` runs behind the tables of docs/BENCHMARKS.md, in one go.

Models at equal parameter counts (fp32 and bf16), orthogonal updates at C = 256, 1024,
4096, and with ``race`` the 10-minute budget race on ../shared/data/cifar10-subset.npz.
``quick`` uses small sizes (a smoke test, a few minutes on a CPU).
"""
from __future__ import annotations

__all__ = ["SMALL", "MEDIUM", "commands", "run_baselines"]

SMALL = "lipnext_l8w128,liresnet_l7w64,bronet_l6w96"
MEDIUM = "lipnext_l12w256,liresnet_l11w128,bronet_l12w172"


def commands(out: str, quick: bool, race: bool) -> list[list[str]]:
    """The ``lipnext`` argument lists, in order."""
    steps = ["--steps", "1", "--warmup", "0"] if quick else ["--steps", "3", "--warmup", "1"]
    cmds = [["bench", "--models", SMALL, "--dtype", "fp32,bf16", *steps, "--out", f"{out}/small"]]
    if not quick:
        cmds.append(["bench", "--models", MEDIUM, "--dtype", "fp32", *steps, "--out", f"{out}/medium"])
    cmds.append(["bench", "--orthogonal", "--sizes", "64,128" if quick else "256,1024", *steps,
                 "--out", f"{out}/orthogonal"])
    if not quick:
        cmds.append(["bench", "--orthogonal", "--sizes", "4096", "--steps", "1", "--warmup", "0",
                     "--methods", "lipnext_manifold_adam,fast_exp,matrix_exp,cayley,"
                     "geoopt_radam_stiefel,torch_orthogonal_cayley,torchlip_spectral_linear",
                     "--out", f"{out}/orthogonal4096"])
    if race:
        cmds.append(["bench", "--race", "--data", "npz:../shared/data/cifar10-subset.npz",
                     "--holdout", "1000", "--budget-minutes", "0.5" if quick else "10",
                     "--models", SMALL, "--out", "runs/race"])
    return cmds


def run_baselines(out: str = "runs/bench", quick: bool = False, race: bool = False) -> int:
    """Run the commands one after the other; stop at the first that fails (its exit code)."""
    from ..cli import main
    for cmd in commands(out, quick, race):
        print("$ lipnext " + " ".join(cmd), flush=True)
        rc = main(cmd)
        if rc:
            return rc
    return 0
