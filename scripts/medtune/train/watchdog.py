"""Never a silent hang: a thread beside training that stops the process with one clear error when no
optimizer step finishes for --hang-timeout seconds (the first step's compilation included), or when
another rank of a torchrun / accelerate launch has stopped with an error.

Each process prints where it waits (Python's faulthandler: every thread's stack), rank 0 removes a
fresh run folder that holds no checkpoint, and every process exits with status 1. Started by the
trainer (medtune/train/trainer.py) as a TrainerCallback; tests/test_distributed.py makes one rank stall.
"""
import faulthandler
import os
import sys
import threading
import time

from medtune import distributed

POLL_S = 0.5
LAST_S = 30  # at most: the launcher ends this process as soon as the failed rank has exited
EXIT_STATUS = 1


class Watchdog:
    """beat() after each sign of progress; a thread ends the process when none comes for timeout_s.
    on_stop(): the cleanup to do first (returns a sentence for the message)."""

    def __init__(self, timeout_s, on_stop):
        self.timeout_s = timeout_s
        self.on_stop = on_stop
        self.last = time.monotonic()
        self.steps = 0
        self.done = threading.Event()
        self.ending = threading.Lock()
        self.thread = None

    def start(self):
        self.last = time.monotonic()
        self.thread = threading.Thread(target=self._watch, name="medtune-watchdog", daemon=True)
        self.thread.start()

    def beat(self, step=None):
        self.last = time.monotonic()
        if step is not None:
            self.steps = step

    def stop(self):
        self.done.set()

    def follow_others(self):
        """Stop as the other ranks do if one of them stopped first (a hang, or an error it reported):
        an error here is then only its echo (the connection to it closed), not worth a traceback."""
        if self.ending.locked() and threading.current_thread() is not self.thread:
            # This process's own watchdog is already ending it (both ranks can time out at once, and
            # the store then names this rank): its report counts, not the echo that reached this thread.
            time.sleep(3600)
        elsewhere = distributed.stopped_elsewhere()
        if elsewhere is not None and not elsewhere.startswith(f"rank {distributed.rank()}:"):
            # A hang is reported by every rank with its stack; an error only by the rank that had it.
            self._end(f"another process stopped ({elsewhere}), so this one stops too", hang="no progress" in elsewhere)

    def _watch(self):
        while not self.done.wait(POLL_S):
            self.follow_others()
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                what = "the first optimizer step" if self.steps == 0 else f"optimizer step {self.steps + 1}"
                reason = f"no progress: {what} did not finish within --hang-timeout {self.timeout_s} s"
                self._end(reason, hang=True, first=True)

    def _end(self, reason, hang, first=False):
        if self.done.is_set():  # training ended meanwhile
            return
        if not self.ending.acquire(blocking=False):  # the other thread is ending the process
            if threading.current_thread() is self.thread:
                return
            time.sleep(3600)
        if first:
            distributed.tell_others_stopped(reason)
        n = distributed.world_size()
        who = f"rank {distributed.rank()} of {n}" if n > 1 else "training"
        kept = self.on_stop()
        if distributed.is_main():
            distributed.say_cleaned()
        if hang:
            print(f"\nerror: {who}: {reason}. {kept} Every process exits."
                  + (" Where this process waits (most recent call first):" if hang else ""), file=sys.stderr, flush=True)
        if hang:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        distributed.reported()
        if not hang:  # let the rank that failed exit first: the launcher reports the first exit as the cause
            time.sleep(LAST_S)
        os._exit(EXIT_STATUS)


def failed_run_cleanup(run_dir, fresh):
    """What a failed or stopped run leaves: a fresh run folder without a checkpoint is removed (by
    rank 0). Returns the function doing it, which returns the sentence saying so."""
    import shutil

    from medtune.train.resume import newest_checkpoint

    def clean_up():
        if fresh and newest_checkpoint(run_dir) is None:
            if distributed.is_main():
                shutil.rmtree(run_dir, ignore_errors=True)
            return "Nothing was kept."
        return f"Checkpoints are kept in {run_dir}: add --resume to continue."

    return clean_up


def watchdog_callback(timeout_s, on_stop):
    """A TrainerCallback running a Watchdog from the start to the end of trainer.train(). Built here, at
    call time: transformers may only be imported after Unsloth."""
    from transformers import TrainerCallback

    class WatchdogCallback(TrainerCallback):
        def __init__(self):
            self.dog = Watchdog(timeout_s, on_stop)

        def on_train_begin(self, args, state, control, **kw):
            self.dog.steps = state.global_step
            self.dog.start()

        def on_step_end(self, args, state, control, **kw):
            self.dog.beat(state.global_step)

        def on_prediction_step(self, args, state, control, **kw):
            self.dog.beat()

        def on_save(self, args, state, control, **kw):
            self.dog.beat()

        def on_train_end(self, args, state, control, **kw):
            self.dog.stop()

    return WatchdogCallback()
