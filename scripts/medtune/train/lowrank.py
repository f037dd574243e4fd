"""LoRA's low-rank product added as elementwise arithmetic inside torch.compile (MEDTUNE_LORA_ADD=pointwise,
medtune/train/lora_add.py)."""
import torch

# Up to this rank the product is cheap elementwise work (r multiply-adds an output element); above it the
# pointwise path leaves the product to addmm.
MAX_POINTWISE_RANK = 64


class LowRankAdd(torch.autograd.Function):
    """input + alpha * mat1 @ mat2 where mat1 has few columns (LoRA's rank): the forward as that many
    elementwise multiply-adds in float32, which inductor fuses into the kernel that reads the sum; the
    backward as addmm's (the input's gradient passed on, two GEMMs for the factors)."""

    @staticmethod
    def forward(ctx, input, mat1, mat2, alpha):
        ctx.save_for_backward(mat1, mat2)
        ctx.alpha = alpha
        scaled, wide = mat1.float() * alpha, mat2.float()
        total = input.float()
        for k in range(mat1.shape[1]):
            total = total + scaled[:, k:k + 1] * wide[k:k + 1, :]
        return total.to(input.dtype)

    @staticmethod
    def backward(ctx, grad):
        mat1, mat2 = ctx.saved_tensors
        g = grad.to(mat1.dtype)
        d1 = (g @ mat2.t()) * ctx.alpha if ctx.needs_input_grad[1] else None
        d2 = (mat1.t() @ g) * ctx.alpha if ctx.needs_input_grad[2] else None
        return grad, d1, d2, None


def low_rank_addmm(input, mat1, mat2, *, alpha=1, beta=1):
    """torch.addmm for Unsloth's LoRA forward: LowRankAdd while torch.compile traces a LoRA sum, else addmm."""
    if (beta == 1 and torch.compiler.is_compiling() and input.dim() == 2 and mat1.shape[-1] <= MAX_POINTWISE_RANK
            and input.dtype == mat1.dtype == mat2.dtype):
        return LowRankAdd.apply(input, mat1, mat2, alpha)
    return torch.addmm(input, mat1, mat2, alpha=alpha, beta=beta)
