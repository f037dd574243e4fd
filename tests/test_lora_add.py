"""medtune/train/lora_add.py: with MEDTUNE_LORA_ADD=kernel compiled blocks add LoRA's product without
Unsloth's addmm (the benchmark's lever; not the default).

On the CPU Unsloth leaves PEFT's LoRA forward alone, so the check patches it as Unsloth does on a GPU
(unsloth_zoo.compiler.patch_lora_forwards), in a process of its own: the patch is process-wide."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

CHECK = textwrap.dedent("""
    import copy, json, sys
    import unsloth, torch
    from unsloth_zoo.compiler import patch_lora_forwards
    patch_lora_forwards({})
    from peft import LoraConfig, get_peft_model
    from medtune.train import lora_add

    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(96, 64, bias=False)

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.up(x)))

    model = get_peft_model(MLP(), LoraConfig(r=16, lora_alpha=32, target_modules=["up", "down"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # PEFT starts B at zero: the product would add nothing
    x = torch.randn(2, 10, 64, requires_grad=True)

    def step():
        ops = []

        def backend(gm, inputs):  # what Dynamo traced, then inductor as torch.compile runs it
            ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, inputs)

        torch._dynamo.reset()
        y = torch.compile(model, backend=backend)(x)
        y.sum().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]
        x.grad = None
        model.zero_grad()
        return y.detach(), grads, ops

    def generated_addmm():  # addmm calls in the code inductor generates for the model in bfloat16
        from torch._inductor.utils import run_and_get_code

        torch._dynamo.reset()
        half, xh = copy.deepcopy(model).to(torch.bfloat16), x.detach().to(torch.bfloat16).requires_grad_()
        _, code = run_and_get_code(lambda: torch.compile(half)(xh).float().sum().backward())
        return sum(c.count("addmm(") for c in code), code[0].count("extern_kernels.mm(")  # code[0]: the forward

    before = lora_add.path_of(model)
    y0, g0, ops0 = step()
    code0, mm0 = generated_addmm()
    chosen = lora_add.add_in_compiled_kernels(model)
    y1, g1, ops1 = step()
    code1, mm1 = generated_addmm()
    json.dump({"before": before, "chosen": chosen, "after": lora_add.path_of(model),
               "addmm_before": sum("addmm" in o for o in ops0), "addmm_after": sum("addmm" in o for o in ops1),
               "code_addmm_before": code0, "code_addmm_after": code1, "forward_mm_before": mm0, "forward_mm_after": mm1,
               "output": (y0 - y1).abs().max().item(), "scale": y0.abs().max().item(),
               "grads": max((a - b).abs().max().item() for a, b in zip(g0, g1)), "n_grads": len(g0)},
              open(sys.argv[1], "w"))
""")


def check(tmp_path, **env):
    script, out = tmp_path / "check.py", tmp_path / "out.json"
    script.write_text(CHECK)
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts"), **env}
    r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_compiled_blocks_add_lora_in_the_next_kernel_with_the_same_numbers(tmp_path):
    r = check(tmp_path, MEDTUNE_LORA_ADD="kernel")
    # Unsloth's forward traced addmm for both LoRA layers; switched, the traced graph holds none.
    assert (r["before"], r["chosen"], r["after"]) == ("addmm", "kernel", "kernel")
    assert r["addmm_before"] == 2 and r["addmm_after"] == 0
    # The same output and gradients (input, every LoRA A and B) in float32.
    assert r["n_grads"] == 5
    assert r["output"] <= 1e-5 * r["scale"] and r["grads"] <= 1e-5


@pytest.mark.slow
def test_the_pointwise_path_computes_the_product_in_the_kernel_with_the_same_numbers(tmp_path):
    r = check(tmp_path, MEDTUNE_LORA_ADD="pointwise")
    assert (r["before"], r["chosen"], r["after"]) == ("addmm", "pointwise", "pointwise")
    assert r["addmm_before"] == 2 and r["addmm_after"] == 0
    # In bfloat16 the generated code loses the forward's two addmm (each copied the frozen product first),
    # and its GEMMs are the frozen products and X @ A alone: B's product is in an elementwise kernel.
    assert r["code_addmm_after"] == r["code_addmm_before"] - 2, r
    assert (r["forward_mm_before"], r["forward_mm_after"]) == (4, 4), r
    assert r["n_grads"] == 5
    assert r["output"] <= 1e-5 * r["scale"] and r["grads"] <= 1e-5


@pytest.mark.slow
def test_by_default_unsloths_addmm_stays(tmp_path):
    r = check(tmp_path)
    assert (r["before"], r["chosen"], r["after"]) == ("addmm", "addmm", "addmm")
    assert r["addmm_before"] == 2 and r["addmm_after"] == 2


def test_a_bad_choice_is_refused_in_one_paragraph(monkeypatch):
    import torch

    from medtune.errors import UserError
    from medtune.train import lora_add

    monkeypatch.setenv("MEDTUNE_LORA_ADD", "Kernel")
    with pytest.raises(UserError, match="MEDTUNE_LORA_ADD='Kernel' is not a choice: it takes kernel"):
        lora_add.add_in_compiled_kernels(torch.nn.Linear(2, 2))
    for how in ("kernel", "pointwise"):
        monkeypatch.setenv("MEDTUNE_LORA_ADD", how)
        assert lora_add.add_in_compiled_kernels(torch.nn.Linear(2, 2)) is None  # no LoRA forward of Unsloth's here
