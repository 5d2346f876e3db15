"""FSDP for CoFE training (`train.distributed: fsdp`) and checkpoints sharded per rank.

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

A sharded checkpoint holds, per rank, `shard-rank<r>.safetensors`: that rank's
shard of every trained parameter and of AdamW's state (+ EMA), with
`shard-rank<r>.json` (optimizer param groups, which state tensors are sharded);
and `trainable.safetensors` / `ema.safetensors`, the whole trained weights and their
EMA gathered once (what `lafid.cofe.api.checkpoint_weights` reads for `load_cofe` and
`lafid generate`). Resuming needs the same
number of ranks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from lafid.cofe.checkpoint import EMA_WEIGHTS, WEIGHTS, set_rng_state

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


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach().cpu().contiguous().clone()


def gathered_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors of sharded ones (a model's `trainable_state()`, the EMA), float32 on CPU; every rank
    must call: it all-gathers."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().cpu().contiguous()
            for k, v in state.items()}


def save_sharded(trainer, folder: Path) -> None:
    """Write this rank's shards of weights, optimizer state and EMA (plus the gathered weights on rank 0)."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    rank = trainer.acc.process_index
    state = trainer.core.trainable_state()
    names = {id(p): n for n, p in state.items()}
    opt = trainer.plain_optimizer.state_dict()
    params = [p for g in trainer.plain_optimizer.param_groups for p in g["params"]]
    tensors = {f"param.{k}": _local(v) for k, v in state.items()}
    sharded = []
    for i, s in opt["state"].items():
        name = names[id(params[i])]
        for key, value in s.items():
            tensors[f"optim.{name}.{key}"] = _local(value)
            if isinstance(value, DTensor):
                sharded.append(f"{name}.{key}")
    if trainer.ema is not None:
        tensors.update({f"ema.{k}": _local(v) for k, v in trainer.ema.items()})
    save_file(tensors, str(folder / f"shard-rank{rank}.safetensors"))
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[id(params[j])] for j in g["params"]]}
              for g in opt["param_groups"]]
    (folder / f"shard-rank{rank}.json").write_text(json.dumps(
        {"world_size": trainer.acc.num_processes, "param_groups": groups, "sharded": sharded}))
    whole = gathered_state(trainer.core.trainable_state())
    ema = None if trainer.ema is None else gathered_state(trainer.ema)
    if trainer.acc.is_main_process:
        save_file(whole, str(folder / WEIGHTS))
        if ema is not None:
            save_file(ema, str(folder / EMA_WEIGHTS))
        (folder / "recipe.json").write_text(trainer.recipe.model_dump_json(indent=1))


def load_sharded(trainer, folder: Path) -> None:
    """Put this rank's shards back (the run must have as many ranks as the one that saved)."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    rank = trainer.acc.process_index
    meta = json.loads((folder / f"shard-rank{rank}.json").read_text()) \
        if (folder / f"shard-rank{rank}.json").exists() else None
    if meta is None or meta["world_size"] != trainer.acc.num_processes:
        saved = "no sharded state" if meta is None else f"{meta['world_size']} ranks"
        raise ValueError(f"{folder}: checkpoint has {saved} for this run's {trainer.acc.num_processes} rank(s); "
                         f"resume with the same number of processes")
    tensors = load_file(str(folder / f"shard-rank{rank}.safetensors"))
    state = trainer.core.trainable_state()
    with torch.no_grad():
        for k, p in state.items():
            (p.to_local() if isinstance(p, DTensor) else p).copy_(tensors[f"param.{k}"])
    index = {n: i for i, n in enumerate(state)}
    by_name = dict(state)
    opt_state = {}
    for name, p in by_name.items():
        keys = sorted({k[len(f"optim.{name}."):] for k in tensors if k.startswith(f"optim.{name}.")})
        if not keys:
            continue
        entry = {}
        for key in keys:
            t = tensors[f"optim.{name}.{key}"]
            if f"{name}.{key}" in meta["sharded"]:
                t = DTensor.from_local(t.to(p.to_local().device), p.device_mesh, p.placements, shape=p.shape,
                                       stride=p.stride())
            entry[key] = t
        opt_state[index[name]] = entry
    order = [n for g in meta["param_groups"] for n in g["params"]]
    if order != list(state):
        raise ValueError(f"{folder}: trained parameters differ from the checkpoint's")
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [index[n] for n in g["params"]]}
              for g in meta["param_groups"]]
    trainer.plain_optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if trainer.ema is not None:
        for k, v in trainer.ema.items():
            (v.to_local() if isinstance(v, DTensor) else v).copy_(tensors[f"ema.{k}"])
    position = json.loads((folder / f"rank{rank}.json").read_text())
    trainer.scheduler.load_state_dict(position["scheduler"])
    trainer.step, trainer.epoch, trainer.offset = position["step"], position["epoch"], position["offset"]
    set_rng_state(load_file(str(folder / f"rank{rank}.safetensors")))


def prune_checkpoints(output_dir: Path, keep: int | None, prefix: str) -> list[Path]:
    """Remove all but the `keep` newest finished checkpoints; unfinished ones are left alone."""
    if not keep:
        return []
    done = sorted((p for p in Path(output_dir).glob(f"{prefix}*") if (p / "done").exists()),
                  key=lambda p: int(p.name[len(prefix):]))
    gone = done[:-keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
