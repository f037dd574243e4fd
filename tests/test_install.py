"""scripts/install.py, the install for Colab and GPU machines: it keeps the torch it finds.

    pytest -q tests/test_install.py              # all; the pip dry runs are marked slow
    pytest -q -m "not slow" tests/test_install.py

The dry runs ask pip's package index (CI has it) and change nothing: one runs in this venv (torch
2.13.0 CPU), one in a stand-in venv whose torch 2.8.0, torchvision 0.23.0 and CUDA libraries are
registered as installed (metadata only, as on a Colab runtime of that torch).
"""
import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests/data"
TORCH_WHEELS = json.loads((DATA / "install/torch-wheels.json").read_text())

spec = importlib.util.spec_from_file_location("install", REPO / "scripts/install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)


@pytest.mark.parametrize("recording, cuda", [
    ("colab-t4-550.txt", (12, 4)), ("h100-580.txt", (13, 0)), ("v100-470.txt", (11, 4)), ("no-driver.txt", None),
])
def test_driver_cuda_from_recorded_nvidia_smi(recording, cuda):
    assert install.driver_cuda((DATA / "nvidia-smi" / recording).read_text()) == cuda


@pytest.mark.parametrize("version, cuda", [
    ("2.14.1", (13, 0)), ("2.12.1", (13, 0)), ("2.9.1", (12, 8)), ("2.8.0", (12, 8)), ("2.6.0", (12, 4)),
])
def test_cuda_of_recorded_torch_wheels(version, cuda):
    assert install.wheel_cuda(version, TORCH_WHEELS[version]["requires_dist"]) == cuda


@pytest.mark.parametrize("version, cuda", [
    ("2.6.0+cu124", (12, 4)), ("2.7.1+cu118", (11, 8)), ("2.9.0+cu130", (13, 0)), ("2.13.0+cpu", None),
])
def test_cuda_of_a_local_build_tag(version, cuda):
    assert install.wheel_cuda(version, ["filelock", "sympy>=1.13.3"]) == cuda


def recorded_offer(requirement):
    """What pip would offer for a torch requirement, from the recorded wheels: the newest that fits."""
    fits = [v for v in TORCH_WHEELS if Version(v) in SpecifierSet(requirement.removeprefix("torch"))]
    newest = max(fits, key=Version, default=None)
    return (newest, TORCH_WHEELS[newest]["requires_dist"]) if newest else None


@pytest.mark.parametrize("recording, supported, chosen", [
    ("colab-t4-550.txt", "torch<2.15.0,>=2.4.0", "2.6.0"),  # 2.7 and later need CUDA 12.6 or newer
    ("h100-580.txt", "torch<2.15.0,>=2.4.0", "2.14.1"),
    ("h100-580.txt", "torch<2.14,>=2.4.0", "2.12.1"),  # the range Unsloth supports is kept
])
def test_torch_chosen_for_the_driver_never_needs_a_newer_cuda(recording, supported, chosen):
    driver = install.driver_cuda((DATA / "nvidia-smi" / recording).read_text())
    version, cuda = install.choose_torch(driver, recorded_offer, supported)
    assert version == chosen and cuda <= driver


def test_a_driver_older_than_every_torch_gets_one_message():
    driver = install.driver_cuda((DATA / "nvidia-smi/v100-470.txt").read_text())
    with pytest.raises(install.InstallError, match=r"CUDA 11\.4 or older yourself.*pytorch\.org"):
        install.choose_torch(driver, recorded_offer, "torch<2.15.0,>=2.4.0")


def test_without_torch_or_a_driver_it_stops_with_one_message(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", tmp_path / "venv"], check=True)
    r = subprocess.run([tmp_path / "venv/bin/python", REPO / "scripts/install.py", "--dry-run"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})  # no nvidia-smi on the path
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "No torch is installed and `nvidia-smi` names no CUDA driver" in r.stderr and "setup.sh" in r.stderr


def install_args(code):
    """The arguments of the `run(..., "scripts/install.py", ...)` call in a notebook cell."""
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "run":
            args = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if "scripts/install.py" in args:
                return args[args.index("scripts/install.py") + 1:]
    return None


def test_the_notebook_readme_and_setup_run_the_same_install():
    cells = [c for c in json.loads((REPO / "notebooks/medtune_colab.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    in_notebook = [args for args in (install_args("".join(c["source"])) for c in cells) if args is not None]
    real_run = (REPO / "README.md").read_text().split("## The real run", 1)[1].split("\n## ", 1)[0]
    code = "".join(re.findall(r"```bash\n(.*?)```", real_run, re.S))
    commands = [shlex.split(line, comments=True) for line in code.splitlines() if "scripts/install.py" in line]
    assert in_notebook == [commands[0][2:]] == [["--export"]]
    assert "requirements.txt" not in code
    assert not any("requirements.txt" in "".join(c["source"]) for c in cells)
    gpu_branch = (REPO / "scripts/setup.sh").read_text().split("if [ $gpu = 1 ]; then", 1)[1].split("else", 1)[0]
    assert ".venv/bin/python scripts/install.py" in gpu_branch and "-r requirements.txt" not in gpu_branch


def dry_run(python):
    r = subprocess.run([python, REPO / "scripts/install.py", "--dry-run", "--export"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.splitlines()


def site_listing(python):
    out = subprocess.run([python, "-c", "import sysconfig, os; p = sysconfig.get_paths()['purelib']; "
                          "print(p); print(*sorted(os.listdir(p)), sep='\\n')"], capture_output=True, text=True)
    return out.stdout.splitlines()


@pytest.fixture(scope="session")
def venv_dry_run():
    """The dry run in this venv, once per session, with the venv listed before and after."""
    before = site_listing(sys.executable)
    lines = dry_run(sys.executable)
    return before, lines, site_listing(sys.executable)


@pytest.mark.slow
def test_dry_run_in_this_venv_keeps_torch_and_pulls_no_cuda_libraries(venv_dry_run):
    before, lines, after = venv_dry_run
    torch = metadata.version("torch")
    assert f"install: torch: {torch} kept" in lines
    assert "install: torchvision: not installed" in lines  # held out: Unsloth's metadata would pull it
    assert "install: CUDA libraries (nvidia-*, cuda-*) pulled: 0" in lines
    moved = r"install:\s+(new|changed): (torch|torchvision|torchaudio|triton|nvidia-\S+|cuda-\S+) "
    assert not [line for line in lines if re.match(moved, line)]
    assert after == before  # a dry run changes nothing


def stand_in(site, name, version, requires=()):
    """Register `name` as installed (metadata only), as pip and importlib.metadata see an installed package."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


@pytest.mark.slow
def test_an_older_torch_is_kept_with_its_cuda_libraries_and_gets_the_xformers_built_for_it(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", tmp_path / "venv"], check=True)
    python = tmp_path / "venv/bin/python"
    site = Path(site_listing(python)[0])
    requires = TORCH_WHEELS["2.8.0"]["requires_dist"]
    stand_in(site, "torch", "2.8.0", requires)
    stand_in(site, "torchvision", "0.23.0", ["numpy", "torch==2.8.0", "pillow!=8.3.*,>=5.3.0"])
    for req in requires:  # torch's CUDA libraries and triton, at the versions torch pins
        pinned = re.match(r"(nvidia-[\w-]+|triton)==([\w.]+)", req)
        if pinned:
            stand_in(site, *pinned.groups())
    before = site_listing(python)
    r = subprocess.run([python, REPO / "scripts/install.py", "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert "install: torch: 2.8.0 kept" in lines and "install: torchvision: 0.23.0 kept" in lines
    assert "install: CUDA libraries (nvidia-*, cuda-*) pulled: 0" in lines
    assert "install: xformers 0.0.32.post2: its wheel requires torch==2.8.0" in lines
    assert not [line for line in lines if re.match(r"install:\s+(new|changed): (torch|torchvision|triton) ", line)]
    assert site_listing(python) == before


@pytest.mark.slow
def test_without_torch_it_picks_one_the_driver_runs_and_says_which(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", tmp_path / "venv"], check=True)
    bin_dir = tmp_path / "bin"  # nvidia-smi of an H100 machine whose driver supports CUDA 13.0
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\ncat {DATA / 'nvidia-smi/h100-580.txt'}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run([tmp_path / "venv/bin/python", REPO / "scripts/install.py", "--dry-run"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    said = re.search(r"no torch installed; the driver supports CUDA 13\.0 \(nvidia-smi\), so torch (\S+) "
                     r"\(built for CUDA (\d+)\.(\d+),", r.stdout)
    assert said and (int(said[2]), int(said[3])) <= (13, 0), r.stdout
    assert f"install: torch: {said[1]} installed" in r.stdout.splitlines()
