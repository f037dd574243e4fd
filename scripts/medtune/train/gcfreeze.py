"""Python's garbage collector during training.

Once torch.compile has compiled a model's decoder blocks, the process holds millions of long-lived
Python objects (graphs, guards, generated code, modules). CPython starts a full collection on its own
every so often, and each one walks all of them while the GPU runs out of queued work: on an H200
some steps of a run took 0.8 s longer than their neighbours. The callback here collects once and then
freezes (gc.freeze) what exists, at the end of the first step and of every later step during which
torch.compile compiled, so later collections walk only what was made since. Garbage made later is
still collected; an object alive at a freeze that later becomes unreachable in a reference cycle stays
in memory until training ends, when everything is unfrozen.
"""
import gc
import time


def compile_events():
    """How many times torch.compile has compiled something in this process so far."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return 0
    return sum(len(v) for v in compilation_time_metrics.values())


class FullCollections:
    """Counts CPython's full (generation 2) collections and the seconds they took, via gc.callbacks."""

    def __init__(self):
        self.count, self.seconds, self._began = 0, 0.0, None

    def __call__(self, phase, info):
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.count += 1
            self.seconds += time.perf_counter() - self._began
            self._began = None

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def freeze_callback():
    """A TrainerCallback freezing the collector's objects after compiling (see the module's docstring).
    Built here: transformers may only be imported after Unsloth."""
    from transformers import TrainerCallback

    class FreezeAfterCompiling(TrainerCallback):
        def __init__(self):
            self.seen, self.freezes = None, 0

        def on_step_end(self, args, state, control, **kw):
            events = compile_events()
            if events != self.seen:
                gc.collect()
                gc.freeze()
                self.seen, self.freezes = events, self.freezes + 1

        def on_train_end(self, args, state, control, **kw):
            gc.unfreeze()

    return FreezeAfterCompiling()
