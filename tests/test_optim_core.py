"""The functional core shared by the optimizer drivers: chunked updates equal unchunked ones,
the update methods, owner assignment, and models built on the meta device and initialised in
place (orthogonal, deterministic for a seed)."""
import pytest
import torch

from lipnext.engine.distributed import DistInfo, build_model
from lipnext.models import create_model
from lipnext.nn import OrthogonalParameter, orthogonality_error, random_orthogonal
from lipnext.nn.orthogonal import deferred_orthogonal, init_orthogonal_, is_orthogonal
from lipnext.optim import ManifoldAdam, assign_owners, exp_update


def _problem(seed, n=6, count=7):
    g = torch.Generator().manual_seed(seed)
    params = [OrthogonalParameter(random_orthogonal(n, g)) for _ in range(count)]
    targets = [random_orthogonal(n, g) for _ in range(count)]
    plain = [torch.nn.Parameter(torch.randn(n, generator=g))]
    return params, plain, targets


def _run(chunk_size, steps=7):
    params, plain, targets = _problem(0)
    opt = ManifoldAdam([{"params": params}, {"params": plain}], lr=0.05, nesterov=True,
                       lookahead_k=3, orthogonal_weight_decay=0.01, chunk_size=chunk_size)
    for step in range(steps):
        opt.zero_grad()
        (sum(((x - t) ** 2).sum() for x, t in zip(params, targets)) + (plain[0] ** 2).sum()).backward()
        if step % 2:
            params[step % len(params)].grad = None     # step counts (and Lookahead syncs) differ
        opt.step()
    return params + plain, opt


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_chunked_update_equals_unchunked(chunk_size):
    whole, opt_whole = _run(None)
    chunked, opt_chunked = _run(chunk_size)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    for a, b in zip(whole, chunked):
        for name, value in opt_whole.state[a].items():
            assert torch.equal(value, opt_chunked.state[b][name]), name
    assert max(orthogonality_error(p) for p in whole[:-1]) < 1e-5


@pytest.mark.parametrize("method", ["fast_exp", "exact", "cayley"])
def test_exp_update_methods(method):
    g = torch.Generator().manual_seed(1)
    x = torch.stack([random_orthogonal(8, g, torch.float64) for _ in range(3)])
    a = torch.randn(3, 8, 8, generator=g, dtype=torch.float64)
    a = a - a.mT
    a = 0.2 * a / torch.linalg.matrix_norm(a)[:, None, None]          # ||A||_F = 0.2: Taylor order 3
    y = exp_update(x, a, method=method, precision="fp64")
    # Taylor order 3 errs by <= ||A||^4/4! e^||A|| = 8e-5; Cayley by about ||A||^3/12 = 7e-4
    tol = {"fast_exp": 1e-4, "exact": 1e-12, "cayley": 1e-3}[method]
    assert max(orthogonality_error(m) for m in y) < (1e-4 if method == "fast_exp" else 1e-12)
    assert (y - x @ torch.linalg.matrix_exp(a)).abs().max() < tol
    with pytest.raises(ValueError, match="update"):
        exp_update(x, a, method="taylor")


def test_optimizer_runs_each_update_method():
    for method in ("exact", "cayley"):
        params, _, targets = _problem(2, count=2)
        opt = ManifoldAdam(params, lr=0.05, update=method)
        for _ in range(3):
            opt.zero_grad()
            sum(((x - t) ** 2).sum() for x, t in zip(params, targets)).backward()
            opt.step()
        assert max(orthogonality_error(p) for p in params) < 1e-5
    with pytest.raises(ValueError, match="chunk_size"):
        ManifoldAdam(params, chunk_size=0)


def test_assign_owners_balances_cubic_work():
    assert assign_owners([64] * 5, 2) == [0, 1, 0, 1, 0]
    owners = assign_owners([100, 10, 10, 10, 100, 10], 2)
    assert owners[0] != owners[4]                      # the two large ones on different ranks
    assert assign_owners([8, 8], 1) == [0, 0]


def _orthogonal(model):
    return [p for p in model.parameters() if is_orthogonal(p)]


def test_meta_build_initialised_in_place_is_orthogonal_and_deterministic():
    with deferred_orthogonal():
        model = create_model("lipnext_l4w64", num_classes=10, in_chans=3, image_size=8,
                             depth=2, width=16, seed=0)
    assert all(p.is_meta for p in _orthogonal(model))
    init_orthogonal_(model, seed=3, device="cpu")
    mats = _orthogonal(model)
    assert len(mats) == 5 and not any(p.is_meta for p in mats)
    assert all(isinstance(p, OrthogonalParameter) and p.requires_grad for p in mats)
    assert max(orthogonality_error(p) for p in mats) < 1e-6
    assert len({p.sum().item() for p in mats}) == 5     # every matrix drawn afresh

    info = DistInfo()
    kwargs = dict(num_classes=10, in_chans=3, image_size=8, depth=2, width=16)
    a = build_model("lipnext_l4w64", info, torch.device("cpu"), 3, **kwargs)
    b = build_model("lipnext_l4w64", info, torch.device("cpu"), 3, **kwargs)
    c = build_model("lipnext_l4w64", info, torch.device("cpu"), 4, **kwargs)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    for pa, pm in zip(_orthogonal(a), mats):
        assert torch.equal(pa, pm)                     # build_model is init_orthogonal_
    assert not torch.equal(_orthogonal(a)[1], _orthogonal(c)[1])
    x = torch.rand(2, 3, 8, 8)
    assert torch.isfinite(a(x)).all() and a.lipschitz_bound() < 1 + 1e-5


def test_owner_only_initialisation_leaves_the_others_for_the_owner(monkeypatch):
    import lipnext.nn.orthogonal as orthogonal
    drawn = []
    real = orthogonal.random_orthogonal

    def counted(n, generator=None, dtype=torch.float32):
        drawn.append(n)
        return real(n, generator, dtype)
    info = DistInfo(rank=1, world_size=2, strategy="ddp")
    whole = build_model("lipnext_l4w64", DistInfo(), torch.device("cpu"), 3, num_classes=10,
                        in_chans=3, image_size=8, depth=2, width=16)
    monkeypatch.setattr(orthogonal, "random_orthogonal", counted)
    model = build_model("lipnext_l4w64", info, torch.device("cpu"), 3, num_classes=10,
                        in_chans=3, image_size=8, depth=2, width=16)
    assert len(drawn) == 2                               # rank 1 draws only the two it owns
    for k, (p, q) in enumerate(zip(_orthogonal(model), _orthogonal(whole))):
        if k % 2 == 1:                                   # rank 1 owns matrices 1 and 3
            assert torch.equal(p, q)
