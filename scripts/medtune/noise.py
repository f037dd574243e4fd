"""Third-party messages that a newcomer reads as failures, kept off the first screen: torch's
_pytree warnings about KernelPreference / ScaleCalculationMode, torchao's "Failed to load
.../_C_mxfp8...so", bitsandbytes' missing CPU kernels, transformers' "mtime may not be reliable", and
llama.cpp's quantizer output (model metadata, tensor table, "falling back to q5_0"). They go to
<cache>/logs/<command>.log, which the command names in its summary; --verbose shows them instead.

    from medtune import noise
    log = noise.divert("export", verbose=args.verbose)   # before the imports that print them
"""
import logging
import os
import sys
from contextlib import contextmanager

from medtune.offline_tokenizers import cache_dir

LOGGERS = ("torch.utils._pytree", "torchao", "bitsandbytes.backends.cpu.ops", "transformers.trainer_utils")
_state = {"path": None, "handler": None}


def divert(command, verbose=False):
    """Send the known noisy loggers to the command's log file from now on; its path (None with
    --verbose, when they print as usual)."""
    if _state["handler"]:  # a second run in one process (the tests) starts its own log
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(_state["handler"])
        _state["handler"].close()
        _state.update(path=None, handler=None)
    if verbose:
        for name in LOGGERS:
            logging.getLogger(name).propagate = True
        return None
    path = cache_dir() / "logs" / f"{command}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
    _state.update(path=path, handler=handler)
    return path


def log_path():
    """Where this command's third-party messages go; None when they are shown (--verbose)."""
    return _state["path"]


@contextmanager
def c_output_to_log():
    """Send what C code writes to the process's stdout and stderr (llama.cpp's quantizer) to the log
    file while the block runs; nothing changes with --verbose."""
    if _state["path"] is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(_state["path"], "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def quietly(fn):
    """fn, its C library's own output in the log file while it runs."""
    def run(*args, **kwargs):
        with c_output_to_log():
            return fn(*args, **kwargs)
    return run


def where():
    """The summary's line about the log file ("" with --verbose)."""
    return f"Third-party messages: {_state['path']} (--verbose shows them here)." if _state["path"] else ""
