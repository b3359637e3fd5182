"""Certification time of two versions of lipnext in one process, alternated (A B B A ...), on
a run folder's test split; prints the median of the per-round CPU-time ratios new / base.

The baseline is another commit's package under the name lipnext_base:

    git worktree add /tmp/base <commit>
    mkdir -p /tmp/abpkg && cp -r /tmp/base/src/lipnext /tmp/abpkg/lipnext_base
    python tools/certify_ab.py RUN ROUNDS [/tmp/abpkg]

One torch thread; CPU time (not wall) per call, so that the load of a shared machine moves
both versions alike. lipnext's modules import each other relatively, so a renamed copy is
self-contained.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import yaml


def main(run: str, rounds: int, base_path: str) -> str:
    sys.path.insert(0, base_path)
    import lipnext
    import lipnext_base
    from lipnext.config import config_from_dict, dataset_options
    from lipnext.data import get_dataset
    from lipnext.engine.evaluate import certify_dataset
    from lipnext_base.engine.evaluate import certify_dataset as certify_dataset_base

    torch.set_num_threads(1)
    with open(f"{run}/config.yaml") as f:
        cfg = config_from_dict(yaml.safe_load(f))
    ds = get_dataset(cfg.data.name, "test", **dataset_options(cfg))
    new, old = lipnext.load_model(run), lipnext_base.load_model(run)
    calls = {"base": lambda: certify_dataset_base(old, ds), "new": lambda: certify_dataset(new, ds)}
    for call in calls.values():                    # warm-up
        call()
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(rounds):
        for k in ("base", "new") if i % 2 == 0 else ("new", "base"):
            t = time.process_time()
            calls[k]()
            cpu[k].append(time.process_time() - t)
    ratios = sorted(n / b for n, b in zip(cpu["new"], cpu["base"]))
    quartile = (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4])
    return (f"{run}: {len(ds)} images, {rounds} rounds, CPU s median base {statistics.median(cpu['base']):.4f} "
            f"new {statistics.median(cpu['new']):.4f}; ratio new/base median {statistics.median(ratios):.3f} "
            f"(quartiles {quartile[0]:.3f}-{quartile[1]:.3f}, min {ratios[0]:.3f}, max {ratios[-1]:.3f})")


if __name__ == "__main__":
    print(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "/tmp/abpkg"))
