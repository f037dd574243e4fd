"""--dequantize-once: 16-bit copies of the frozen 4-bit weights, made once when the model is loaded.

In a 4-bit (QLoRA) model every forward and every backward of a layer first dequantizes its frozen NF4
weight to 16 bits (bitsandbytes) and multiplies by that. The copies hold exactly those values, so a
step computes the same numbers without the dequantization kernels and bitsandbytes' per-call work, at
2 bytes per weight instead of about 0.5. auto makes them only where the GPU has room for them and
for every activation of a step (medtune.train.memory.choose_dequantize): on a 15 GB T4 the weights
stay 4-bit. LoRA attaches to the copies as to any frozen linear layer; a run folder holds only the
adapter, and export merges it into the 16-bit base model as before.
"""
import torch

from medtune.train.memory import activation_bytes, choose_dequantize


def quantized_linears(model):
    """[(parent module, attribute name, bitsandbytes Linear4bit)] of the model."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, Linear4bit)]


def copy_bytes(model):
    """Bytes of 16-bit copies of every 4-bit weight (0 without any)."""
    return sum(2 * child.in_features * child.out_features for _, _, child in quantized_linears(model))


def dequantized(layer):
    """A frozen torch.nn.Linear holding the 4-bit layer's weight as bitsandbytes dequantizes it for a
    matmul (in the layer's compute dtype), with its bias."""
    from bitsandbytes.functional import dequantize_4bit

    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                             device=weight.device, dtype=weight.dtype)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = torch.nn.Parameter(layer.bias.data.to(weight.dtype), requires_grad=False)
    return linear


def dequantize_once(model):
    """Replace every 4-bit linear layer by its dequantized copy (one at a time, so memory grows by one
    layer's copy at a time); how many were replaced."""
    layers = quantized_linears(model)
    for parent, name, child in layers:
        setattr(parent, name, dequantized(child))
        del child
    if layers and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(layers)


def apply(model, cfg, checkpointing, free_bytes, cap=None):
    """Decide --dequantize-once for this run (a micro-batch's activations at their worst, as
    --gradient-checkpointing auto weighs them: cap tokens where it caps them), make the copies if so;
    (made?, the line saying why)."""
    need = activation_bytes(model.config, min(cfg.batch_size * cfg.max_seq_length, cap or float("inf")))
    made, why = choose_dequantize(cfg.dequantize_once, copy_bytes(model), checkpointing, need, free_bytes)
    if made:
        dequantize_once(model)
    return made, why
