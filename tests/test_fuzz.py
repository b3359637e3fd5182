"""Property-based fuzzing (hypothesis) of the input paths: model forward, certify, load_model,
config loading. Every input either works (and the result is sane) or raises a clear
ValueError / TypeError / KeyError / FileNotFoundError -- never anything else.
The number of cases run is counted and printed by the last test (run with -s to see it)."""
import collections
import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lipnext
from lipnext.config import load_config

CASES = collections.Counter()
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError)
FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_MODEL = lipnext.create_model("lipnext_l4w64", num_classes=4, in_chans=1, image_size=8, seed=0).eval()
_WEIGHTS = Path(tempfile.mkdtemp(prefix="lipnext-fuzz-")) / "m.safetensors"
lipnext.save_model(_MODEL, _WEIGHTS)
_RAW = _WEIGHTS.read_bytes()

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int64, torch.bool]
SPECIAL = [None, float("nan"), float("inf"), -float("inf")]




@st.composite
def images(draw):
    ndim = draw(st.integers(2, 5))
    dims = [draw(st.sampled_from([0, 1, 2, 3, 8, 9])) for _ in range(ndim)]
    if draw(st.booleans()):          # often the right shape, so the valid path is fuzzed too
        dims = [draw(st.integers(0, 3)), 1, 8, 8]
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0, 255.0, 1e6]))
    x = (torch.rand(dims) * scale * draw(st.sampled_from([1, -1]))).to(dtype)
    special = draw(st.sampled_from(SPECIAL))
    if special is not None and x.is_floating_point() and x.numel():
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = special
    return x


def _valid(x):
    return (x.dim() == 4 and tuple(x.shape[1:]) == (1, 8, 8) and x.is_floating_point()
            and bool(torch.isfinite(x).all()))


@FUZZ
@given(x=images())
def test_fuzz_model_forward(x):
    CASES["model forward"] += 1
    try:
        with torch.no_grad():
            z = _MODEL(x)
    except USER_ERRORS as e:
        assert not _valid(x) and str(e)
        return
    assert _valid(x), f"accepted an invalid input of shape {tuple(x.shape)}, dtype {x.dtype}"
    assert z.shape == (x.shape[0], 4) and bool(torch.isfinite(z).all())


@st.composite
def labels(draw):
    n = draw(st.integers(0, 6))
    kind = draw(st.sampled_from(["int", "float", "bool", "2d", "list"]))
    vals = draw(st.lists(st.integers(-3, 6), min_size=n, max_size=n))
    if kind == "int":
        return n, torch.tensor(vals, dtype=torch.int64)
    if kind == "float":
        return n, torch.tensor(vals, dtype=torch.float32)
    if kind == "bool":
        return n, torch.tensor([v > 0 for v in vals], dtype=torch.bool)
    if kind == "2d":
        return n, torch.tensor(vals, dtype=torch.int64).view(-1, 1)
    return n, vals


@FUZZ
@given(lab=labels(), n_x=st.integers(0, 6), rule=st.sampled_from(["pairwise", "sqrt2", "linf"]))
def test_fuzz_certify_labels(lab, n_x, rule):
    CASES["certify labels"] += 1
    n, y = lab
    x = torch.rand(n_x, 1, 8, 8)
    try:
        c = lipnext.certify(_MODEL, x, y, rule=rule)
    except USER_ERRORS as e:
        assert str(e)
        return
    yt = torch.as_tensor(y)
    assert rule in ("pairwise", "sqrt2") and n == n_x and yt.dtype == torch.int64 and yt.dim() == 1
    assert bool(((yt >= 0) & (yt < 4)).all())
    assert len(c) == n and bool((c.radius >= 0).all()) and not bool(c.radius.isnan().any())
    assert bool((c.predictions[c.correct] == yt[c.correct]).all())


@FUZZ
@given(mode=st.sampled_from(["random", "flip", "truncate", "flip-header"]), data=st.data())
def test_fuzz_load_model_bytes(mode, data, tmp_path_factory):
    CASES["load_model bytes"] += 1
    raw = bytearray(_RAW)
    header_len = 8 + int.from_bytes(raw[:8], "little")
    if mode == "random":
        raw = bytearray(data.draw(st.binary(max_size=512)))
    elif mode == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        hi = header_len if mode == "flip-header" else len(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, hi - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    path.write_bytes(bytes(raw))
    try:
        m = lipnext.load_model(path)
    except USER_ERRORS as e:
        assert str(e)
        return
    x = torch.rand(2, *((m.in_chans,) + tuple(m.image_size)))
    with torch.no_grad():
        assert bool(torch.isfinite(m(x)).all())       # whatever loads is finite and usable


KEYS = ["train.epochs", "train.batch_size", "train.on_nan", "model.name", "optim.lr", "loss.name",
        "data.holdout", "certify.rule", "run_dir", "train", "nope", "train.nope", "optim.betas"]


@FUZZ
@given(pairs=st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=12)),
                                st.one_of(st.integers(-5, 10**6).map(str), st.text(max_size=8),
                                          st.sampled_from(["1e-3", "[1, 2]", "{a: 1}", "null", "true",
                                                           "stop", "rollback", "emma"]))),
                      max_size=4))
def test_fuzz_config_overrides(pairs):
    CASES["config overrides"] += 1
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = load_config(None, overrides)
    except USER_ERRORS as e:
        assert str(e)
        return
    assert cfg.train.epochs >= 0 and cfg.train.on_nan in ("stop", "rollback")


def test_zz_fuzz_case_counts():
    """Runs last in this file: print how many cases each fuzz test ran."""
    print("\nfuzz cases run: " + json.dumps(dict(CASES)) + f", total {sum(CASES.values())}")
    assert all(CASES[k] >= 100 for k in ("model forward", "certify labels", "load_model bytes",
                                         "config overrides")), CASES
