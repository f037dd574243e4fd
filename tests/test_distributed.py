"""Data-parallel training: the real scripts/train_phi.py under torchrun, 2 CPU processes over gloo.

One 2-process run is shared by most tests. It trains one epoch of the bundled sample: 56 training
rows / (batch 2 x grad-accum 2 x 2 processes) = 7 steps, so every training row is seen exactly once.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from medtune.config import DEFAULT_TRAIN_EXAMPLES, TrainConfig, default_max_steps, effective_batch

STEPS, SAVE, ROWS = 7, 3, 56
RUN_FILES = ["adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer.model",
             "chat_template.jinja", "system_prompt.txt", "config.yaml", "run_info.json", "metrics.jsonl",
             "loss_curve.png", "heldout.jsonl"]


class Launch:
    """One torchrun launch: its exit status, the launcher's own output, and each rank's stdout/stderr.
    With interrupt_at, Ctrl-C (SIGINT to the launcher and its workers) once rank 0 has logged that step."""

    def __init__(self, root, name, *args, interrupt_at=None, script=("scripts/train_phi.py",), ok=True):
        logs = root / f"logs-{name}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--log-dir", str(logs), "--redirects", "3", *map(str, script), "--smoke",
               "--output-dir", str(root / "runs"), *map(str, args)]
        started = time.monotonic()
        p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        if interrupt_at:
            started = time.monotonic()
            while not any(f"step {interrupt_at}/" in f.read_text() for f in logs.glob("*/attempt_0/0/stdout.log")):
                assert p.poll() is None and time.monotonic() - started < 300, "the run never got there"
                time.sleep(0.05)
            os.killpg(p.pid, signal.SIGINT)
        self.launcher = p.communicate(timeout=600)[0]
        self.returncode = p.returncode
        self.seconds = time.monotonic() - started
        self.out, self.err = {}, {}
        for rank in (0, 1):
            [folder] = logs.glob(f"*/attempt_0/{rank}")
            self.out[rank] = (folder / "stdout.log").read_text()
            self.err[rank] = (folder / "stderr.log").read_text()
        if ok and not interrupt_at:
            assert self.returncode == 0, self.launcher[-3000:] + self.err[0][-3000:] + self.err[1][-3000:]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def ddp(root):
    launch = Launch(root, "full", "--run-name", "full", "--max-steps", STEPS, "--save-steps", SAVE)
    launch.run_dir = root / "runs" / "full"
    return launch


def test_default_steps_mean_the_same_data_on_any_number_of_processes():
    cfg = TrainConfig(batch_size=2, grad_accum=4)
    assert [default_max_steps(cfg, n) for n in (1, 2, 3, 4, 8)] == [500, 250, 167, 125, 63]
    for batch, accum, n in [(2, 4, 1), (4, 4, 2), (1, 16, 3), (8, 1, 7)]:
        cfg = TrainConfig(batch_size=batch, grad_accum=accum)
        steps, per_step = default_max_steps(cfg, n), effective_batch(cfg, n)
        assert per_step == batch * accum * n
        assert steps == math.ceil(DEFAULT_TRAIN_EXAMPLES / per_step)
        assert (steps - 1) * per_step < DEFAULT_TRAIN_EXAMPLES <= steps * per_step


@pytest.mark.distributed
def test_only_rank_0_prints_and_writes_the_run_folder(ddp, root):
    run_dir = ddp.run_dir
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["full"]
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.tmp"))
    # The trainer keeps each rank's random state in each checkpoint, for --resume.
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-7"]
    for ckpt in run_dir.glob("checkpoint-*"):
        assert sorted(p.name for p in ckpt.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    assert [r["step"] for r in records(run_dir) if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records(run_dir) if "eval_loss" in r] == [6, 7]

    out = ddp.out[0]
    for step in range(1, STEPS + 1):
        assert out.count(f"step {step}/{STEPS} | loss") == 1, out
    for once in ("Loading data from", "Training Phi-3", "Done: 7 steps", f"Wrote {run_dir}/:"):
        assert out.count(once) == 1, once
    assert not re.search(r"step \d|Loading data|Training Phi-3|Done:|Wrote", ddp.out[1]), ddp.out[1]
    for rank in (0, 1):
        assert "Traceback" not in ddp.err[rank] and "error:" not in ddp.err[rank]


@pytest.mark.distributed
def test_steps_batches_and_tokens_count_every_process(ddp):
    from medtune.config import parse_config
    from medtune.train.data import load_rows, split_examples, to_examples, tokenize_examples
    from medtune.families import FAMILIES
    from medtune.train.modeling import tiny_model_dir
    from medtune.train.trainer import read_system_prompt
    from transformers import AutoTokenizer

    info = json.loads((ddp.run_dir / "run_info.json").read_text())
    s = info["summary"]
    assert (s["steps"], s["world_size"], s["effective_batch"]) == (STEPS, 2, 8)
    assert info["ddp_backend"] == "gloo" and info["device"].startswith("2 processes (gloo)")
    assert "7 steps, effective batch 8 = batch 2 x grad-accum 2 x 2 processes" in ddp.out[0]
    assert "Done: 7 steps of effective batch 8 on 2 processes" in ddp.out[0]
    assert info["data"]["train"]["kept"] == ROWS

    # Each step takes 8 rows, 4 from each rank's half of the data: step 7 ends the epoch.
    by_step = {r["step"]: r for r in records(ddp.run_dir) if "loss" in r}
    for step, r in by_step.items():
        assert r["epoch"] == pytest.approx(step * 8 / ROWS, abs=1e-4)
    # Tokens seen are summed over both ranks: after one epoch, every training row's tokens once.
    family = FAMILIES["phi3"]
    cfg, _ = parse_config(["--smoke"], "phi3", "t", "t")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(family))
    tokenizer.chat_template = family.chat_template()
    train_ex, _ = split_examples(to_examples(load_rows(cfg), cfg.dataset), cfg)
    rows, _ = tokenize_examples(train_ex, tokenizer, family, cfg, read_system_prompt(cfg))
    assert len(rows) == ROWS
    assert s["trained_tokens"] == by_step[STEPS]["tokens_seen"] == sum(len(r["input_ids"]) for r in rows)


@pytest.mark.distributed
def test_ctrl_c_then_resume_continues_at_the_saved_step_as_if_never_stopped(ddp, root):
    cut = Launch(root, "cut", "--run-name", "cut", "--max-steps", STEPS, "--save-steps", SAVE, interrupt_at=4)
    run_dir = root / "runs" / "cut"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (run_dir / "adapter_model.safetensors").exists()
    assert cut.err[0].count(f"Training interrupted. Checkpoints are kept in {run_dir}: add --resume") == 1
    assert "interrupted" not in cut.err[1]
    for rank in (0, 1):
        assert "Traceback" not in cut.err[rank], cut.err[rank]

    resumed = Launch(root, "resume", "--run-name", "cut", "--resume")
    out = resumed.out[0]
    assert "resuming from checkpoint-3" in out and "(resumed from checkpoint-3)" in out
    assert re.findall(r"step (\d+)/7 \| loss", out) == ["4", "5", "6", "7"]
    assert not re.search(r"step \d|Done:", resumed.out[1])
    info = json.loads((run_dir / "run_info.json").read_text())["summary"]
    full = json.loads((ddp.run_dir / "run_info.json").read_text())["summary"]
    assert (info["steps"], info["resumed_from"], info["trained_tokens"]) == (STEPS, "checkpoint-3", full["trained_tokens"])
    # Steps 4+ logged before Ctrl-C were replaced, not duplicated; the same rows on the same rank, the
    # same random states and optimizer state: the uninterrupted run's losses.
    a, b = losses(run_dir), losses(ddp.run_dir)
    assert [r["step"] for r in records(run_dir) if "loss" in r] == list(range(1, STEPS + 1))
    assert all(abs(a[k] - b[k]) < 1e-3 for k in a), (a, b)


@pytest.mark.distributed
def test_resume_with_another_number_of_processes_is_refused(ddp):
    before = (ddp.run_dir / "metrics.jsonl").read_bytes()
    r = subprocess.run([sys.executable, "scripts/train_phi.py", "--smoke", "--output-dir", ddp.run_dir.parent,
                        "--run-name", "full", "--resume"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    message = " ".join(r.stderr.split())
    assert "trained by 2 processes" in message and "this launch has 1" in message
    assert "torchrun --nproc_per_node 2 scripts/train_phi.py ... --resume" in message
    assert "Traceback" not in r.stderr
    assert (ddp.run_dir / "metrics.jsonl").read_bytes() == before


@pytest.mark.distributed
def test_a_user_error_stops_every_rank_with_one_paragraph(ddp):
    """What torchrun and accelerate launch start: one process per rank, told its rank by the environment."""
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}  # the error comes before any rank connects
        procs.append(subprocess.Popen([sys.executable, "scripts/train_phi.py", "--smoke", "--output-dir",
                                       ddp.run_dir.parent, "--run-name", "full"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (out0, err0), (out1, err1) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [2, 2]
    assert err0.count("error: The run folder") == 1 and "already exists" in err0
    assert err1 == "" and "Traceback" not in err0


@pytest.mark.distributed
def test_accelerate_launch_runs_the_same_checks(ddp):
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "scripts/train_phi.py", "--smoke", "--output-dir", ddp.run_dir.parent, "--run-name", "full"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and out.count("error: The run folder") == 1
    # The launcher reports the failed ranks (with its own traceback); nothing of ours raised one.
    assert re.search(r"exitcode\s*:\s*2 ", out) and not re.search(r'File ".*(scripts|medtune)/', out)


FAULTY = "tests/helpers/faulty_rank.py"


@pytest.mark.distributed
def test_a_stalled_rank_stops_every_rank_with_where_each_waits(root):
    """Rank 1 sleeps before step 2; rank 0 waits for its gradients. Neither may wait forever."""
    hung = Launch(root, "stall", "--run-name", "stall", "--save-steps", 100, "--hang-timeout", 20,
                  script=(FAULTY, "stall", 1, 2), ok=False)
    assert hung.returncode != 0 and hung.seconds < 300
    for rank in (0, 1):
        err = hung.err[rank]
        assert err.count("error: rank") == 1 and "within --hang-timeout 20 s" in err, err[-3000:]
        assert "Nothing was kept. Every process exits. Where this process waits" in err
        assert "most recent call first" in err and "Traceback" not in err
    # Rank 1's stack names the line it is stuck on; rank 0's shows it inside training, not idle.
    assert re.search(r'File ".*faulty_rank.py", line \d+ in on_step_begin', hung.err[1]), hung.err[1][-3000:]
    assert "training_step" in hung.err[0] or "backward" in hung.err[0], hung.err[0][-3000:]
    assert not (root / "runs" / "stall").exists()  # a fresh run folder with no checkpoint is not left behind


@pytest.mark.distributed
def test_a_rank_that_fails_stops_every_rank_with_one_message(root):
    """Rank 1 runs out of memory at step 2 while rank 0 waits for its gradients."""
    failed = Launch(root, "oom", "--run-name", "oom", "--save-steps", 100, script=(FAULTY, "oom", 1, 2), ok=False)
    assert failed.returncode != 0 and failed.seconds < 300
    message = " ".join(failed.err[1].split())
    assert message.count("error:") == 1 and "rank 1 of 2: CUDA ran out of memory" in message
    assert "Nothing was kept." in message and "Traceback" not in failed.err[1]
    assert "error:" not in failed.err[0] and "Traceback" not in failed.err[0], failed.err[0][-3000:]
    # The launcher names rank 1 as the first failure, with our exit status for a user-facing error.
    root_cause = failed.launcher[failed.launcher.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1 .*\n.*exitcode\s*:\s*2 ", root_cause), failed.launcher[-2000:]
    assert not (root / "runs" / "oom").exists()


@pytest.mark.distributed
def test_every_rank_chooses_from_the_smallest_free_memory(tmp_path):
    """--gradient-checkpointing auto decides from distributed.smallest(free memory): every rank gets
    the same number, so no rank trains another micro-batch than the others."""
    script = tmp_path / "smallest.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'scripts')!r})\nfrom medtune import distributed\n"
                      "distributed.start()\nfound = distributed.smallest(100 + 7 * distributed.rank())\n"
                      "nothing = distributed.smallest(None)\n"
                      "sys.stdout.write(f'smallest {found} {nothing}\\n')  # one write: the ranks share stdout\n"
                      "sys.stdout.flush()\ndistributed.finish()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("smallest 100 None") == 2, r.stdout[-2000:] + r.stderr[-3000:]
