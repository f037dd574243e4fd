"""Small file helpers every stage uses: atomic writes (files and folders) and reading JSON Lines.

A reader never sees half a file: each write goes to a temporary sibling that is renamed over the
target only when complete (a rename within one folder is atomic). Standard library only, so that
offline_tokenizers.py can use it when run as a plain file."""
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path, text):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path, data, indent=2):
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_yaml_atomic(path, data):
    import yaml

    return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def write_jsonl_atomic(path, rows):
    return write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path, missing_ok=False):
    """The objects of a .jsonl file, blank lines skipped; [] for a missing file when missing_ok."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextmanager
def atomic_dir(target, replace=False):
    """Yield an empty sibling folder that becomes `target` only if the block succeeds (else it is removed).

    An existing `target` is replaced when `replace`; otherwise it is kept, and a build that another process
    renamed into place first wins."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left behind by a killed run that had the same pid
    tmp.mkdir()
    try:
        yield tmp
        if replace:
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if replace or not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
