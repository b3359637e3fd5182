"""One compile switch (issue 23, items 1-2): train.compile=true on the CPU takes the CUDA default's
path (compiled LipNeXt blocks), also under activation checkpointing, with the eager run's losses
and no fallback to eager; train.compile=false never compiles."""
import json

import pytest
import torch

from lipnext.models.lipnext import LipNeXtBlock
from lipnext.train import load_config, train

BASE = ["model.name=lipnext_l4w64", "model.kwargs={depth: 2, width: 32}", "data.holdout=300",
        "train.epochs=1", "train.batch_size=128", "train.log_every=1", "train.progress=false",
        "train.tensorboard=false", "train.eval_every=0", "train.checkpoint=false", "certify.split=none"]


def losses(run_dir, *overrides):
    train(load_config(None, [*BASE, f"run_dir={run_dir}", *overrides]))
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r.get("kind") == "train"]


def test_compile_false_never_compiles(tmp_path, monkeypatch):
    import lipnext.models.lipnext as lipnext_module

    def refuse():
        raise AssertionError("compiled with train.compile=false")
    monkeypatch.setattr(lipnext_module, "_compiled_block_forward", refuse)
    for mode in ("false", "auto"):                        # auto on the CPU: eager
        assert len(losses(tmp_path / mode, f"train.compile={mode}")) > 5


@pytest.mark.slow
def test_compiled_blocks_with_checkpointing_give_the_eager_losses(tmp_path, monkeypatch):
    import torch._dynamo.utils as dynamo_utils

    import lipnext.models.lipnext as lipnext_module
    calls = []
    compiled = lipnext_module._compiled_block_forward

    def counted():
        calls.append(1)
        return compiled()
    monkeypatch.setattr(lipnext_module, "_compiled_block_forward", counted)
    torch._dynamo.reset()
    eager = losses(tmp_path / "eager", "train.compile=false")
    assert not calls
    both = losses(tmp_path / "compiled", "train.compile=true", "train.activation_checkpointing=true")
    assert calls and dynamo_utils.counters["stats"]["unique_graphs"] >= 1   # the compiled path ran
    assert len(both) == len(eager) > 5
    torch.testing.assert_close(torch.tensor(both), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    assert LipNeXtBlock.compile_mode == "auto"            # nothing process-wide was changed
