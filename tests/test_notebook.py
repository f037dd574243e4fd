"""The Colab notebook's set-up cells: finding the repository it came from, and failing clearly.

    pytest -q tests/test_notebook.py

Runs the notebook's first code cell and its "Get the code" cell in a real kernel (nbclient), in an
empty folder, with real git. Colab's side is played by a local HTTP server answering the Jupyter
sessions request the way Colab's server does, and github.com is redirected to local repositories
with git's own `url.<base>.insteadOf`, so nothing leaves the machine.
"""
import http.server
import json
import subprocess
import threading
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks/medtune_colab.ipynb"
SETUP_CELLS = (1, 3)  # the variables and helpers; "Get the code and install"


def run_setup_cells(folder, monkeypatch, env=(), repo_url=None):
    """Execute the set-up cells in `folder` (smoke mode: nothing is installed); returns (error, outputs)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [nb.cells[i] for i in SETUP_CELLS]
    if repo_url:
        marked = 'REPO_URL = ""'
        assert marked in nb.cells[0].source  # the one line a user edits
        nb.cells[0].source = nb.cells[0].source.replace(marked, f"REPO_URL = {repo_url!r}", 1)
    for name in ("COLAB_JUPYTER_IP", "KMP_TARGET_PORT", "GIT_CONFIG_COUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"MEDTUNE_NOTEBOOK_SMOKE": "1", **dict(env)}.items():
        monkeypatch.setenv(name, value)
    error = None
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    except CellExecutionError as e:
        error = e
    return error, [o for cell in nb.cells for o in cell.get("outputs", [])]


def the_error(outputs):
    errors = [o for o in outputs if o.output_type == "error"]
    assert len(errors) == 1, outputs
    return errors[0]


@pytest.fixture
def github(tmp_path):
    """A stand-in for github.com holding acme/medtune (branch colab-fix has the scripts), via git's insteadOf."""
    root = tmp_path / "github"
    work = tmp_path / "work"
    (work / "scripts").mkdir(parents=True)
    (work / "scripts/train_phi.py").write_text("# the preset\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-C", str(work)]
    for cmd in (["init", "-q", "-b", "colab-fix"], ["add", "."], ["commit", "-q", "-m", "x"]):
        subprocess.run(git + cmd, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(root / "acme/medtune")], check=True)
    return {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.file://{root}/.insteadOf",
            "GIT_CONFIG_VALUE_0": "https://github.com/"}


@pytest.fixture
def colab_server():
    """Answers GET /api/sessions as Colab's Jupyter server does; set `.path` to the notebook's address."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps([{"id": "s1", "name": "medtune_colab.ipynb", "path": server.path, "type": "notebook",
                                "kernel": {"id": "k1", "name": "python3"}}]).encode()
            self.send_response(200 if self.path == "/api/sessions" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.path = ""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.env = {"COLAB_JUPYTER_IP": "127.0.0.1", "KMP_TARGET_PORT": str(server.server_address[1])}
    yield server
    server.shutdown()


def test_outside_colab_without_repo_url_it_asks_for_it_and_runs_no_git(tmp_path, monkeypatch):
    error, outputs = run_setup_cells(tmp_path, monkeypatch)
    assert error is not None
    shown = the_error(outputs)
    assert shown.ename == "SetupError" and len(shown.traceback) == 1  # one message, no traceback
    assert "Set REPO_URL in the first cell" in shown.evalue and "github.com/OWNER/medtune" in shown.evalue
    assert list(tmp_path.iterdir()) == []  # nothing cloned, nothing half-written


def test_opened_from_github_in_colab_it_clones_that_repository_and_branch(tmp_path, monkeypatch, github, colab_server):
    colab_server.path = ("fileId=https%3A%2F%2Fgithub.com%2Facme%2Fmedtune%2Fblob%2Fcolab-fix%2Fnotebooks%2F"
                         "medtune_colab.ipynb")
    folder = tmp_path / "content"
    folder.mkdir()
    error, outputs = run_setup_cells(folder, monkeypatch, {**github, **colab_server.env})
    assert error is None, outputs
    printed = "".join(o.get("text", "") for o in outputs)
    assert "cloning https://github.com/acme/medtune (branch colab-fix)" in printed
    assert f"ready in {folder / 'medtune'}" in printed
    assert (folder / "medtune/scripts/train_phi.py").is_file()


def test_opened_from_drive_in_colab_it_asks_for_repo_url(tmp_path, monkeypatch, colab_server):
    colab_server.path = "fileId=1a2B3c4D5e6F7g8H9i0J"  # a Drive copy: no repository in the address
    folder = tmp_path / "content"
    folder.mkdir()
    error, outputs = run_setup_cells(folder, monkeypatch, colab_server.env)
    shown = the_error(outputs)
    assert error is not None and shown.ename == "SetupError" and "Set REPO_URL" in shown.evalue
    assert list(folder.iterdir()) == []


def test_a_repo_url_that_cannot_be_cloned_is_one_message(tmp_path, monkeypatch, github):
    folder = tmp_path / "content"
    folder.mkdir()
    error, outputs = run_setup_cells(folder, monkeypatch, github, repo_url="https://github.com/acme/no-such-repo")
    shown = the_error(outputs)
    assert error is not None and shown.ename == "SetupError" and len(shown.traceback) == 1
    assert shown.evalue.startswith("Could not clone https://github.com/acme/no-such-repo: ")
    assert "REPO_URL" in shown.evalue
    assert not (folder / "medtune").exists()


def test_a_repo_url_set_by_hand_is_cloned(tmp_path, monkeypatch, github):
    folder = tmp_path / "content"
    folder.mkdir()
    error, outputs = run_setup_cells(folder, monkeypatch, github, repo_url="https://github.com/acme/medtune")
    assert error is None, outputs
    assert (folder / "medtune/scripts/train_phi.py").is_file()
