"""What a killed export leaves behind is cleaned up, and said, by the next export of the run."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # trains and exports


def test_next_export_removes_the_work_folder_of_a_killed_one(smoke_runs, tmp_path, capsys):
    from medtune.export.cli import export, parse_args

    run = tmp_path / "phi3-smoke"
    shutil.copytree(smoke_runs("phi3"), run, ignore=shutil.ignore_patterns("checkpoint-*", "export"))
    proc = subprocess.Popen([sys.executable, "scripts/export.py", str(run)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    leftover = run / f".export-tmp-{proc.pid}"
    deadline = time.time() + 300
    while not (leftover / "merged" / "model.safetensors").is_file():  # killed mid-way, its merge written
        assert proc.poll() is None and time.time() < deadline, "the export ended before it could be killed"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert leftover.is_dir()

    capsys.readouterr()
    export(parse_args([str(run), "--no-verify"]))
    said = capsys.readouterr().out
    assert f"Removed {leftover}/" in said and f"left by an export (process {proc.pid}) that was killed" in said
    assert sorted(p.name for p in run.iterdir() if "export" in p.name) == ["export"]
