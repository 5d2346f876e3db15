"""The one CoFE checkpoint format: what `lafid train` writes, resumes from and prunes, and the one reader
of trained weights (`load_cofe`, `lafid bench generate`, the attention maps).

A checkpoint is a folder `checkpoint-<step>/` of safetensors plus JSON, never pickle:
- `trainable.safetensors`: the trained weights (CoFE + LoRA), whole; `ema.safetensors`: their EMA
  (`train.ema_decay` > 0); `recipe.json`: the recipe, so a reader needs only the folder.
- plain runs: `optimizer.safetensors` + `optimizer.json` (AdamW moments and its param groups).
- sharded runs (`train.distributed: fsdp`, `lafid.cofe.shard`): per rank `shard-rank<r>.safetensors`,
  that rank's shard of every trained parameter, of AdamW's state and of the EMA, with
  `shard-rank<r>.json` (param groups, which state tensors are sharded); the whole weights and EMA
  above are gathered once. Resuming needs the same number of ranks.
- per rank `rank<r>.safetensors` (torch RNG states) + `rank<r>.json` (step, data position, LR scheduler).
- `done`, written last: only finished checkpoints are resumed from or counted when pruning.

Loading one and going on gives the same parameters as never stopping. `save` and `load` take the
trainer (`lafid.cofe.train.Trainer`: its accelerator, model, optimizer, scheduler, EMA and position).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

PREFIX = "checkpoint-"
WEIGHTS, EMA_WEIGHTS, RECIPE, DONE = "trainable.safetensors", "ema.safetensors", "recipe.json", "done"
OPTIMIZER, OPTIMIZER_META = "optimizer.safetensors", "optimizer.json"


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([states[f"cuda{i}"] for i in range(torch.cuda.device_count())])


# --- reading -----------------------------------------------------------------------------------

def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a weights file: safetensors, or a torch file read with `weights_only` (no pickled
    code runs); on the CPU."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def finished_checkpoints(output_dir: str | Path) -> list[Path]:
    """The finished checkpoints of a training output folder, oldest step first."""
    done = [p for p in Path(output_dir).glob(f"{PREFIX}*") if (p / DONE).exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest finished checkpoint of a training output folder."""
    done = finished_checkpoints(output_dir)
    return done[-1] if done else None


def checkpoint_weights(checkpoint: str | Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], Path]:
    """(trained CoFE + LoRA weights, the file read) of a checkpoint folder: its EMA when `ema` and the run
    kept one, else `trainable.safetensors`; a weights file given directly is read as it is (`load_weights`)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / (EMA_WEIGHTS if ema and (path / EMA_WEIGHTS).is_file() else WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {WEIGHTS} (a `lafid train` checkpoint-N folder)")
    return load_weights(path), path


def checkpoint_recipe(folder: str | Path):
    """The `CoFERecipe` a checkpoint was trained with."""
    from lafid.cofe.config import CoFERecipe

    path = Path(folder) / RECIPE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {RECIPE} (a `lafid train` checkpoint-N folder)")
    return CoFERecipe.model_validate_json(path.read_text())


# --- writing and resuming ----------------------------------------------------------------------

def save(trainer, folder: Path) -> Path:
    """Write the trainer's checkpoint into `folder` (every rank calls), mark it done, prune old ones."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    acc = trainer.acc
    if trainer.sharded:
        _save_sharded(trainer, folder)
    elif acc.is_main_process:
        _save_whole(trainer, folder, {k: v.detach().contiguous() for k, v in trainer.core.trainable_state().items()},
                    None if trainer.ema is None else {k: v.contiguous() for k, v in trainer.ema.items()})
        state = trainer.plain_optimizer.state_dict()
        save_file({f"{i}.{k}": v.contiguous() for i, s in state["state"].items() for k, v in s.items()},
                  folder / OPTIMIZER)
        (folder / OPTIMIZER_META).write_text(json.dumps({
            "param_groups": state["param_groups"], "state_keys": {str(i): list(s) for i, s in state["state"].items()}}))
    rank = acc.process_index
    save_file(rng_state(), folder / f"rank{rank}.safetensors")
    (folder / f"rank{rank}.json").write_text(json.dumps({"step": trainer.step, "epoch": trainer.epoch,
                                                         "offset": trainer.offset,
                                                         "scheduler": trainer.scheduler.state_dict()}))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (folder / DONE).write_text(str(trainer.step))
        prune_checkpoints(folder.parent, trainer.recipe.train.save_total_limit)
    return folder


def load(trainer, folder: Path) -> None:
    """Put a checkpoint back into the trainer: weights, optimizer, EMA, scheduler, position, RNG."""
    from safetensors.torch import load_file

    if trainer.sharded:
        _load_sharded(trainer, folder)
    else:
        weights, _ = checkpoint_weights(folder, ema=False)
        missing = set(trainer.core.trainable_state()) - set(weights)
        if missing:
            raise KeyError(f"{folder}: checkpoint lacks {sorted(missing)[:3]}...")
        trainer.core.load_state_dict(weights, strict=False)
        if trainer.ema is not None:
            trainer.ema = load_weights(folder / EMA_WEIGHTS)
        tensors, meta = load_file(str(folder / OPTIMIZER)), json.loads((folder / OPTIMIZER_META).read_text())
        state = {int(i): {k: tensors[f"{i}.{k}"] for k in keys} for i, keys in meta["state_keys"].items()}
        trainer.plain_optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    rank = trainer.acc.process_index
    position = json.loads((folder / f"rank{rank}.json").read_text())
    trainer.scheduler.load_state_dict(position["scheduler"])
    trainer.step, trainer.epoch, trainer.offset = position["step"], position["epoch"], position["offset"]
    set_rng_state(load_file(str(folder / f"rank{rank}.safetensors")))


def prune_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Remove all but the `keep` newest finished checkpoints; unfinished ones are left alone."""
    if not keep:
        return []
    gone = finished_checkpoints(output_dir)[:-keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _save_whole(trainer, folder: Path, weights: dict, ema: dict | None) -> None:
    """The files every reader takes: whole trained weights, their EMA, the recipe (main process only)."""
    from safetensors.torch import save_file

    save_file(weights, str(folder / WEIGHTS))
    if ema is not None:
        save_file(ema, str(folder / EMA_WEIGHTS))
    (folder / RECIPE).write_text(trainer.recipe.model_dump_json(indent=1))


def _save_sharded(trainer, folder: Path) -> None:
    """This rank's shards of weights, optimizer state and EMA; the gathered weights on rank 0."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    from lafid.cofe.shard import gathered_state, local_shard

    rank = trainer.acc.process_index
    state = trainer.core.trainable_state()
    names = {id(p): n for n, p in state.items()}
    opt = trainer.plain_optimizer.state_dict()
    params = [p for g in trainer.plain_optimizer.param_groups for p in g["params"]]
    tensors = {f"param.{k}": local_shard(v) for k, v in state.items()}
    sharded = []
    for i, s in opt["state"].items():
        name = names[id(params[i])]
        for key, value in s.items():
            tensors[f"optim.{name}.{key}"] = local_shard(value)
            if isinstance(value, DTensor):
                sharded.append(f"{name}.{key}")
    if trainer.ema is not None:
        tensors.update({f"ema.{k}": local_shard(v) for k, v in trainer.ema.items()})
    save_file(tensors, str(folder / f"shard-rank{rank}.safetensors"))
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[id(params[j])] for j in g["params"]]}
              for g in opt["param_groups"]]
    (folder / f"shard-rank{rank}.json").write_text(json.dumps(
        {"world_size": trainer.acc.num_processes, "param_groups": groups, "sharded": sharded}))
    whole = gathered_state(trainer.core.trainable_state())  # collectives: every rank gathers
    ema = None if trainer.ema is None else gathered_state(trainer.ema)
    if trainer.acc.is_main_process:
        _save_whole(trainer, folder, whole, ema)


def _load_sharded(trainer, folder: Path) -> None:
    """Put this rank's shards back (the run must have as many ranks as the one that saved)."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    rank = trainer.acc.process_index
    meta_path = folder / f"shard-rank{rank}.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
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
    opt_state = {}
    for name, p in state.items():
        keys = sorted({k[len(f"optim.{name}."):] for k in tensors if k.startswith(f"optim.{name}.")})
        entry = {}
        for key in keys:
            t = tensors[f"optim.{name}.{key}"]
            if f"{name}.{key}" in meta["sharded"]:
                t = DTensor.from_local(t.to(p.to_local().device), p.device_mesh, p.placements, shape=p.shape,
                                       stride=p.stride())
            entry[key] = t
        if entry:
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
