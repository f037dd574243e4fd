"""Shared set-up: offline Hub, Unsloth imported first, and the smoke runs that
several tests read (trained once per session)."""
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may wait on the network
os.environ.setdefault("UNSLOTH_SKIP_TORCHVISION_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]

import pytest  # noqa: E402

import unsloth  # noqa: E402,F401  (before transformers, as in the scripts)

FAMILIES = ("phi3", "mistral")


def train(family, *args, callbacks=()):
    """Run the training entry point in-process; return the run folder."""
    from medtune.train.cli import run

    return run(family, [str(a) for a in args], callbacks=callbacks)


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def smoke_runs(runs_root):
    """One --smoke run per family (the quickstart's defaults), shared by the tests that read it."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = train(family, "--smoke", "--output-dir", runs_root, "--run-name", f"{family}-smoke")
        return cache[family]

    return get
