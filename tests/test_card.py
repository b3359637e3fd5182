"""Model cards (model_card.json + README.md): written by train, rewritten by `lipnext card`."""
from __future__ import annotations

import hashlib
import json

import pytest
import yaml

import lipnext
from lipnext.card import CARD_NAME, README_NAME, SAMPLES_NAME, build_card, read_card, write_card
from lipnext.cli import main
from lipnext.samples import read_per_sample


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_train_writes_the_card_and_per_image_certificates(tiny_run):
    card = read_card(tiny_run)
    results = json.loads((tiny_run / "results.json").read_text())
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert card["model"] == "lipnext_l4w64" and card["architecture"] == "lipnext"
    assert card["config"]["depth"] == 4 and card["config"]["width"] == 64 and card["config"]["patch_size"] == 2
    model = lipnext.load_model(tiny_run)
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["dataset"] == "digits" and card["split"] == "test" and card["test_images"] == 360
    assert card["data"]["holdout"] == 360 and card["threat_model"] == "L2"
    assert card["eps"] == {"0.25": 0.25, "0.5": 0.5, "0.75": 0.75}
    assert card["clean_acc"] == results["clean_accuracy"] and card["certified_acc"] == results["cra"]
    assert card["lipschitz_bound"] == results["lipschitz_bound"]
    assert card["certificate"]["numerics"].startswith("float64-proven")
    assert card["additional_data"] is False and card["generated_data"] is None
    assert card["recipe"]["epochs"] == 5 and card["recipe"]["batch_size"] == cfg["train"]["batch_size"]
    assert card["recipe"]["lr"] == cfg["optim"]["lr"] and card["recipe"]["eps_schedule"]["eps_255"] == 63.75
    assert card["hardware"]["device"] == "cpu" and card["hardware"]["wall_s"] > 0
    assert card["lipnext_version"] == lipnext.__version__
    sha = hashlib.sha256((tiny_run / "model.safetensors").read_bytes()).hexdigest()
    assert card["weights"]["sha256"] == sha and card["autoattack"] is None
    # the README: Hugging Face front matter with the same figures, then the tables
    text = (tiny_run / README_NAME).read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "lipnext"
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert metrics[0] == {"type": "accuracy", "name": "clean accuracy",
                          "value": round(100 * results["clean_accuracy"], 2)}
    assert [m["value"] for m in metrics[1:]] == [round(100 * v, 2) for v in results["cra"].values()]
    assert sha in text and "| 0.25 |" in text
    # the per-image certificates of the test split agree with the CRA
    s = read_per_sample(tiny_run / SAMPLES_NAME)
    assert len(s["radius"]) == 360 and list(s["index"]) == list(range(360))
    assert ((s["prediction"] == s["label"]) & (s["radius"] > 0.25)).mean() == pytest.approx(results["cra"]["0.25"])


def test_card_command_rewrites_it(run_copy, capsys):
    (run_copy / CARD_NAME).unlink()
    (run_copy / README_NAME).unlink()
    assert main(["card", str(run_copy)]) == 0
    assert f"model card: {run_copy / README_NAME}" in capsys.readouterr().out
    assert read_card(run_copy) == build_card(run_copy)
    assert main(["card", str(run_copy), "--out", str(run_copy / "elsewhere"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\nmodel card:")[0])["name"] == "tiny"
    assert (run_copy / "elsewhere" / README_NAME).is_file()


def test_card_records_generated_data_and_provenance(run_copy):
    results = json.loads((run_copy / "results.json").read_text())
    results["additional_data"] = {"generator": "npz:gen.npz", "images": 5000, "real_to_generated": "1:3"}
    results["provenance"] = {"git_commit": "abc123", "torch_version": "9.9", "wall_s": 12.5,
                             "data": {"spec": "digits", "sha256": "f" * 64, "holdout": 360}}
    (run_copy / "results.json").write_text(json.dumps(results))
    json_path, readme = write_card(run_copy)
    card = read_card(json_path)
    assert card["additional_data"] is True and card["generated_data"]["real_to_generated"] == "1:3"
    assert card["git_commit"] == "abc123" and card["data"]["sha256"] == "f" * 64
    assert card["hardware"]["wall_s"] == 12.5
    text = readme.read_text()
    assert "generated images: npz:gen.npz, 5,000 images, real:generated 1:3" in text and "abc123" in text


def test_card_of_an_npz_run_has_the_data_sha256(tmp_path):
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.integers(0, 256, (120, 8, 8, 1), dtype=np.uint8), y=np.arange(120) % 3)
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), f"data.name=npz:{data}", "data.holdout=40", "train.epochs=1",
                 "train.batch_size=40", "model.kwargs={patch_size: 2}", "train.progress=false",
                 "train.tensorboard=false", "train.eval_every=0"]) == 0
    assert read_card(run)["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()


def test_card_refuses_bad_folders_and_foreign_readmes(run_copy, tmp_path, capsys):
    assert main(["card", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    assert main(["card", str(tmp_path / "half")]) == 2
    assert "not a finished run" in capsys.readouterr().err
    (run_copy / README_NAME).write_text("# my own notes\n")
    assert main(["card", str(run_copy)]) == 2
    assert "not a lipnext model card" in capsys.readouterr().err
    assert (run_copy / README_NAME).read_text() == "# my own notes\n"


def test_demo_writes_the_card_and_says_where(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"model card: {out / README_NAME} ({CARD_NAME} beside it)" in printed
    assert read_card(out)["model"] == "lipnext_l8w128" and (out / SAMPLES_NAME).is_file()
