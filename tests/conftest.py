"""Shared set-up: offline Hub, the quickstart runs that several test files read (trained once per
session) and their evaluations, and Unsloth imported first where a selected test needs it.

The fast set loads no model: `pytest -m "not slow and not browser and not distributed"`.
"""
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may wait on the network
os.environ.setdefault("UNSLOTH_SKIP_TORCHVISION_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]

import pytest  # noqa: E402

FAMILIES = ("phi3", "mistral")
MODEL_MARKERS = ("slow", "browser", "distributed")  # the tests that load Unsloth or a model
EVAL_ARGS = ["--offline", "--mode", "generate,loglik", "--compare-base", "--limit", "6", "--max-new-tokens", "8"]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Unsloth patches transformers, TRL and PEFT when it is imported, so it must come before them, as in
    the scripts; it is imported only when a selected test needs a model, so the fast set stays light.
    Test modules therefore import transformers, TRL and PEFT inside their tests, not at the top.

    Tests marked `real` (the 48-step training of the real Gemma-3-270M and what is built on it: 16 to 45
    minutes on 2 cores, by the machine's vector units) run only where -m names them: `pytest -m real`."""
    if "real" not in (config.getoption("markexpr") or ""):
        skip = pytest.mark.skip(reason="the real Gemma-3-270M's 48-step training and the tests built on it run with "
                                       "`pytest -m real` (16-45 min on 2 cores)")
        for item in items:
            if item.get_closest_marker("real"):
                item.add_marker(skip)
        items = [item for item in items if not item.get_closest_marker("real")]
    if not any(item.get_closest_marker(m) for item in items for m in MODEL_MARKERS):
        return
    early = [m for m in ("transformers", "trl", "peft") if m in __import__("sys").modules]
    if early:
        raise pytest.UsageError(f"{', '.join(early)} was imported while the tests were collected, before Unsloth: "
                                "import it inside the test or fixture that uses it.")
    import unsloth  # noqa: F401


def train(family, *args, callbacks=()):
    """Run the training entry point in-process; return the run folder."""
    from medtune.train.cli import run

    return run(family, [str(a) for a in args], callbacks=callbacks)


def evaluate(*argv):
    from medtune.evaluation.cli import evaluate as run_evaluate, parse_args

    return run_evaluate(parse_args([str(a) for a in argv]))


def copy_run(run, dest):
    """The run folder without trainer checkpoints, export and evaluation: what a test writes stays in dest."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoint-*", "export", "eval"))
    return dest


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


@pytest.fixture(scope="session")
def evaluated(smoke_runs, tmp_path_factory):
    """A copy of each quickstart run, evaluated on 6 items of each sample (and its base model)."""
    cache = {}

    def get(family):
        if family not in cache:
            run = copy_run(smoke_runs(family), tmp_path_factory.mktemp("evaluated") / f"{family}-smoke")
            evaluate(run, *EVAL_ARGS)
            cache[family] = run
        return cache[family]

    return get
