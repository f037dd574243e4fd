"""Save a random-weight model of a family's architecture with the family's real tokenizer, for
training runs and benchmarks on machines without the Hugging Face Hub.

    python scripts/make_random_model.py phi3 /tmp/phi3-full --full      # Phi-3-mini size (3.8B params)
    python scripts/make_random_model.py mistral /tmp/mistral-tiny       # the 2-layer test stand-in
"""
import argparse
import time
from pathlib import Path

from medtune.errors import UserError, report_user_errors
from medtune.families import FAMILIES


@report_user_errors
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=sorted(FAMILIES), help="model family")
    p.add_argument("out", help="folder to write (must not exist)")
    p.add_argument("--full", action="store_true", help="the real model's sizes instead of the 2-layer stand-in")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} already exists; pass a new folder.")
    import torch

    from medtune.train.modeling import build_random_model

    family = FAMILIES[args.family]
    sizes = family.full_config if args.full else family.tiny_config
    started = time.perf_counter()
    # A full-size model is initialised on the GPU when there is one (minutes faster) and saved in bf16.
    device = "cuda" if args.full and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.full else torch.float32
    build_random_model(family, out, sizes, device=device, dtype=dtype)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**30
    print(f"Wrote {out}/ ({family.title} architecture, random weights, {size:.2f} GiB) "
          f"in {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
