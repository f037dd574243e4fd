"""Test-only: scripts/train_phi.py with one rank made to misbehave at one optimizer step, for the no-hang
tests in tests/test_distributed.py. Started by torchrun in place of the training script:

    torchrun --nproc_per_node 2 tests/helpers/faulty_rank.py stall 1 2 --smoke ...   # rank 1 sleeps at step 2
    torchrun --nproc_per_node 2 tests/helpers/faulty_rank.py oom 1 2 --smoke ...     # rank 1 runs out of memory
"""
import os
import sys
import time

fault, bad_rank, bad_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
del sys.argv[1:4]

from medtune.train import modeling  # noqa: E402,F401  (Unsloth before transformers)
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from medtune import distributed  # noqa: E402
from medtune.errors import report_user_errors  # noqa: E402
from medtune.train.cli import run  # noqa: E402


class Fault(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if int(os.environ["RANK"]) == bad_rank and state.global_step + 1 == bad_step:
            if fault == "stall":
                time.sleep(3600)  # the watchdog must end this
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test on this rank only)")


@report_user_errors
def main():
    run("phi3", callbacks=[Fault()])
    distributed.finish()


main()
