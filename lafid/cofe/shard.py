"""FSDP for CoFE training (`train.distributed: fsdp`).

The model is sharded with PyTorch's FSDP2 (`fully_shard`) in the processes
accelerate starts (`accelerate launch`; on GPUs NCCL, on CPU gloo): accelerate's own
FSDP plugin turns itself on only for accelerator devices, and applying FSDP2 here
lets the same code run, and be tested, on CPU. Units, each gathered only while it
computes: every Wan transformer block, every CoFE fusion gate + experts
(`FaceFusion`), every face cross-attention, every shared projection; the root
holds the rest of the transformer. The frozen VAE, text encoder, face experts (and i2v image encoder)
are left out (`ignored_params`): they run without gradients, through methods
other than `forward`, and are whole on every rank (unused when training reads a
cache). Gradients are reduce-scattered, so AdamW's moments exist only for each
rank's shard.

Checkpoints of a sharded run (each rank's shards, the whole weights gathered once)
are written and read by `lafid.cofe.checkpoint`, with `local_shard` and `gathered_state`.
"""

from __future__ import annotations

import torch
from torch import nn

UNIT_CLASSES = ("WanTransformerBlock", "FaceFusion", "FaceCrossAttention", "TokenProjection")


def fully_shard_cofe(model: nn.Module, mixed_precision: str = "no", device: torch.device | str = "cpu") -> nn.Module:
    """Shard a CoFEModel in place over the default process group (see the module doc); FSDP moves the
    shards to this rank's device, the frozen encoders it leaves out go to `device` whole."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    encoders = [m for m in (model.vae, model.text, model.experts, model.image_encoder) if m is not None]
    for m in encoders:
        m.to(device)
    ignored = {p for m in encoders for p in m.parameters()}
    kwargs = {"ignored_params": ignored}
    if mixed_precision == "bf16":  # gather in bf16 (one dtype per unit), reduce gradients in float32
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                   cast_forward_inputs=False)
        for p in model.parameters():  # FSDP2 keeps trained shards float32 (the optimizer's master weights)
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    units = [m for m in model.modules() if type(m).__name__ in UNIT_CLASSES and m is not model]
    for unit in reversed(units):  # inner units first
        if not any(True for _ in unit.parameters()):
            continue
        fully_shard(unit, **{k: v for k, v in kwargs.items() if k != "ignored_params"})
    fully_shard(model, **kwargs)
    return model


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a sharded tensor (a plain one whole), detached on CPU."""
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach().cpu().contiguous().clone()


def gathered_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors of sharded ones (a model's `trainable_state()`, the EMA), float32 on CPU; every rank
    must call: it all-gathers."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().cpu().contiguous()
            for k, v in state.items()}
