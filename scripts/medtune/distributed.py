"""Data-parallel training: one process per GPU (or CPU process), started by torchrun or accelerate launch.

    torchrun --nproc_per_node 2 scripts/train_phi.py
    accelerate launch --multi_gpu --num_processes 2 scripts/train_phi.py

Both launchers set RANK, LOCAL_RANK and WORLD_SIZE; a plain `python scripts/train_phi.py` sets none
and is a world of one, where every function here is a no-op. The trainer shards the data and
averages the gradients; this module is the rest: which process writes the run folder and prints
(rank 0), and waiting for each other around the few things only one process may do.
"""
import os
from contextlib import contextmanager
from datetime import timedelta

TIMEOUT = timedelta(seconds=1800)  # transformers' default ddp_timeout: one slow model download is not a hang


def rank():
    return int(os.environ.get("RANK", 0))


def local_rank():
    """The process's index on its machine, which is also its GPU's index."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main():
    """Rank 0: the one process that prints and writes the run folder."""
    return rank() == 0


def start():
    """Join the launcher's process group (NCCL between GPUs, gloo between CPU processes) before the
    trainer does, so that the run folder checks can wait for every rank. The trainer reuses it."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
        # accelerate calls a CPU process's device cpu:0, the trainer loads a resumed optimizer state
        # with map_location=that device under DDP, and torch.load can't: "don't know how to restore
        # data location of torch.storage.UntypedStorage (tagged with cpu:0)". Plain cpu loads.
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")


def backend():
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def barrier():
    """Wait until every rank gets here."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def smallest(value):
    """The smallest of every rank's value (an int, or None on every rank), so that a choice made from
    it, such as --gradient-checkpointing auto's from free GPU memory, is the same on every rank."""
    import torch
    import torch.distributed as dist

    if value is None or not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    found = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(found, op=dist.ReduceOp.MIN)
    return int(found.item())


@contextmanager
def local_main_first():
    """Let one process per machine do the body first (build a file in a shared cache), then the others,
    which find it done."""
    if local_rank() != 0:
        barrier()
    yield
    if local_rank() == 0:
        barrier()


def finish():
    """Leave the process group together, once rank 0 has written the run folder."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# One rank that stops with an error tells the others through the launcher's key-value store, so that
# they stop at once rather than wait for its part of the next all-reduce until the 30-minute timeout.
# Each then waits (briefly) until every rank has said its piece: the launcher kills the rest as soon as
# one process exits, and a killed rank 0 could not remove a fresh run folder.
STOPPED_KEY = "medtune/stopped"
CLEANED_KEY = "medtune/cleaned"
REPORTED_KEY = "medtune/reported"
GRACE_S = 10


def _store():
    import torch.distributed as dist

    if world_size() == 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.distributed_c10d._get_default_store()


def tell_others_stopped(reason):
    """Say in the store that this rank stops (reason: one line); a rank other than 0 then gives rank 0
    time to clean up the run folder. At exit, this process waits for the others' reports."""
    import atexit

    store = _store()
    if store is None:
        return
    store.set(STOPPED_KEY, f"rank {rank()}: {reason}")
    atexit.register(reported)
    if not is_main():
        try:
            store.wait([CLEANED_KEY], timedelta(seconds=GRACE_S))
        except Exception:  # rank 0 is gone or stuck: the launcher ends it
            pass


def stopped_elsewhere():
    """The reason another rank gave for stopping, or None."""
    store = _store()
    if store is None or not store.check([STOPPED_KEY]):
        return None
    return store.get(STOPPED_KEY).decode()


def say_cleaned():
    store = _store()
    if store is not None:
        store.set(CLEANED_KEY, "1")


def reported():
    """This rank has printed what it had to say: wait up to GRACE_S seconds for every rank to have."""
    import time

    store = _store()
    if store is None:
        return
    deadline = time.monotonic() + GRACE_S
    count = store.add(REPORTED_KEY, 1)
    while count < world_size() and time.monotonic() < deadline:
        time.sleep(0.1)
        count = store.add(REPORTED_KEY, 0)
