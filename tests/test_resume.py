"""--resume: a resumed run's record covers the whole run, its adapter is what an uninterrupted run
saves, and resuming a finished run changes nothing."""
import json

import pytest
from safetensors import safe_open

from conftest import train

pytestmark = pytest.mark.slow  # trains


def StopAt(step):
    """A callback that stands in for a crash or Ctrl-C part-way through training (transformers is
    imported here, after Unsloth, as conftest requires)."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt

    return Stop()


def summary(run_dir):
    return json.loads((run_dir / "run_info.json").read_text())["summary"]


def adapter_dtypes(run_dir):
    with safe_open(run_dir / "adapter_model.safetensors", "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_resumed_run_records_the_whole_run_and_saves_the_same_adapter(smoke_runs, runs_root):
    reference = smoke_runs("phi3")
    with pytest.raises(KeyboardInterrupt):
        train("phi3", "--smoke", "--output-dir", runs_root, "--run-name", "phi3-cut", callbacks=[StopAt(8)])
    run_dir = runs_root / "phi3-cut"
    before_cut = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_leg_s = max(r["time_s"] for r in before_cut if r["step"] <= 6)
    train("phi3", "--smoke", "--output-dir", runs_root, "--run-name", "phi3-cut", "--resume")

    whole, resumed = summary(reference), summary(run_dir)
    assert resumed["resumed_from"] == "checkpoint-6" and resumed["steps"] == 12
    # the mean over all 12 steps, as uninterrupted (not this session's loss over 12 steps)
    assert resumed["train_loss_mean"] == pytest.approx(whole["train_loss_mean"], rel=1e-3)
    assert resumed["wall_time_s"] > first_leg_s  # both sessions' training time
    times = [json.loads(line)["time_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert times == sorted(times)  # metrics.jsonl's clock runs on across the sessions
    assert adapter_dtypes(run_dir) == adapter_dtypes(reference) == {"BF16"}


def test_resume_of_a_finished_run_trains_nothing(smoke_runs, runs_root, capsys):
    run_dir = smoke_runs("mistral")
    files = ("adapter_model.safetensors", "run_info.json", "metrics.jsonl")
    before = {name: (run_dir / name).read_bytes() for name in files}
    capsys.readouterr()
    train("mistral", "--smoke", "--output-dir", runs_root, "--run-name", run_dir.name, "--resume")
    said = capsys.readouterr().out
    assert "is already finished (checkpoint-12 is step 12 of 12)" in said and "--max-steps 24" in said
    assert "step 13" not in said
    assert {name: (run_dir / name).read_bytes() for name in files} == before
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
