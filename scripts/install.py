"""Install medtune's requirements on Colab or a CUDA machine, keeping the torch that is already there.

    python scripts/install.py --export            # what the notebook and README run
    python scripts/install.py --export --dry-run  # print what would be installed or changed; change nothing

A bare `pip install -r requirements.txt` lets pip choose torch (requirements.txt leaves it unpinned)
and it takes the newest, with CUDA libraries the runtime's driver may not run. This installs into the
interpreter that runs it, against the torch it finds: torch, torchvision and torchaudio are held at
their installed versions by a pip constraint, xformers comes only as a wheel whose metadata accepts
that torch, and Unsloth itself goes in with --no-deps (what it imports is in requirements.txt). Where
no torch is installed, it picks the newest torch pip offers whose CUDA the driver supports
(`nvidia-smi`). `--export` adds requirements-export.txt (llama-cpp-python; pip builds it from source).
Standard library only: it runs before anything is installed.
"""
import argparse
import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELD = ("torch", "torchvision", "torchaudio")  # built together: one moving breaks the others
XFORMERS = "xformers>=0.0.27.post2"  # Unsloth's own floor for xformers
NO_DEPS = ("unsloth",)  # its metadata asks for torchvision and xformers, which are ours to decide
# torch minor series to try, newest first. Each try reads one wheel's metadata: a few kB where the
# index serves it apart (PEP 658), the whole wheel (about 900 MB) where it does not.
TORCH_TRIES = 12


class InstallError(Exception):
    """A problem the user can fix; printed as one paragraph, exit 2."""


def say(text):
    print(f"install: {text}", flush=True)


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def driver_cuda(smi_output):
    """The newest CUDA the driver supports, as (major, minor), from `nvidia-smi` (table or -q)."""
    m = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", smi_output)
    return (int(m[1]), int(m[2])) if m else None


def wheel_cuda(version, requires_dist):
    """The CUDA a torch build targets: its local tag (2.6.0+cu124) or the CUDA runtime it requires."""
    tag = re.search(r"\+cu(\d+)(\d)$", version)
    if tag:
        return int(tag[1]), int(tag[2])
    for req in requires_dist or ():
        m = re.match(r"(nvidia-cuda-runtime(-cu\d+)?|cuda-toolkit)\b[^=;]*==\s*(\d+)\.(\d+)", req)
        if m:
            return int(m[3]), int(m[4])
    return None


def cuda_text(cuda):
    return f"CUDA {cuda[0]}.{cuda[1]}" if cuda else "no CUDA"


def pip(*args, capture=False):
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(cmd, capture_output=capture, text=True)


def dry_run(args):
    """pip's plan for `pip install ARGS` as (report, None), or (None, pip's error lines)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        r = pip("install", "--dry-run", "--quiet", "--report", str(report), *args, capture=True)
        if r.returncode:
            errors = [line for line in r.stderr.splitlines() if line.strip() and "WARNING" not in line]
            return None, errors[-12:]
        return json.loads(report.read_text()), None


def offered(requirement):
    """(version, requires_dist) of what pip would install for one requirement, deps not followed."""
    report, errors = dry_run(["--no-deps", "--ignore-installed", requirement])
    if report is None:
        return None
    meta = report["install"][0]["metadata"]
    return meta["version"], meta.get("requires_dist") or []


def choose_torch(driver, offer, supported="torch"):
    """Newest torch that `offer(requirement)` yields whose CUDA the driver runs; (version, cuda)."""
    requirement = supported
    for _ in range(TORCH_TRIES):
        found = offer(requirement)
        if found is None:
            break
        version, requires = found
        cuda = wheel_cuda(version, requires)
        if cuda and cuda <= driver:
            return version, cuda
        say(f"torch {version} ({cuda_text(cuda)}) is not a CUDA build this driver ({cuda_text(driver)}) runs; "
            "trying the series before it")
        series = ".".join(version.split("+")[0].split(".")[:2])
        requirement += f"{',' if requirement != 'torch' else ''}<{series}"
    raise InstallError(
        f"No torch that pip offers here runs on this driver ({cuda_text(driver)}, from nvidia-smi). "
        f"Install a torch built for CUDA {driver[0]}.{driver[1]} or older yourself (PyTorch lists the "
        "command per CUDA version, with its --index-url, at https://pytorch.org/get-started/previous-versions/) "
        "or update the NVIDIA driver, then run this again: it keeps the torch it finds.")


def torch_for_driver():
    """Where no torch is installed: the requirement for one this machine's driver runs."""
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        smi = ""
    driver = driver_cuda(smi)
    if driver is None:
        raise InstallError(
            "No torch is installed and `nvidia-smi` names no CUDA driver, so there is no torch to keep "
            "and no driver to choose one for. This install is for Colab and CUDA machines; on a machine "
            "without a GPU run `bash scripts/setup.sh` (it installs the CPU build of torch).")
    version, cuda = choose_torch(driver, offered, unsloth_torch_range())
    say(f"no torch installed; the driver supports {cuda_text(driver)} (nvidia-smi), so torch {version} "
        f"(built for {cuda_text(cuda)}, the newest pip offers that the driver runs) will be installed")
    return f"torch=={version}"


def unsloth_torch_range():
    """The torch versions the pinned Unsloth accepts, as a requirement (torch<2.15.0,>=2.4.0)."""
    found = offered(next(r for r in requirement_lines() if r.startswith("unsloth==")))
    for req in (found or (None, []))[1]:
        if re.match(r"torch\s*[<>=!~(]", req) and "extra ==" not in req:
            return "torch" + re.sub(r"[\s()]", "", req.split(";")[0])[len("torch"):]
    return "torch"


def requirement_lines(export=False):
    files = ["requirements.txt"] + (["requirements-export.txt"] if export else [])
    lines = [line.split("#")[0].strip() for f in files for line in (REPO / f).read_text().splitlines()]
    return [line for line in lines if line]


def is_no_deps(line):
    return re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0].lower() in NO_DEPS


def plan(requirements, constraints, with_xformers):
    """pip's dry-run plan for the main install; returns (report, errors, pip arguments)."""
    args = ["--only-binary", "xformers", "-c", str(constraints)]
    args += [r for r in requirements if not is_no_deps(r)] + ([XFORMERS] if with_xformers else [])
    report, errors = dry_run(args)
    return report, errors, args


def name_of(item):
    return item["metadata"]["name"].lower().replace("_", "-")


def summarise(items):
    """What a plan (pip report items) does to this interpreter, as lines to print."""
    new, changed = [], []
    for item in items:
        name, version = name_of(item), item["metadata"]["version"]
        before = installed(name)
        (changed if before else new).append(f"{name} {before} -> {version}" if before else f"{name} {version}")
    lines = []
    for name in HELD:
        after = next((i["metadata"]["version"] for i in items if name_of(i) == name), None)
        before = installed(name)
        state = ("not installed" if not (before or after) else f"{before} kept" if not after
                 else f"{after} installed" if not before else f"{before} changed to {after}")
        lines.append(f"{name}: {state}")
    cuda = sorted(name_of(i) for i in items if re.match(r"(nvidia|cuda)-", name_of(i)))
    lines.append(f"CUDA libraries (nvidia-*, cuda-*) pulled: {len(cuda)}" + (f" ({', '.join(cuda)})" if cuda else ""))
    lines.append(f"{len(items)} package{'' if len(items) == 1 else 's'}: {len(new)} new, {len(changed)} changed")
    lines += [f"  new: {x}" for x in new] + [f"  changed: {x}" for x in changed]
    return lines


def write_constraints(path, torch_requirement):
    pins = {name: installed(name) for name in HELD if installed(name)}
    lines = [f"{name}=={version}" for name, version in pins.items()]
    for name, version in pins.items():
        say(f"{name} {version} found: held at that version")
    path.write_text("\n".join(lines + ([torch_requirement] if torch_requirement else [])) + "\n")


def make_plan(export, constraints):
    """The plan (pip report items and install arguments), with xformers where a wheel fits the torch."""
    requirements = requirement_lines(export)
    report, errors, args = plan(requirements, constraints, with_xformers=True)
    if report is None:
        report, _, args = plan(requirements, constraints, with_xformers=False)
        if report is None:
            raise InstallError("pip found no set of packages that fits the torch kept here. What pip said:\n  "
                               + "\n  ".join(errors))
        stale = f" (remove the installed xformers {installed('xformers')}: pip uninstall xformers)" if installed("xformers") else ""
        say(f"xformers: no wheel built for this torch; left out{stale}. Unsloth falls back to PyTorch's SDPA attention")
    xformers = next((i["metadata"] for i in report["install"] if name_of(i) == "xformers"), None)
    if xformers:
        torch_req = [r for r in xformers.get("requires_dist") or [] if r.startswith("torch")]
        say(f"xformers {xformers['version']}: its wheel requires {', '.join(torch_req) or 'any torch'}")
    elif installed("xformers") and XFORMERS in args:
        say(f"xformers {installed('xformers')} kept: it fits this torch")
    no_deps = [r for r in requirements if is_no_deps(r)]
    extra, _ = dry_run(["--no-deps", *no_deps])
    return report["install"] + (extra or {"install": []})["install"], args, no_deps


def check_held(before, items=None):
    """Held packages must not move: checked on the plan before installing and on the result after."""
    for name, version in before.items():
        after = next((i["metadata"]["version"] for i in items if name_of(i) == name), version) if items is not None \
            else installed(name)
        if version and after != version:
            raise InstallError(f"{name} {version} {'would change' if items is not None else 'changed'} to {after} "
                               "although it is held. Please report this with the output above.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print what would be installed or changed; change nothing")
    parser.add_argument("--export", action="store_true", help="also requirements-export.txt (llama-cpp-python, built from source)")
    args = parser.parse_args(argv)
    pip_version = tuple(int(x) for x in re.findall(r"\d+", installed("pip") or "0")[:2])
    if pip_version < (22, 2):
        raise InstallError(f"This needs pip 22.2 or newer (for --dry-run --report) in {sys.executable}; it has "
                           f"{'pip ' + installed('pip') if installed('pip') else 'none'}. Get one first: "
                           f"{sys.executable} -m ensurepip --upgrade")
    before = {name: installed(name) for name in HELD}
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        write_constraints(constraints, None if before["torch"] else torch_for_driver())
        items, pip_args, no_deps = make_plan(args.export, constraints)
        say("dry run, nothing changed; pip would do this:" if args.dry_run else "plan:")
        for line in summarise(items):
            if args.dry_run or not line.startswith("  new:"):  # the full list is what a dry run is for
                say(line)
        check_held(before, items)
        if args.dry_run:
            return 0
        say(f"installing {len(items)} packages with pip" + (" (llama-cpp-python builds from source: a few minutes)"
                                                            if args.export and not installed("llama-cpp-python") else ""))
        for step in (pip_args, ["--no-deps", *no_deps]):
            if pip("install", "--quiet", *step).returncode:
                raise InstallError("pip install failed (its error is above). Run this again after fixing it; "
                                   "it keeps the torch it finds.")
    check_held(before)
    say(f"done; torch {installed('torch')} in place")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InstallError as e:
        print(f"install: {e}", file=sys.stderr)
        sys.exit(2)
