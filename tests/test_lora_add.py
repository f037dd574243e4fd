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
    import copy, json, os, sys
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
        return (sum(c.count("extern_kernels.addmm(") for c in code), code[0].count("extern_kernels.mm("),
                code[0].count("= torch.ops.medtune.lora_addmm.default("))  # code[0]: the forward

    before = lora_add.path_of(model)
    y0, g0, ops0 = step()
    code0, mm0, ours0 = generated_addmm()
    chosen = lora_add.add_in_compiled_kernels(model)
    y1, g1, ops1 = step()
    code1, mm1, ours1 = generated_addmm()
    after = lora_add.path_of(model)
    os.environ["MEDTUNE_LORA_ADD"] = "addmm"  # a later model in the same process, with the default
    again = lora_add.add_in_compiled_kernels(model)
    json.dump({"before": before, "chosen": chosen, "after": after, "again": again,
               "addmm_before": sum("method addmm" in o for o in ops0), "addmm_after": sum("method addmm" in o for o in ops1),
               "ours_before": sum("medtune.lora_addmm" in o for o in ops0), "ours_after": sum("medtune.lora_addmm" in o for o in ops1),
               "code_addmm_before": code0, "code_addmm_after": code1, "forward_mm_before": mm0, "forward_mm_after": mm1,
               "code_ours_before": ours0, "code_ours_after": ours1,
               "output": (y0 - y1).abs().max().item(), "scale": y0.abs().max().item(),
               "grads": max((a - b).abs().max().item() for a, b in zip(g0, g1)), "n_grads": len(g0)},
              open(sys.argv[1], "w"))
""")


def run_script(tmp_path, source, timeout, **env):
    """Run source in a process of its own (the patches it makes are process-wide); the JSON it writes."""
    script, out = tmp_path / "check.py", tmp_path / "out.json"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts"), **env}
    r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def check(tmp_path, **env):
    return run_script(tmp_path, CHECK, 600, **env)


@pytest.mark.slow
def test_compiled_blocks_add_lora_in_the_next_kernel_with_the_same_numbers(tmp_path):
    r = check(tmp_path, MEDTUNE_LORA_ADD="kernel")
    # Unsloth's forward traced addmm for both LoRA layers; switched, the traced graph holds none.
    assert (r["before"], r["chosen"], r["after"]) == ("addmm", "kernel", "kernel")
    assert r["again"] == "addmm"  # set back to Unsloth's own for a later model in the same process
    assert r["addmm_before"] == 2 and r["addmm_after"] == 0
    # The same output and gradients (input, every LoRA A and B) in float32.
    assert r["n_grads"] == 5
    assert r["output"] <= 1e-5 * r["scale"] and r["grads"] <= 1e-5


@pytest.mark.slow
def test_the_triton_path_calls_this_projects_operator_with_the_same_numbers(tmp_path):
    r = check(tmp_path, MEDTUNE_LORA_ADD="triton")
    assert (r["before"], r["chosen"], r["after"]) == ("addmm", "triton", "triton")
    assert r["again"] == "addmm"
    assert (r["addmm_before"], r["ours_before"]) == (2, 0) and (r["addmm_after"], r["ours_after"]) == (0, 2), r
    # In bfloat16 the generated forward calls the operator for both LoRA sums instead of addmm (which
    # copies the frozen product first); its GEMMs are the frozen products and X @ A.
    assert (r["code_ours_before"], r["code_ours_after"]) == (0, 2), r
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
    for how in ("kernel", "triton"):
        monkeypatch.setenv("MEDTUNE_LORA_ADD", how)
        assert lora_add.add_in_compiled_kernels(torch.nn.Linear(2, 2)) is None  # no LoRA forward of Unsloth's here


def test_a_lora_forward_without_unsloths_addmm_global_keeps_its_own(monkeypatch):
    """A generated forward that has Unsloth's path flag but no torch_addmm (not the pinned Unsloth's):
    the flag still switches, and no addmm is put in (nor a KeyError raised) on any choice."""
    import torch

    from medtune.train import lora_add

    space = {lora_add.FLAG: False}
    exec("def forward(self, x):\n    return x", space)
    layer = type("Layer", (torch.nn.Module,), {"forward": space["forward"]})()
    layer.lora_A = torch.nn.ModuleDict()
    for how, path in (("triton", "addmm"), ("kernel", "kernel"), ("addmm", "addmm")):
        monkeypatch.setenv("MEDTUNE_LORA_ADD", how)
        assert lora_add.add_in_compiled_kernels(layer) == path
        assert lora_add.ADDMM not in space
    assert space[lora_add.FLAG] is False


INTERPRETED = textwrap.dedent("""
    import json, sys
    import torch
    from medtune.train.lowrank import triton_addmm

    torch.manual_seed(0)
    worst = {}
    for dtype in (torch.float32, torch.float16):
        # Shapes off the kernel's 64 x 128 tiles, ranks below, at and above its 16-wide dot, B as PEFT
        # holds it (out x rank, passed transposed), a frozen product that is a strided view.
        for m, n, k in ((130, 300, 8), (64, 128, 16), (7, 1030, 64), (200, 70, 24)):
            wide = torch.randn(m, n + 5, dtype=dtype)
            frozen, a, b = wide[:, 2:n + 2], torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            out = triton_addmm(frozen, a, b.t(), 0.5)
            exact = torch.addmm(frozen.double(), a.double(), b.t().double(), alpha=0.5)
            err = ((out.double() - exact).abs() / (exact.abs() + 1)).max().item()
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
            assert out.shape == frozen.shape and out.dtype == dtype and out.is_contiguous()
    json.dump(worst, open(sys.argv[1], "w"))
""")


def test_the_triton_kernel_adds_the_low_rank_product_as_addmm_does(tmp_path):
    """The kernel itself, run by Triton's interpreter on the CPU (no bfloat16 there: float32 and float16)."""
    worst = run_script(tmp_path, INTERPRETED, 300, TRITON_INTERPRET="1")
    assert worst["torch.float32"] <= 1e-5 and worst["torch.float16"] <= 2e-3, worst  # float16: one rounding


def test_the_operator_has_addmms_gradients_and_registrations():
    import torch

    from medtune.train.lowrank import copy_free_addmm, lora_addmm, suits

    torch.manual_seed(0)
    frozen, a, b = (torch.randn(12, 40, dtype=torch.float64, requires_grad=True),
                    torch.randn(12, 8, dtype=torch.float64, requires_grad=True),
                    torch.randn(40, 8, dtype=torch.float64, requires_grad=True))
    assert not suits(frozen, a, b.t())  # on the CPU the operator is torch.addmm's arithmetic
    ours = copy_free_addmm(frozen, a, b.t(), alpha=2.0)
    grads = torch.autograd.grad(ours.square().sum(), (frozen, a, b))
    theirs = torch.addmm(frozen, a, b.t(), alpha=2.0)
    expected = torch.autograd.grad(theirs.square().sum(), (frozen, a, b))
    assert torch.allclose(ours, theirs) and all(torch.allclose(x, y) for x, y in zip(grads, expected))
    # Schema, fake tensor (torch.compile), autograd registration and gradients, as torch.library checks them.
    torch.library.opcheck(lora_addmm, (frozen, a, b.t(), 2.0))
    transposed = torch.randn(40, 12, dtype=torch.float64).t().requires_grad_()  # dense, not row-major
    torch.library.opcheck(lora_addmm, (transposed, a, b.t(), 2.0))
    assert torch.autograd.gradcheck(lambda f, x, y: lora_addmm(f, x, y.t(), 0.5), (frozen, a, b))
    # Anything but LoRA's 2-D sum with beta 1 is torch.addmm.
    assert torch.equal(copy_free_addmm(frozen, a, b.t(), alpha=2.0, beta=0.5),
                       torch.addmm(frozen, a, b.t(), alpha=2.0, beta=0.5))


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the compiled Triton kernel needs a CUDA GPU")
def test_the_triton_kernel_on_a_gpu_in_bfloat16():
    """What the interpreter cannot run: bfloat16, tensor-core dots, Mistral's and Phi-3's shapes."""
    import torch

    from medtune.train.lowrank import copy_free_addmm, suits, triton_addmm

    torch.manual_seed(0)
    for m, n, k in ((8192, 14336, 16), (9050, 9216, 16), (333, 1000, 8), (4000, 4096, 64)):
        frozen = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        a, b = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        assert suits(frozen, a, b.t())
        exact = torch.addmm(frozen.double(), a.double(), b.t().double(), alpha=2.0)
        ours = (triton_addmm(frozen, a, b.t(), 2.0).double() - exact).abs() / (exact.abs() + 1)
        theirs = (torch.addmm(frozen, a, b.t(), alpha=2.0).double() - exact).abs() / (exact.abs() + 1)
        assert ours.max() <= max(1.5 * theirs.max().item(), 8e-3), (m, n, k, ours.max(), theirs.max())
    leaves = [t.requires_grad_() for t in (frozen, a, b)]
    g = torch.randn_like(frozen)
    ours = torch.autograd.grad((copy_free_addmm(frozen, a, b.t(), alpha=2.0) * g).sum(), leaves)
    theirs = torch.autograd.grad((torch.addmm(frozen, a, b.t(), alpha=2.0) * g).sum(), leaves)
    # The backward is addmm's own GEMMs: the same gradients up to the order of bfloat16 rounding.
    assert all(((x - y).abs().max() <= 1e-2 * y.abs().max()).item() for x, y in zip(ours, theirs))
