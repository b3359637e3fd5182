"""Model cards: ``model_card.json`` and a ``README.md`` (a Hugging Face model card) for a run.

``build_card(run)`` gathers, from the run folder (config.yaml, results.json, run.json when
the run records one, model.safetensors, verify.json when ``lipnext verify --autoattack`` ran):
the name, architecture and config, parameters, dataset and split (with the data's sha256),
threat model L2, the eps list, clean accuracy, CRA at every eps, the Lipschitz bound, the
certificate's numerics, ``additional_data`` (generated images, if any), the recipe, hardware
and wall time, the lipnext version and commit, the weights' sha256, and the AutoAttack
accuracy when it ran on these weights. Field names follow RobustBench's model info where it
has one (``name``, ``architecture``, ``dataset``, ``threat_model``, ``eps``, ``clean_acc``,
``additional_data`` a bool, ``autoattack_acc``). ``write_card`` writes both files
atomically; the README is YAML front matter (``model-index``) plus tables.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import __version__
from .io import WEIGHTS_NAME, atomic_write, read_metadata

if TYPE_CHECKING:
    from .certify import Certificate

__all__ = ["CARD_NAME", "README_NAME", "SAMPLES_NAME", "NUMERICS_TEXT", "build_card", "render_readme",
           "write_card", "write_run_artefacts", "read_card", "parameter_count"]

CARD_NAME, README_NAME = "model_card.json", "README.md"
SAMPLES_NAME = "certificates.npz"      # the test split's per-image certificates (lipnext.samples)
CARD_VERSION = 1
NUMERICS_TEXT = ("float64-proven: each radius is computed by the model's float64 program with an a-priori "
                 "bound on its rounding error over the whole L2 ball (lipnext.certify); it holds for the "
                 "exact real-number model and for the float64 twin's predictions")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun the command that wrote it") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


def parameter_count(arch: str, config: dict[str, Any]) -> int:
    """Parameters of architecture ``arch`` with ``config``, counted on the meta device (no memory)."""
    import torch

    from .models.registry import build_from_config

    with torch.device("meta"):
        model = build_from_config(arch, config)
    return sum(p.numel() for p in model.parameters())


def _data_sha256(spec: str) -> str | None:
    """The sha256 of a single-file dataset (npz), else None (built-in or a folder)."""
    from .data import parse_spec
    from .hub import file_sha256

    kind, path = parse_spec(spec)
    return file_sha256(Path(path)) if kind == "npz" and Path(path).is_file() else None


def _autoattack(run: Path, weights_sha256: str, labels: dict[str, float]) -> dict[str, Any] | None:
    """The AutoAttack figures of the run's verify.json, if they were measured on these weights."""
    report = _read_json(run / "verify.json")
    if report is None:
        return None
    check = next((c for c in report.get("checks", []) if c.get("name") == "autoattack"), None)
    if check is None or check.get("details", {}).get("weights_sha256") != weights_sha256:
        return None
    d = check["details"]
    by_eps = {f"{float(v['eps']):.6g}": v for v in d["per_eps"].values()}
    per_eps = {lab: {"autoattack_acc": by_eps[key]["autoattack_acc"], "cra": by_eps[key]["cra"]}
               for lab, e in labels.items() if (key := f"{float(e):.6g}") in by_eps}
    return {"passed": check["passed"], "version": d["version"], "attacks": d["attacks"],
            "points": d["points"], "split": report.get("info", {}).get("split"), "per_eps": per_eps,
            "seconds": d.get("seconds")}


def build_card(run: str | Path) -> dict[str, Any]:
    """The card of a finished run folder (module doc)."""
    from .config import config_from_dict
    from .hub import file_sha256

    run = Path(run)
    weights = run / WEIGHTS_NAME
    if not run.is_dir():
        raise NotADirectoryError(f"{run} is not a run folder")
    results = _read_json(run / "results.json")
    if results is None or not weights.is_file():
        raise FileNotFoundError(f"{run} is not a finished run (no results.json or {WEIGHTS_NAME}); "
                                "train it to the end first")
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run} has no config.yaml")
    cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()))
    meta = read_metadata(weights)
    arch, model_config = meta["arch"], json.loads(meta["config"])
    record = _read_json(run / "run.json") or {}
    prov = record.get("provenance") or results.get("provenance") or {}
    data = dict(prov.get("data") or {})
    data.setdefault("spec", cfg.data.name)
    data.setdefault("holdout", cfg.data.holdout)
    data.setdefault("val_fraction", cfg.data.val_fraction)
    data.setdefault("seed", cfg.train.seed)
    if data.get("sha256") is None:
        data["sha256"] = _data_sha256(cfg.data.name)
    weights_sha = file_sha256(weights)
    certified = "cra" in results
    eps = results.get("eps", {})
    generated = results.get("additional_data")
    uses_generated = (generated is not None if "additional_data" in results
                      else bool(cfg.data.generated and cfg.data.generated_fraction > 0))
    loss, optim, train = cfg.loss, cfg.optim, cfg.train
    return {
        "card_version": CARD_VERSION,
        "name": run.resolve().name,
        "model": cfg.model.name,
        "architecture": arch,
        "config": model_config,
        "parameters": parameter_count(arch, model_config),
        "dataset": cfg.data.name,
        "split": results.get("split"),
        "test_images": results.get("n"),
        "data": data,
        "threat_model": "L2",
        "eps": eps,
        "clean_acc": results.get("clean_accuracy"),
        "certified_acc": results.get("cra") if certified else None,
        "lipschitz_bound": results.get("lipschitz_bound"),
        "certificate": {"rule": results.get("rule", cfg.certify.rule), "numerics": NUMERICS_TEXT},
        "additional_data": uses_generated,
        "generated_data": generated,
        "recipe": {"epochs": train.epochs, "steps": results.get("steps"), "batch_size": train.batch_size,
                   "lr": optim.lr, "min_lr": optim.min_lr, "optimizer": f"ManifoldAdam ({optim['update']})",
                   "loss": loss.name, "eps_schedule": {"eps_255": loss.eps_255, "eps_start": loss.eps_start,
                                                       "eps_end": loss.eps_end, "eps_ramp": loss.eps_ramp},
                   "seed": train.seed},
        "hardware": {"device": prov.get("device", results.get("device")), "world_size": results.get("world_size"),
                     "precision": results.get("precision"),
                     "wall_s": prov.get("wall_s", results.get("train_time_s")),
                     "cpu_s": prov.get("cpu_s", results.get("loop_cpu_s")), "gpu_s": prov.get("gpu_s")},
        "lipnext_version": prov.get("lipnext_version", __version__),
        "git_commit": prov.get("git_commit"),
        "torch_version": prov.get("torch_version"),
        "weights": {"file": WEIGHTS_NAME, "sha256": weights_sha, "tensors_sha256": meta.get("tensors_sha256")},
        "autoattack": _autoattack(run, weights_sha, eps) if certified else None,
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _front_matter(card: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face model card metadata: tags and a model-index with the measured figures."""
    metrics = [{"type": "accuracy", "name": "clean accuracy", "value": round(100 * card["clean_acc"], 2)}] \
        if card["clean_acc"] is not None else []
    for lab, v in (card["certified_acc"] or {}).items():
        metrics.append({"type": "certified-robust-accuracy", "name": f"certified robust accuracy (L2, eps={lab})",
                        "value": round(100 * v, 2)})
    for lab, v in ((card["autoattack"] or {}).get("per_eps") or {}).items():
        metrics.append({"type": "autoattack-accuracy", "name": f"AutoAttack accuracy (L2, eps={lab}, "
                        f"{card['autoattack']['points']} images)", "value": round(100 * v["autoattack_acc"], 2)})
    meta = {"library_name": "lipnext", "pipeline_tag": "image-classification",
            "tags": list(dict.fromkeys(["lipnext", "certified-robustness", "lipschitz", "l2-robustness",
                                        card["architecture"]])),
            "metrics": ["accuracy"]}
    if metrics:
        meta["model-index"] = [{"name": card["name"], "results": [{
            "task": {"type": "image-classification", "name": "Image classification"},
            "dataset": {"name": card["dataset"], "type": card["dataset"].split(":")[0],
                        "split": card["split"] or "none"},
            "metrics": metrics}]}]
    return meta


def render_readme(card: dict[str, Any]) -> str:
    """The README.md of a card: YAML front matter, then the same fields as tables."""
    gen = card["generated_data"]
    data = card["data"]
    hw = card["hardware"]
    rows = [("model", f"`{card['model']}` (architecture `{card['architecture']}`)"),
            ("parameters", f"{card['parameters']:,}"),
            ("dataset", f"`{card['dataset']}`, split {card['split'] or 'none'} ({card['test_images']} images), "
                        f"holdout {data.get('holdout')}, val_fraction {data.get('val_fraction')}"),
            ("data sha256", f"`{data['sha256']}`" if data.get("sha256") else "n/a (built-in data or a folder)"),
            ("threat model", card["threat_model"]),
            ("Lipschitz bound", f"{card['lipschitz_bound']:.6f}" if card["lipschitz_bound"] is not None else "n/a"),
            ("certificate", f"rule {card['certificate']['rule']}; {card['certificate']['numerics']}"),
            ("additional data", "none (real images only)" if not card["additional_data"] else
             f"generated images: {gen['generator']}, {gen['images']:,} images, real:generated {gen['real_to_generated']}"
             if gen else "generated images (details not recorded)"),
            ("recipe", f"{card['recipe']['epochs']} epochs, batch {card['recipe']['batch_size']}, lr "
                       f"{card['recipe']['lr']:g}, {card['recipe']['optimizer']}, loss {card['recipe']['loss']}, "
                       "eps schedule " + ", ".join(f"{k} {v:g}" for k, v in card["recipe"]["eps_schedule"].items())
                       + f", seed {card['recipe']['seed']}"),
            ("hardware", f"{hw['device']} x {hw['world_size']}, {hw['precision']}, wall {hw['wall_s']} s"
                         + (f", CPU {hw['cpu_s']} s" if hw.get("cpu_s") is not None else "")
                         + (f", GPU {hw['gpu_s']} s" if hw.get("gpu_s") is not None else "")),
            ("lipnext", f"{card['lipnext_version']}" + (f", commit {card['git_commit']}" if card["git_commit"] else "")
                        + (f", torch {card['torch_version']}" if card["torch_version"] else "")),
            ("weights", f"`{card['weights']['file']}`, sha256 `{card['weights']['sha256']}`")]
    lines = ["---", yaml.safe_dump(_front_matter(card), sort_keys=False).rstrip(), "---", "",
             f"# {card['name']}", "",
             f"A certifiably robust (L2) `{card['model']}` classifier trained with lipnext on `{card['dataset']}`.",
             "", "| field | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    aa = card["autoattack"]
    if card["certified_acc"] is not None:
        lines += ["", "## Accuracy", "", f"Clean accuracy {_pct(card['clean_acc'])} on {card['test_images']} "
                  "images. Certified robust accuracy (CRA): the share of images classified correctly with a "
                  "certified radius above eps."]
        head = "| eps | CRA |" + (f" AutoAttack ({aa['points']} images) | CRA (same images) |" if aa else "")
        lines += ["", head, "|---|---|" + ("---|---|" if aa else "")]
        for lab, v in card["certified_acc"].items():
            row = f"| {lab} | {_pct(v)} |"
            if aa:
                a = aa["per_eps"].get(lab)
                row += f" {_pct(a['autoattack_acc'])} | {_pct(a['cra'])} |" if a else " n/a | n/a |"
            lines.append(row)
        if aa:
            lines += ["", f"AutoAttack: version {aa['version']} ({', '.join(aa['attacks'])}), L2, on the first "
                      f"{aa['points']} images of the {aa['split']} split; the check AutoAttack accuracy >= CRA "
                      f"{'passed' if aa['passed'] else 'FAILED'}."]
    lines += ["", "## Use", "", "```", f"lipnext predict {card['name']} image.png     # class, probabilities, "
              "certified radius", f"lipnext certify {card['name']}               # CRA on its test split", "```",
              "", "In Python: `lipnext.load_model(\"<this folder>\")`; see docs/ARTEFACTS.md of lipnext.", ""]
    return "\n".join(lines)


def _check_readme(path: Path) -> None:
    """Refuse to replace a README.md that is not a lipnext model card."""
    if path.is_file() and "library_name: lipnext" not in path.read_text(errors="replace")[:4096]:
        raise ValueError(f"{path} exists and is not a lipnext model card; write the card into another "
                         "folder (--out) or move that file")


def write_card(run: str | Path, out: str | Path | None = None,
               extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``model_card.json`` and ``README.md`` for ``run`` into ``out`` (default: the run
    folder); ``extra`` fields (e.g. an export's) are added to the card. Returns both paths."""
    card = build_card(run)
    card.update(extra or {})
    out = Path(run if out is None else out)
    _check_readme(out / README_NAME)
    text = json.dumps(card, indent=2) + "\n"
    json_path = atomic_write(out / CARD_NAME, lambda tmp: Path(tmp).write_text(text))
    readme = render_readme(card)
    return json_path, atomic_write(out / README_NAME, lambda tmp: Path(tmp).write_text(readme))


def write_run_artefacts(run: str | Path, cert: "Certificate | None" = None) -> list[Path]:
    """The end of training: the split's per-image certificates (``certificates.npz``, when
    ``cert`` is given) and the card. Returns [results.json, (certificates.npz,) model_card.json, README.md]."""
    from .samples import write_per_sample

    run = Path(run)
    paths = [run / "results.json"]
    if cert is not None:
        paths.append(write_per_sample(cert, run / SAMPLES_NAME))
    return [*paths, *write_card(run)]


def read_card(path: str | Path) -> dict[str, Any]:
    """A card from its model_card.json (or the folder that holds it)."""
    path = Path(path)
    path = path / CARD_NAME if path.is_dir() else path
    card = _read_json(path)
    if card is None:
        raise FileNotFoundError(f"no model card at {path}; write one with `lipnext card RUN`")
    return card
