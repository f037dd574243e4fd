"""Where LoRA's product meets the frozen layer's output inside a compiled decoder block.

Unsloth replaces PEFT's LoRA forward (unsloth_zoo.compiler.COMPILED_LORA_FORWARD) with one that adds
the adapter to the frozen product through torch.addmm(result, xA, B^T, beta=1, alpha=scaling). In a
compiled block that is an out-of-place addmm: the GEMM's output is a new buffer, so the frozen
product (tokens x out features) is first copied into it, then read again by the GEMM that adds. On an
H100 80GB, in one steady-state step of Mistral-7B (8,033 tokens, 2026-12-06 14:23 UTC), those copies
took 14.5 ms and the adding GEMMs 22.5 ms of 491 ms of GPU kernels, most of it for gate_proj and
up_proj (14,336 features a token).

Unsloth keeps a second path in the same function, for torch 2.8/2.9 where inductor miscompiled that
addmm: result + scaling * (xA @ B^T). There the low-rank product is a plain GEMM, and inductor adds it
inside the kernel that reads the sum next (RoPE for q and k, SiLU x up, the residual add), with no
copy first. This module can switch a model's compiled blocks to that path: the same LoRA, summed in
float32 inside a kernel instead of in cuBLAS's epilogue. Outside torch.compile (and on the CPU, where
Unsloth leaves PEFT's forward alone) nothing changes.

It is not the default. On an H100 80GB (Mistral-7B, 2026-12-06 14:49 UTC, both runs in one start):
14,998 tokens/s against 14,811 with Unsloth's addmm (1.01x, within the 1% by which two runs of the
same settings differ), 52.9 against 51.0 GiB reserved. Profiles of a step (this path at 14:49, the
addmm at 14:23, another start) show why: LoRA's products went from 76.5 to 50.6 ms without the
copies, but the fused kernels that now add read both products and write both sums, which the
backward keeps (48.0 -> 67.8 ms of them): 450.6 against 456.1 ms of GPU time.
MEDTUNE_LORA_ADD=kernel turns it on: the benchmark's lever.

MEDTUNE_LORA_ADD=triton adds the product by this project's Triton kernel instead (medtune/train/lowrank.py):
one pass that reads the frozen product and writes the sum, with no copy first and no product written.
It is not the default either. On an H100 80GB (2026-12-06 21:45-21:53 UTC, one start, the defaults run
before and after it): Mistral's steps took a median 3-4% less time (faster in 14 of 15 steps), but the
run's tokens/s rose only 0.9-2.1% (15,471 against 15,155 and 15,333: one slow step), about the 1% by
which the two runs of the defaults differ; Phi-3 gained nothing (25,339 against 25,651 and 26,204,
median step 0.3-1.2% slower). The same losses (0.012%).
A third path, the product itself as elementwise multiply-adds inside the compiled kernel, was measured
and dropped: on an H100 80GB (2026-12-06 17:50 UTC) Mistral ran 0.45x and Phi-3 0.43x of the defaults,
as inductor's kernels loaded both factors' 16 values for every output element.
"""
import os

from medtune.errors import UserError

# The global of Unsloth's generated LoRA forward that picks the path while torch.compile traces it.
FLAG = "torch_lora_no_compiled_addmm"
ADDMM = "torch_addmm"  # the global Unsloth's LoRA forward calls for the addmm
ORIGINAL = "_medtune_unsloth_lora_add"  # where Unsloth's own (FLAG, ADDMM) are kept in that namespace
SWITCH = "MEDTUNE_LORA_ADD"
CHOICES = ("addmm", "kernel", "triton")


def lora_forward_globals(model):
    """The module namespaces of the LoRA forwards Unsloth generated for this model's LoRA layers (one per
    PEFT layer class), [] where none is Unsloth's."""
    found = {}
    for module in model.modules():
        if hasattr(module, "lora_A"):
            space = getattr(type(module).forward, "__globals__", None)
            if space is not None and FLAG in space:
                found[id(space)] = space
    return list(found.values())


def choice():
    """MEDTUNE_LORA_ADD's value, "addmm" where unset; a UserError for anything else, so that training's
    cheap checks refuse it before the model loads."""
    value = os.environ.get(SWITCH, "addmm")
    if value not in CHOICES:
        raise UserError(f"{SWITCH}={value!r} is not a choice: it takes kernel (LoRA's product summed in the compiled "
                        "kernel after it), triton (this project's kernel: the sum in one pass, without the copy) or addmm "
                        "(Unsloth's addmm, the default). Unset it or set one of those.")
    return value


def add_in_compiled_kernels(model):
    """With MEDTUNE_LORA_ADD=kernel, compiled blocks add LoRA's product in the kernel that reads the sum
    instead of by addmm; with triton, this project's kernel adds it without the copy; else Unsloth's choice stands.
    The path taken now (path_of)."""
    how = choice()
    from medtune.train.lowrank import copy_free_addmm  # imports torch: not before the CLI's cheap checks

    # The globals are the process's: Unsloth's own values are kept the first time and put back before
    # each choice, so that a later model in the same process (a notebook) takes its own setting.
    for space in lora_forward_globals(model):
        flag, addmm = space.setdefault(ORIGINAL, (space[FLAG], space.get(ADDMM)))
        space[FLAG] = True if how == "kernel" else flag
        if addmm is not None:  # a forward without Unsloth's addmm keeps its own (path_of then says addmm)
            space[ADDMM] = copy_free_addmm if how == "triton" else addmm
    return path_of(model)


def path_of(model):
    """"kernel", "triton" or "addmm": how compiled blocks add LoRA's product; None where Unsloth's
    LoRA forward is absent (the CPU)."""
    from medtune.train.lowrank import copy_free_addmm

    spaces = lora_forward_globals(model)
    if not spaces:
        return None
    if all(space[FLAG] for space in spaces):
        return "kernel"
    return "triton" if all(space.get(ADDMM) is copy_free_addmm for space in spaces) else "addmm"
