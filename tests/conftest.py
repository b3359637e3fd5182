import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny matrices: one thread avoids OpenMP overhead (and spin-waits under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests need a CUDA device: skipped without one (``pytest -m gpu`` runs them
    where there is one: ``lipnext bench gpu``, stage tests)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished run folder, trained through the CLI once per session: lipnext_l4w64 (patch 2)
    on digits for 5 epochs with the demo recipe (about 56% clean, 8% CRA at 0.25). Shared:
    copy it (``run_copy``) before writing into it."""
    from lipnext.cli import main

    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--config", "demo", "--run-dir", str(run), "model.name=lipnext_l4w64",
                 "model.kwargs={patch_size: 2}", "train.epochs=5", "train.progress=false",
                 "train.tensorboard=false"]) == 0
    return run


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of ``tiny_run`` of this test's own."""
    import shutil

    return shutil.copytree(tiny_run, tmp_path / "tiny")
