"""User-facing errors: one clear paragraph, a non-zero exit, no traceback."""
import functools
import sys
import textwrap

from medtune import distributed


class UserError(Exception):
    """A mistake the user can fix. The message says what was wrong and how to fix it.

    Under torchrun or accelerate launch every rank runs the same checks on the same arguments and
    files, so every rank raises the same error and only rank 0 prints it. `rank_specific` marks an
    error that may hit one rank alone (its GPU ran out of memory): that rank prints it."""

    def __init__(self, message, rank_specific=False):
        super().__init__(message)
        self.rank_specific = rank_specific


def parse_options(parser, argv, problems=None):
    """argparse's namespace for argv, where an unknown option is a UserError rather than argparse's usage
    dump; with a `problems` list it is added there, to be reported with the caller's other findings."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        message = f"Unknown option(s): {' '.join(unknown)}. Run with --help to list every option."
        if problems is None:
            raise UserError(message)
        problems.append(message)
    return args


def report_user_errors(fn):
    """Turn UserError (and Ctrl-C) into a short message and exit status 2 (130 for Ctrl-C), on every rank."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if distributed.is_main() or e.rank_specific:
                msg = "\n".join(textwrap.fill(p, 100, break_on_hyphens=False, break_long_words=False)  # keep --flag-names whole
                                for p in str(e).split("\n"))
                print(f"\nerror: {msg}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            if distributed.is_main():
                print("\ninterrupted.", file=sys.stderr)
            sys.exit(130)

    return wrapper
