"""CoFE train-step time and peak memory for a recipe, beside the data loader's clips/s.

    python benchmarks/cofe_train_step.py [--recipe cofe_tiny] [--shards DIR] [--steps 20]

Without --shards the sample footage is curated first (demo recipe, in-process).
The loader must supply clips at least as fast as the step consumes them
(batch_size x grad_accum per step); the last line says whether it does.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lafid.cofe.config import load_cofe_recipe
from lafid.cofe.data import ClipDataset, collate
from lafid.cofe.train import Trainer


def curated_shards(folder: Path) -> Path:
    from lafid import media
    from lafid.recipe import load_recipe
    from lafid.runner import curate

    curate(load_recipe("demo"), media.make_sample_set(str(folder / "input")), folder / "shards", executor="sequential")
    return folder / "shards"


def loader_rate(recipe, epochs: int) -> float:
    d = recipe.data
    ds = ClipDataset(d)
    clips, start = 0, time.perf_counter()
    for epoch in range(epochs):
        ds.set_position(epoch, 0)
        for batch in DataLoader(ds, batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=collate):
            clips += len(batch["clip_id"])
    return clips / (time.perf_counter() - start)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="cofe_tiny")
    ap.add_argument("--shards", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--loader-epochs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or curated_shards(Path(tmp))
        r = load_cofe_recipe(args.recipe)
        recipe = r.model_copy(update={
            "data": r.data.model_copy(update={"shards": [str(shards)]}),
            "train": r.train.model_copy(update={"output_dir": Path(tmp) / "run", "save_every": 10**9,
                                                "steps": args.steps + 2, "log_every": 10**9})})
        trainer = Trainer(recipe)
        trainer.fit(steps=2, progress=False)  # warm-up: first-call allocations, worker start
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = trainer.fit(progress=False)
        step_s = result.seconds / args.steps
        clips_per_step = recipe.data.batch_size * recipe.train.grad_accum
        supply = loader_rate(recipe, args.loader_epochs)
    trainable = sum(p.numel() for p in trainer.core.trainable_state().values())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"recipe {recipe.name} on {device}; trainable params {trainable:,}")
    print(f"train step  {step_s * 1000:8.1f} ms  ({1 / step_s:.2f} steps/s, {clips_per_step} clips/step, "
          f"data loading included)")
    print(f"peak memory {peak_memory_mb():8.1f} MiB  ({'CUDA allocated' if torch.cuda.is_available() else 'RSS'})")
    print(f"loader      {supply:8.2f} clips/s  vs  {clips_per_step / step_s:.2f} clips/s consumed "
          f"-> {'keeps up' if supply >= clips_per_step / step_s else 'STARVES the step'} "
          f"({supply / (clips_per_step / step_s):.1f}x)")


if __name__ == "__main__":
    main()
