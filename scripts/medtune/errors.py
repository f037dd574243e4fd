"""User-facing errors: one clear paragraph, a non-zero exit, no traceback."""
import functools
import sys
import textwrap

from medtune import distributed
from medtune.offline_tokenizers import OfflineSetupError


class UserError(Exception):
    """A mistake the user can fix. The message says what was wrong and how to fix it.

    Under torchrun or accelerate launch every rank runs the same checks on the same arguments and
    files, so every rank raises the same error and only rank 0 prints it. `rank_specific` marks an
    error that may hit one rank alone (its GPU ran out of memory): that rank prints it."""

    def __init__(self, message, rank_specific=False):
        super().__init__(message)
        self.rank_specific = rank_specific


def report_user_errors(fn):
    """Turn UserError, OfflineSetupError (a missing or damaged cache: the message says how to rebuild it)
    and Ctrl-C into a short message and exit status 2 (130 for Ctrl-C), on every rank."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, OfflineSetupError) as e:
            if distributed.is_main() or getattr(e, "rank_specific", False):
                msg = "\n".join(textwrap.fill(p, 100, break_on_hyphens=False, break_long_words=False)  # keep --flag-names whole
                                for p in str(e).split("\n"))
                print(f"\nerror: {msg}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            if distributed.is_main():
                print("\ninterrupted.", file=sys.stderr)
            sys.exit(130)

    return wrapper
