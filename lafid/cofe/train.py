"""CoFE training loop: accelerate, AdamW on CoFE (+LoRA), grad accumulation, exact resume.

Checkpoints (`checkpoint-<step>/`, safetensors plus JSON) are written and read by
`lafid.cofe.checkpoint`; loading one and going on gives the same parameters as never stopping.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lafid.cofe import checkpoint
from lafid.cofe.config import CoFERecipe, load_cofe_recipe
from lafid.cofe.data import ClipDataset, collate
from lafid.cofe.model import CoFEModel


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)   # one per optimizer step run in this call
    clips: int = 0
    seconds: float = 0.0
    checkpoint: Path | None = None


def sample_generators(seed: int, places: list[tuple[int, int]]) -> list[torch.Generator]:
    """One generator per sample for its noise, timestep and dropout draws, seeded by (train seed, epoch,
    place in the epoch's global order): the draws do not depend on how samples are split over ranks,
    and a resumed run, which restarts at the saved data position, draws them again."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, e, g]).generate_state(1, np.uint64)[0]))
            for e, g in places]


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warmup, then constant / linear / cosine decay
    to `min_ratio` at `total_steps`."""
    warmup = max(1, warmup_steps)
    if step < warmup or schedule == "constant":
        return min(1.0, (step + 1) / warmup)
    done = min(1.0, (step + 1 - warmup) / max(1, total_steps - warmup + 1))
    decay = 1.0 - done if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
    return min_ratio + (1.0 - min_ratio) * decay


class Trainer:
    def __init__(self, recipe: CoFERecipe):
        from accelerate import Accelerator

        self.recipe = recipe
        t = recipe.train
        self.acc = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum)
        torch.manual_seed(t.seed)  # the same random tiny weights / CoFE init on every rank and run
        self.model = CoFEModel(recipe)
        from lafid.cofe.cache import CACHE_META

        if recipe.data.cache is not None and (Path(recipe.data.cache) / CACHE_META).exists():
            self.model.drop_encoders()  # every input comes from the cache: no VAE, text encoder or experts on the GPU
        self.sharded = t.distributed == "fsdp" and self.acc.num_processes > 1
        if self.sharded:  # before the optimizer takes the parameters: FSDP replaces them by their shards
            from lafid.cofe.shard import fully_shard_cofe

            fully_shard_cofe(self.model, t.mixed_precision, self.acc.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.lr_schedule, t.min_lr_ratio))
        if self.sharded:  # FSDP reduces gradients itself: no DDP wrapper
            self.optimizer = self.acc.prepare_optimizer(optimizer)
        else:
            self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        self.scheduler = scheduler  # stepped once per optimizer step, not per process
        self.dataset = ClipDataset(recipe.data, rank=self.acc.process_index, world_size=self.acc.num_processes)
        if self.dataset.cache is not None:
            from lafid.cofe.cache import check_meta

            check_meta(recipe.data.cache, recipe)  # made from these encoders, sizes and draws
        if len(self.dataset) == 0:
            raise ValueError(f"no clips for rank {self.acc.process_index} of {self.acc.num_processes}")
        self.step, self.epoch, self.offset = 0, 0, 0
        self.ema = {k: v.detach().clone().float() for k, v in self.core.trainable_state().items()} \
            if t.ema_decay > 0 else None

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = self.recipe.train.ema_decay
        for k, v in self.core.trainable_state().items():
            self.ema[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)

    @property
    def core(self) -> CoFEModel:
        return self.acc.unwrap_model(self.model)

    @property
    def plain_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer  # accelerate's wrapper holds the torch optimizer

    def save(self, folder: Path) -> Path:
        return checkpoint.save(self, folder)

    def load(self, folder: Path) -> None:
        checkpoint.load(self, folder)

    def batches(self):
        """Endless (batch, size) stream from the saved data position, one epoch after another: one
        DataLoader whose dataset runs on through the epochs, so its workers start (and import their
        models) once per run; (epoch, offset) follow the samples consumed."""
        d = self.recipe.data
        self.dataset.set_position(self.epoch, self.offset)
        self.dataset.spans_epochs = True
        loader = DataLoader(self.dataset, batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=collate,
                            persistent_workers=d.num_workers > 0)
        for batch in loader:
            while self.offset >= self.dataset.epoch_length(self.epoch):
                self.offset -= self.dataset.epoch_length(self.epoch)
                self.epoch += 1
            yield batch, len(batch["clip_id"])

    def fit(self, steps: int | None = None, progress: bool = True) -> TrainResult:
        """Run until optimizer step `steps` (default: the recipe's), checkpointing on the way."""
        from tqdm.auto import tqdm

        t = self.recipe.train
        steps = t.steps if steps is None else steps
        result = TrainResult(steps=self.step)
        self.model.train()
        stream = self.batches()
        bar = tqdm(total=steps, initial=self.step, disable=not (progress and self.acc.is_main_process),
                   desc="cofe", unit="step")
        start = time.perf_counter()
        metrics = Path(t.output_dir) / "metrics.jsonl"
        metrics.parent.mkdir(parents=True, exist_ok=True)
        while self.step < steps:
            total = 0.0
            for _ in range(t.grad_accum):
                batch, n = next(stream)
                with self.acc.accumulate(self.model), self.acc.autocast():
                    loss = self.model(batch, sample_generators(t.seed, batch["place"]))
                    self.acc.backward(loss)
                    if self.acc.sync_gradients:
                        self.acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
                    self.optimizer.step()
                    if self.acc.sync_gradients:
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.acc.sync_gradients and self.ema is not None:
                        self.update_ema()
                self.offset += n
                result.clips += n
                total += self.acc.reduce(loss.detach(), reduction="mean").item() / t.grad_accum  # over ranks
            self.step += 1
            result.losses.append(total)
            bar.update(1)
            if self.step % t.log_every == 0 and self.acc.is_main_process:
                bar.set_postfix(loss=f"{total:.4f}")
                with metrics.open("a") as fh:
                    fh.write(json.dumps({"step": self.step, "loss": total, "lr": self.scheduler.get_last_lr()[0],
                                         **self.core.adapter.gate_stats()}) + "\n")
            if self.step % t.save_every == 0 or self.step == steps:
                result.checkpoint = self.save(Path(t.output_dir) / f"{checkpoint.PREFIX}{self.step}")
        bar.close()
        result.steps, result.seconds = self.step, time.perf_counter() - start
        return result


def main(recipe_path: str | Path, resume: bool = True, steps: int | None = None, progress: bool = True,
         exclude: list[str] | None = None) -> TrainResult:
    """Entry point of `lafid train --recipe R`: resumes from the newest finished checkpoint by default;
    `exclude` adds bench folders whose identities are held out (to the recipe's `data.exclude`)."""
    recipe = load_cofe_recipe(recipe_path)
    if exclude:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(
            update={"exclude": [*recipe.data.exclude, *map(str, exclude)]})})
    trainer = Trainer(recipe)
    last = checkpoint.latest_checkpoint(recipe.train.output_dir) if resume else None
    if last is not None:
        trainer.load(last)
    return trainer.fit(steps, progress=progress)
