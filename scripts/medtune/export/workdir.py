"""The export's hidden work folders in the run folder: .export-tmp-<pid>/ while it builds, and
.export-old-<pid>/ for the previous export while the new one takes its place. Used by export/cli.py
(python scripts/export.py checkpoints/NAME)."""
import os
import re
import shutil


def _alive(pid):
    if pid == os.getpid():  # our pid on a folder we did not make: a dead process had it before
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_up_killed_exports(run_dir):
    """An export killed outright (SIGKILL, out of memory, a closed Colab tab) leaves its hidden work
    folder: remove those of processes that are gone, and say so. Killed between its two renames, it
    leaves the previous export as .export-old-<pid> and no export/: put that back."""
    for p in sorted(run_dir.glob(".export-*-*")):
        m = re.fullmatch(r"\.export-(tmp|old)-(\d+)", p.name)
        if not m or not p.is_dir() or _alive(int(m[2])):
            continue
        if m[1] == "old" and not (run_dir / "export").exists():
            p.rename(run_dir / "export")
            print(f"Restored {run_dir / 'export'}/ from {p.name}/, left by an export (process {m[2]}) that was killed.")
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        shutil.rmtree(p, ignore_errors=True)
        print(f"Removed {p}/ ({size / 2**20:.1f} MiB), left by an export (process {m[2]}) that was killed.")
