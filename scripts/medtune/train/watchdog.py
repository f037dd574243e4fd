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

    def _watch(self):
        while not self.done.wait(POLL_S):
            elsewhere = distributed.stopped_elsewhere()
            if elsewhere is not None and not elsewhere.startswith(f"rank {distributed.rank()}:"):
                # A hang is reported by every rank with its stack; an error only by the rank that had it.
                self._end(f"another process stopped ({elsewhere}), so this one stops too", hang="no progress" in elsewhere)
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                what = "the first optimizer step" if self.steps == 0 else f"optimizer step {self.steps + 1}"
                reason = f"no progress: {what} did not finish within --hang-timeout {self.timeout_s} s"
                self._end(reason, hang=True, first=True)

    def _end(self, reason, hang, first=False):
        if self.done.is_set():  # training ended meanwhile
            return
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
        os._exit(EXIT_STATUS)


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
