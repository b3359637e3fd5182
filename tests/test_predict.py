"""`lipnext predict` (per-image class, probabilities, certified radius, time) and
`lipnext certify --per-sample` (every test image's index, label, prediction, margin, radius)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lipnext
from lipnext.cli import main
from lipnext.data import get_dataset
from lipnext.predict import load_inputs, predict
from lipnext.samples import COLUMNS, read_per_sample

Image = pytest.importorskip("PIL.Image")


@pytest.fixture
def images(tmp_path):
    """The first 6 digits test images as PNG files in a folder and as an npz with labels."""
    x, y = get_dataset("digits", "test", holdout=360).probe(6)
    u8 = (x * 255).round().to(torch.uint8)[:, 0].numpy()
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, a in enumerate(u8):
        Image.fromarray(a).save(folder / f"{i}.png")
    np.savez(tmp_path / "six.npz", x=u8[..., None], y=y.numpy(), classes=np.array([f"digit{k}" for k in range(10)]))
    return folder, tmp_path / "six.npz", u8, y


def test_predict_cli_gives_certified_classes(tiny_run, images, capsys):
    folder, npz, u8, y = images
    assert main(["predict", str(tiny_run), str(folder / "0.png"), str(folder), str(npz), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 + 6 + 6
    assert [r["input"] for r in rows[1:7]] == [str(folder / f"{i}.png") for i in range(6)]
    model = lipnext.load_model(tiny_run)
    x = torch.from_numpy(u8).float()[:, None] / 255
    pred = model(x).argmax(1)
    cert = lipnext.certify(model, x, pred)
    for k in range(6):
        png, arr = rows[1 + k], rows[7 + k]
        assert png["class"] == arr["class"] == int(pred[k])
        assert png["certified_radius"] == arr["certified_radius"] == float(cert.radius[k]) > 0
        assert sum(png["probabilities"]) == pytest.approx(1, abs=1e-4)
        assert max(png["probabilities"]) == png["probabilities"][png["class"]]
        assert "label" not in png and arr["label"] == int(y[k]) and arr["correct"] == (int(pred[k]) == int(y[k]))
        assert arr["class_name"] == f"digit{arr['class']}" and png["time_ms"] > 0
    assert main(["predict", str(tiny_run), str(npz)]) == 0
    table = capsys.readouterr().out
    assert "certified radius" in table and "six.npz[5]" in table


def test_predict_api_radius_is_the_proven_certificate(tiny_run, images):
    folder, _, _, _ = images
    model = lipnext.load_model(tiny_run)
    inputs = load_inputs([folder], model.in_chans, model.image_size)
    rows = predict(model, inputs, batch_size=4)
    cert = lipnext.certify(model, inputs.x, torch.tensor([r["class"] for r in rows]))
    assert cert.proven and [r["certified_radius"] for r in rows] == pytest.approx(cert.radius.tolist(), rel=1e-12)


def test_predict_refuses_what_it_cannot_read(tiny_run, tmp_path, capsys):
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "big.png")
    assert main(["predict", str(tiny_run), str(tmp_path / "big.png")]) == 2
    assert "is 16x16, the model takes 8x8" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), str(tmp_path / "big.png"), "--resize", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert main(["predict", str(tiny_run), str(tmp_path / "bad.png")]) == 2
    assert "cannot decode image" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tiny_run), str(tmp_path / "empty")]) == 2
    assert "holds no image files" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), str(tmp_path / "missing.png")]) == 2
    assert "no image, folder or .npz" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_certify_per_sample(tiny_run, tmp_path, suffix, capsys):
    path = tmp_path / f"per{suffix}"
    assert main(["certify", str(tiny_run), "--per-sample", str(path), "--out", str(tmp_path / "c.json")]) == 0
    assert f"per-image certificates: {path}" in capsys.readouterr().out
    cols = read_per_sample(path)
    assert list(cols) == list(COLUMNS) and len(cols["index"]) == 360
    model = lipnext.load_model(tiny_run)
    x, y = get_dataset("digits", "test", holdout=360).probe(360)
    cert = lipnext.certify(model, x, y)
    assert (cols["label"] == y.numpy()).all() and (cols["prediction"] == cert.predictions.numpy()).all()
    assert (cols["radius"] == cert.radius.numpy()).all() and (cols["margin"] == cert.margin.numpy()).all()
    cra = json.loads((tmp_path / "c.json").read_text())["cra"]["0.25"]
    assert ((cols["label"] == cols["prediction"]) & (cols["radius"] > 0.25)).mean() == pytest.approx(cra)
    assert main(["certify", str(tiny_run), "--per-sample", str(tmp_path / "per.txt")]) == 2
    assert "name the file .csv or .npz" in capsys.readouterr().err
