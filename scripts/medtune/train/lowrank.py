"""LoRA's sum without the copy (MEDTUNE_LORA_ADD=triton, medtune/train/lora_add.py).

out = input + alpha * mat1 @ mat2, where mat1 has few columns (LoRA's rank), as one Triton kernel that
reads the frozen product (input) once and writes the sum once: a tile of the output takes its rank-r
slices of mat1 and mat2, one tensor-core dot, and the add. torch.addmm with beta=1 writes into a new
buffer that must first hold input (a device-to-device copy of tokens x out features), then reads it
again. A custom operator (medtune::lora_addmm): torch.compile calls it as it is, and its backward is
addmm's (the input's gradient passed on, two GEMMs for the factors).

On an H100 80GB (2026-12-06 21:45 UTC, data/benchmark/h100-2026-12-06-triton.json), in bfloat16 on
Mistral's gate/up shape (8,192 tokens x 14,336 features, rank 16): 0.167 ms against torch.addmm's
0.404 ms, about the time of a plain copy of the frozen product (0.158 ms); error against float64 0.0035
(addmm's 0.015). On the narrowest shape (1,024 features) it is slower than addmm (0.028 against 0.023 ms).
"""
import functools

import torch

# Up to this rank one dot of a tile holds the whole product; above it torch.addmm does the work.
MAX_RANK = 64
DTYPES = (torch.float16, torch.bfloat16)
_KERNEL = None


def _kernel():
    """The Triton kernel, made on first use (Triton imports only where a GPU runs it, or its interpreter)."""
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def lora_addmm_kernel(c_ptr, a_ptr, b_ptr, out_ptr, M, N, K, alpha, scm, scn, sam, sak, sbk, sbn, som, son,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
            rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            rk = tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rm[:, None] * sam + rk[None, :] * sak, mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0)
            b = tl.load(b_ptr + rk[:, None] * sbk + rn[None, :] * sbn, mask=(rk[:, None] < K) & (rn[None, :] < N),
                        other=0.0)
            mask = (rm[:, None] < M) & (rn[None, :] < N)
            c = tl.load(c_ptr + rm[:, None] * scm + rn[None, :] * scn, mask=mask, other=0.0)
            total = c.to(tl.float32) + alpha * tl.dot(a, b)
            tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, total.to(out_ptr.dtype.element_ty), mask=mask)

        _KERNEL = (triton, lora_addmm_kernel)
    return _KERNEL


def triton_addmm(input, mat1, mat2, alpha):
    """input + alpha * mat1 @ mat2 by the kernel, in a new tensor; float32 accumulation, rounded once."""
    triton, kernel = _kernel()
    (m, n), k = input.shape, mat1.shape[1]
    out = torch.empty_like(input)
    block_m, block_n = 64, 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    kernel[grid](input, mat1, mat2, out, m, n, k, float(alpha), *input.stride(), *mat1.stride(), *mat2.stride(),
                 *out.stride(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=max(16, triton.next_power_of_2(k)),
                 num_warps=4)
    return out


@functools.lru_cache(maxsize=None)
def _ampere_or_newer(index):
    return torch.cuda.get_device_capability(index)[0] >= 8


def _last_offset(t):
    return sum((size - 1) * step for size, step in zip(t.shape, t.stride()))


def suits(input, mat1, mat2):
    """Whether the kernel takes this sum: 2-D half-precision tensors of one dtype on an Ampere or newer GPU,
    a rank up to MAX_RANK, offsets that fit the kernel's 32-bit arithmetic; the rest goes to torch.addmm."""
    return (input.dim() == mat1.dim() == mat2.dim() == 2 and input.dtype in DTYPES
            and input.dtype == mat1.dtype == mat2.dtype and mat1.shape[1] <= MAX_RANK
            and max(_last_offset(t) for t in (input, mat1, mat2)) < 2**31
            and input.device.type == "cuda" and _ampere_or_newer(input.device.index or 0))


@torch.library.custom_op("medtune::lora_addmm", mutates_args=())
def lora_addmm(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, alpha: float) -> torch.Tensor:
    if suits(input, mat1, mat2):
        return triton_addmm(input, mat1, mat2, alpha)
    # Laid out as the kernel's output and the fake tensor below (torch.compile checks the strides).
    return torch.addmm(input, mat1, mat2, alpha=alpha, out=torch.empty_like(input))


@lora_addmm.register_fake
def _(input, mat1, mat2, alpha):
    return torch.empty_like(input)


def _setup_context(ctx, inputs, output):
    _, mat1, mat2, ctx.alpha = inputs
    ctx.save_for_backward(mat1, mat2)


def _backward(ctx, grad):
    mat1, mat2 = ctx.saved_tensors
    d1 = (grad @ mat2.t()) * ctx.alpha if ctx.needs_input_grad[1] else None
    d2 = (mat1.t() @ grad) * ctx.alpha if ctx.needs_input_grad[2] else None
    return grad, d1, d2, None


lora_addmm.register_autograd(_backward, setup_context=_setup_context)


def copy_free_addmm(input, mat1, mat2, *, alpha=1, beta=1):
    """torch.addmm for Unsloth's LoRA forward (its global torch_addmm): medtune::lora_addmm for LoRA's sum
    (beta=1, 2-D), else torch.addmm."""
    if beta == 1 and input.dim() == mat1.dim() == mat2.dim() == 2:
        return lora_addmm(input, mat1, mat2, float(alpha))
    return torch.addmm(input, mat1, mat2, alpha=alpha, beta=beta)
