"""Checkpoint pieces shared by the plain save (`lafid.cofe.train`), the sharded one
(`lafid.cofe.shard`) and the readers (`lafid.cofe.api`): the weight file names, and each rank's
torch RNG states, written as `rank<r>.safetensors`, so a resumed run draws what an unbroken one would.
"""

from __future__ import annotations

import torch

WEIGHTS, EMA_WEIGHTS = "trainable.safetensors", "ema.safetensors"


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([states[f"cuda{i}"] for i in range(torch.cuda.device_count())])
