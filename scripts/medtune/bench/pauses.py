"""What else the host does during a measured step: torch.compile compiling, and CPython's full
garbage collections (the GPU runs out of queued work while either runs)."""
import gc
import time


def compile_events():
    """How many times torch.compile has compiled something in this process so far (a step that raises
    it compiled; medtune.bench.perf.steady_state leaves such steps out)."""
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
