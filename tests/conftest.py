import os

# Tests never touch the network or the user's cache.
os.environ.setdefault("DENSEBENCH_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DENSEBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("DENSEBENCH_DATA", raising=False)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """The synthetic suite, generated once per test session."""
    from densebench.data.synth import write_synthetic_suite

    root = tmp_path_factory.mktemp("synth")
    write_synthetic_suite(root, seed=0)
    return root
