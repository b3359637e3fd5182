"""`lipnext bench`: FLOP counts, ratios against LipNeXt, tables, the orthogonal-update
methods and the budget race, on tiny sizes (timings themselves are not tested)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lipnext.bench.models import add_ratios, bench_table, measure_model
from lipnext.bench.orthogonal import METHODS, orthogonal_step, run_orthogonal
from lipnext.bench.race import RaceConfig, race_one, race_table
from lipnext.bench.timing import peak_tflops
from lipnext.cli import main
from lipnext.nn import orthogonality_error


def test_inference_flops_match_the_lipnext_formula():
    # in a fresh process, as `lipnext bench` measures each model: ru_maxrss is a peak over the
    # process's life, so the peak-memory column is only meaningful in one that starts anew
    code = ("import json; from lipnext.bench.models import measure_model; print(json.dumps("
            "measure_model('lipnext_l4w64', batch=4, image_size=8, steps=1, warmup=0, device='cpu')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(run.stdout.strip().splitlines()[-1])
    b, t, d, c, k, depth = 4, 16, 12, 64, 10, 4          # 8x8 images, patch 2 -> 16 tokens of 12
    expected = 2 * b * t * d * c + depth * (2 * 2 * b * t * c * c + 2 * c ** 3) + 2 * b * c * k
    assert r["infer_flops"] == expected
    assert r["train_flops"] > 2 * r["infer_flops"]       # backward + optimizer on top
    assert r["step_s"] > 0 and 0 < r["optimizer_share"] < 1 and r["peak_mem_bytes"] > 0
    assert r["mfu"] is None                              # no known peak on a CPU
    r = measure_model("lipnext_l4w64", batch=4, image_size=8, steps=1, warmup=0, device="cpu",
                      dtype="bf16", peak=1.0)
    assert r["mfu"] == pytest.approx(r["achieved_flops"] / 1e12)


def test_ratios_are_against_the_lipnext_row_of_the_same_dtype():
    base = dict(params=1, optimizer_share=0.1, train_flops=1e9, achieved_flops=1e9, mfu=None)
    rows = [dict(base, model="a", arch="liresnet", dtype="fp32", step_s=3.0, throughput=10.0, peak_mem_bytes=300),
            dict(base, model="l", arch="lipnext", dtype="fp32", step_s=1.5, throughput=40.0, peak_mem_bytes=100),
            dict(base, model="l", arch="lipnext", dtype="bf16", step_s=2.0, throughput=20.0, peak_mem_bytes=50),
            dict(base, model="a", arch="liresnet", dtype="bf16", step_s=1.0, throughput=40.0, peak_mem_bytes=100)]
    add_ratios(rows)
    assert rows[0]["step_x"] == 2.0 and rows[0]["throughput_x"] == 0.25 and rows[0]["mem_x"] == 3.0
    assert rows[3]["step_x"] == 0.5 and rows[3]["mem_x"] == 2.0 and rows[1]["step_x"] == 1.0
    table = bench_table(rows)
    assert table.count("\n") == 6 and "n/a (no known peak)" in table


def test_known_gpu_peak_only():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), 2.5) == 2.5


@pytest.mark.parametrize("method", ["lipnext_manifold_adam", "geoopt_radam_stiefel",
                                    "geotorch_orthogonal", "torch_orthogonal_cayley",
                                    "fast_exp", "matrix_exp", "cayley"])
def test_orthogonal_methods_keep_the_weight_orthogonal(method):
    if method.startswith(("geoopt", "geotorch")):
        pytest.importorskip(method.split("_")[0])
    method = orthogonal_step(method, 16, torch.device("cpu"))
    for _ in range(3):
        method.step()
    w = method.weight()
    assert w.shape == (16, 16)
    assert orthogonality_error(w) < 1e-4


def test_run_orthogonal_writes_tables(tmp_path):
    md = run_orthogonal([8], tmp_path, methods=["lipnext_manifold_adam", "fast_exp", "cayley"],
                        steps=1, warmup=0, device="cpu", log=lambda s: None)
    data = json.loads((tmp_path / "orthogonal.json").read_text())
    assert [r["method"] for r in data["results"]] == ["lipnext_manifold_adam", "fast_exp", "cayley"]
    assert data["results"][0]["x_lipnext"] == 1.0
    assert "C=8" in md and (tmp_path / "orthogonal.png").stat().st_size > 0
    with pytest.raises(KeyError, match="unknown method"):
        run_orthogonal([8], tmp_path, methods=["nope"])
    assert set(METHODS) >= {"geoopt_radam_stiefel", "geotorch_orthogonal", "torch_orthogonal_matrix_exp",
                            "orthogonium_ortholinear", "torchlip_spectral_linear"}


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    x = (rng.random((60, 8, 8, 3)) * 80 + 60 * y[:, None, None, None]).astype(np.uint8)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


@pytest.mark.parametrize("name", ["lipnext_l4w64", "liresnet_l7w64", "bronet_l6w96"])
def test_race_trains_for_the_budget_and_certifies_the_holdout(tiny_npz, tmp_path, name):
    cfg = RaceConfig(data=tiny_npz, holdout=20, budget_s=1.0, batch=8, bound_every=2)
    r = race_one(name, cfg, tmp_path, log=lambda s: None)
    assert r["steps"] >= 1 and r["n_test"] == 20 and r["train_s"] >= 1.0
    cras = list(r["cra"].values())
    assert list(r["cra"]) == ["36/255", "72/255", "108/255", "255/255"]
    assert r["clean"] >= cras[0] and cras == sorted(cras, reverse=True)
    assert (tmp_path / name / "model.safetensors").is_file()
    assert r["model"] in race_table([r], cfg)


def test_cli_bench_orthogonal_and_user_errors(tmp_path, capsys):
    assert main(["bench", "--orthogonal", "--sizes", "8", "--methods", "fast_exp,matrix_exp",
                 "--steps", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    assert "matrix_exp" in capsys.readouterr().out
    assert main(["bench", "--models", "lipnext_l8w12", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["bench", "--models", "lipnext_l4w64", "--dtype", "fp16", "--out", str(tmp_path)]) == 2


def test_rows_are_written_as_they_are_measured(tmp_path, monkeypatch):
    """A benchmark stopped after its first measurement keeps that row on disk."""
    import lipnext.bench.models as bench_models
    import lipnext.bench.orthogonal as bench_orth
    real_time, calls = bench_orth.time_calls, {"n": 0}

    def stop_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_time(*a, **k)
    monkeypatch.setattr(bench_orth, "time_calls", stop_second)
    with pytest.raises(KeyboardInterrupt):
        run_orthogonal([8], tmp_path, methods=["fast_exp", "cayley"], steps=1, warmup=0, device="cpu",
                       log=lambda s: None)
    data = json.loads((tmp_path / "orthogonal.json").read_text())
    assert data["complete"] is False and [r["method"] for r in data["results"]] == ["fast_exp"]
    assert "fast_exp" in (tmp_path / "orthogonal.md").read_text()

    real_measure = bench_models.measure_model

    def stop_after_first(**kw):
        if kw["name"] != "lipnext_l4w64":
            raise KeyboardInterrupt
        return real_measure(**kw)
    monkeypatch.setattr(bench_models, "measure_model", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        bench_models.run_model_bench(["lipnext_l4w64", "liresnet_l7w64"], tmp_path, batch=2, image_size=8,
                                     steps=1, warmup=0, device="cpu", isolate=False, log=lambda s: None)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["complete"] is False and [r["model"] for r in data["results"]] == ["lipnext_l4w64"]
    assert "lipnext_l4w64" in (tmp_path / "bench.md").read_text()


def test_step_twin_has_lipnext_shapes_and_cli_reports_both(tmp_path, capsys):
    from lipnext.bench.step import Twin
    from lipnext.models import create_model
    model = create_model("lipnext_l4w64", image_size=8)
    twin = Twin(model)
    x = torch.rand(2, 3, 8, 8)
    assert twin(x).shape == model(x).shape == (2, 10)
    assert [tuple(b.a.weight.shape) for b in twin.blocks] == [(64, 64)] * 4
    out = tmp_path / "step.json"
    assert main(["bench", "step", "--model", "lipnext_l4w64", "--batch", "2", "--image-size", "8",
                 "--repeats", "1", "--lipschitz-every", "1", "4", "--exp-sizes", "8",
                 "--exp-norms", "0.5", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| lipnext_l4w64 (4 blocks) | 2 | 32 | 4 |" in table and "| 8 | 0.5 |" in table
    data = json.loads(out.read_text())
    row = data["steps"][0]
    assert row["tokens_per_call"] == 32 and len(row["times_s"]["twin"]) == 1
    # the cadence-4 step removes 3/4 of the bound, measured in the same run
    assert row["lipnext_step_ms"]["4"] == pytest.approx(row["lipnext_step_ms"]["1"] - 0.75 * row["bound_ms"])


def test_exp_plans_count_products_and_cli_runs(capsys):
    from lipnext.bench.exp import plan_table
    rows = plan_table([64])
    assert [r["regime"] for r in rows][0] == "first step"
    for r in rows:          # FastExp, then X (E - I); X^T G only for a Euclidean gradient
        assert r["step_products"] == r["exp_products"] + 1
        assert r["euclidean_step_products"] == r["exp_products"] + 2
        assert r["step_work"] == r["step_products"]             # C = 64: no structured products
    big = plan_table([512])[0]                                  # order 6 at 512: B^2, B^3 at 9/16
    assert big["plan"][0] == 6 and big["step_work"] == big["step_products"] - 2 * 7 / 16
    assert main(["bench", "exp", "--sizes", "8", "--norms", "0.5", "--step-sizes", "8", "--stack", "2",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| fast_exp | 8 |" in out and "| ManifoldAdam.step | 8 | 2 matrices stacked |" in out


def test_scale_counts_the_optimizer_state_and_plans_per_rank():
    from lipnext.bench.scale import full_width, plan
    fw = full_width(16, 1)
    # X, G, NAdam's two moments, Lookahead's slow weights and step sum (6 fp32 per parameter),
    # two fp32 scalars (step, mu_product) and the four of the rotation plan for the 16 x 16 matrix
    assert fw["persistent_bytes_per_param"] == 24.0 + (8 + 16) / 256 and fw["flops_per_matrix"] > 0
    one = plan("m", 2, fw, 1, "replicated", "fp32")
    fsdp = plan("m", 2, fw, 4, "fsdp", "fp32")
    assert one["persistent_B_per_param"] == 24.0 and fsdp["persistent_B_per_param"] == 6.0
    assert fsdp["flops"] == pytest.approx(one["flops"] * 2 / 5)       # ceil(5 / 4) of 5 matrices


@pytest.mark.distributed
def test_fsdp_memory_halves_per_rank_and_keeps_the_weights(tmp_path):
    from lipnext.bench.fsdp_memory import run_fsdp_memory
    out = tmp_path / "fsdp.json"
    table = run_fsdp_memory("lipnext_l4w64", worlds=[2], batch=4, json_path=out)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["strategy"], r["world"], r["rank"]) for r in rows] == [("none", 1, 0), ("fsdp", 2, 0), ("fsdp", 2, 1)]
    for r in rows[1:]:
        assert r["weights_bytes"] == pytest.approx(rows[0]["weights_bytes"] / 2, rel=0.05)
        assert r["max_weight_diff"] < 1e-5
    assert "fsdp  2    1" in table
    with pytest.raises(ValueError, match="divisible"):
        run_fsdp_memory("lipnext_l4w64", worlds=[3], batch=4)


def test_baselines_runs_only_commands_that_lipnext_bench_accepts():
    from lipnext.bench.baselines import commands
    from lipnext.cli import build_parser
    for quick in (True, False):
        cmds = commands("runs/x", quick, race=True)
        assert len(cmds) == (3 if quick else 5) and cmds[-1][:2] == ["bench", "--race"]
        for cmd in cmds:
            assert build_parser().parse_args(cmd).func.__name__ == "run"


def test_bench_device_errors_name_the_option(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "exp", "--device", "cuda", "--sizes", "4", "--step-sizes", "4"]) == 2
    assert "--device cuda was asked for but no CUDA GPU is available" in capsys.readouterr().err


def test_summaries_give_the_median_and_the_range_of_every_figure():
    from lipnext.bench.results import spread, summarize
    rows = [dict(model="a", dtype="fp32", step_s=s, mfu=None, params=7) for s in (3.0, 1.0, 2.0)]
    rows.append(dict(model="b", dtype="fp32", step_s=5.0, mfu=None, params=9))
    a, b = summarize(rows, ("model", "dtype"))
    assert (a["step_s"], a["step_s_range"], a["repeats"], a["params"]) == (2.0, [1.0, 3.0], 3, 7)
    assert a["mfu"] is None and b["repeats"] == 1
    assert spread(a, "step_s", "{:.1f}".format) == "2.0 (1.0-3.0)"
    assert spread(b, "step_s", "{:.1f}".format) == "5.0"


def test_bench_repeats_report_medians_and_ranges(tmp_path, capsys):
    """Each row measured --repeats times (in fresh processes from the CLI); the table and the
    JSON give the median and the min-max of every figure (single runs on a shared machine are
    not enough), the ratios taken within each repeat."""
    from lipnext.bench.models import run_model_bench
    from lipnext.bench.results import spread
    out = tmp_path / "models"
    table = run_model_bench(["lipnext_l4w64", "liresnet_l7w64"], out, batch=2, image_size=8, steps=1, warmup=0,
                            device="cpu", isolate=False, repeats=2, log=lambda s: None)
    data = json.loads((out / "bench.json").read_text())
    row, other = data["results"]
    assert data["repeats"] == 2 and row["repeats"] == 2 and len(data["runs"]) == 4
    lo, hi = row["step_s_range"]
    assert lo <= row["step_s"] <= hi and sorted(r["step_s"] for r in data["runs"][::2]) == [lo, hi]
    assert row["train_flops_range"][0] == row["train_flops_range"][1]      # counted, not timed
    ratios = sorted(b["step_s"] / a["step_s"] for a, b in zip(data["runs"][::2], data["runs"][1::2]))
    assert other["step_x_range"] == ratios and row["step_x"] == 1.0
    assert "Median of 2 of 2 repeats" in table and spread(row, "step_s", lambda v: f"{1e3 * v:.1f}") in table
    assert main(["bench", "--orthogonal", "--sizes", "8", "--methods", "fast_exp", "--steps", "1",
                 "--warmup", "0", "--repeats", "3", "--out", str(tmp_path / "orth")]) == 0
    data = json.loads((tmp_path / "orth" / "orthogonal.json").read_text())
    assert data["results"][0]["repeats"] == 3 and len(data["runs"]) == 3
    assert main(["bench", "--repeats", "0", "--out", str(tmp_path)]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--orthogonal", "--sizes", "8", "--methods", "fast_exp", "--steps", "1",
                 "--warmup", "0", "--repeats", "3", "--out", str(tmp_path / "orth")]) == 0
    data = json.loads((tmp_path / "orth" / "orthogonal.json").read_text())
    assert data["results"][0]["repeats"] == 3 and len(data["runs"]) == 3
    assert main(["bench", "--repeats", "0", "--out", str(tmp_path)]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
