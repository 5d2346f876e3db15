"""CoFE fusion: shared expert projections, per-block gated experts, decoupled face cross-attention.

Attached to a diffusers `WanTransformer3DModel` through hooks, so diffusers' code
and the backbone's module tree stay untouched: a forward pre-hook on each block
computes that block's fused face tokens (it sees the block's hidden state and
timestep projection), and a forward hook on the block's text cross-attention
(`attn2`) adds a second attention from the same queries to those face tokens.
The added output projection starts at zero, so step 0 reproduces the backbone.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

EXPERTS = ("id", "sem", "det")
GATE_INPUTS = ("face", "timestep", "hidden")


class TokenProjection(nn.Module):
    """P_k: maps any number of expert tokens to a fixed number of DiT-width tokens.

    Experts give different token counts (1 ArcFace vector, hundreds of patches), but
    the fusion sums experts token by token, so learned queries resample each to `n_tokens`.
    """

    def __init__(self, in_dim: int, dim: int, n_tokens: int, heads: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.queries = nn.Parameter(torch.randn(n_tokens, dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.proj(tokens)
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return self.norm(q + out)


class Expert(nn.Module):
    """ε_k^l: a residual MLP that adapts the shared projected tokens to one block."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class FaceFusion(nn.Module):
    """Per-block gate g = softmax(W2 GELU(W1 [inputs])) over the three experts, and their weighted sum."""

    def __init__(self, dim: int, expert_hidden: int, gate_hidden: int, gate_inputs: Sequence[str]):
        super().__init__()
        self.gate_inputs = tuple(gate_inputs)
        width = dim * (len(EXPERTS) + ("timestep" in self.gate_inputs) + ("hidden" in self.gate_inputs))
        self.gate = nn.Sequential(nn.Linear(width, gate_hidden), nn.GELU(), nn.Linear(gate_hidden, len(EXPERTS)))
        self.experts = nn.ModuleList(Expert(dim, expert_hidden) for _ in EXPERTS)

    def forward(self, projected: dict[str, torch.Tensor], temb: torch.Tensor,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [projected[k] for k in EXPERTS]
        parts = [f.mean(1) for f in feats]
        if "timestep" in self.gate_inputs:
            # (B, 6, D) for Wan2.1, (B, S, 6, D) for Wan2.2 TI2V: pool to (B, D)
            parts.append(temb.float().flatten(1, -2).mean(1).to(parts[0].dtype))
        if "hidden" in self.gate_inputs:
            parts.append(hidden.mean(1).to(parts[0].dtype))
        gate = self.gate(torch.cat(parts, dim=-1)).softmax(-1)
        fused = sum(gate[:, k, None, None] * expert(f) for k, (expert, f) in enumerate(zip(self.experts, feats)))
        return fused, gate


class FaceCrossAttention(nn.Module):
    """Decoupled cross-attention: the block's own text queries attend to face tokens through new K/V."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, text_attn: nn.Module, x: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        heads = text_attn.heads
        q = text_attn.norm_q(text_attn.to_q(x))
        k = self.norm_k(self.to_k(face.to(x.dtype)))
        v = self.to_v(face.to(x.dtype))
        split = lambda t: t.unflatten(2, (heads, -1)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class CoFELayer(nn.Module):
    """Everything CoFE adds to one DiT block; `gate` keeps the block's last fusion weights for logging."""

    def __init__(self, dim: int, expert_hidden: int, gate_hidden: int, gate_inputs: Sequence[str]):
        super().__init__()
        self.fusion = FaceFusion(dim, expert_hidden, gate_hidden, gate_inputs)
        self.cross = FaceCrossAttention(dim)
        self.face: torch.Tensor | None = None
        self.gate: torch.Tensor | None = None


class CoFEAdapter(nn.Module):
    """All trainable CoFE parameters: P_id, P_sem, P_det shared by every block, plus one CoFELayer per block."""

    def __init__(self, dim: int, num_blocks: int, expert_dims: dict[str, int], *, face_tokens: int = 4,
                 heads: int = 8, expert_hidden: int | None = None, gate_hidden: int = 256,
                 gate_inputs: Sequence[str] = ("face",)):
        super().__init__()
        unknown = set(gate_inputs) - set(GATE_INPUTS)
        if unknown or "face" not in gate_inputs:
            raise ValueError(f"gate_inputs must include 'face' and be among {GATE_INPUTS}, got {list(gate_inputs)}")
        self.projections = nn.ModuleDict({k: TokenProjection(expert_dims[k], dim, face_tokens, heads) for k in EXPERTS})
        self.layers = nn.ModuleList(
            CoFELayer(dim, expert_hidden or dim // 4, gate_hidden, gate_inputs) for _ in range(num_blocks))
        self._projected: dict[str, torch.Tensor] | None = None
        self._handles: list = []

    def set_faces(self, features: dict[str, torch.Tensor] | None) -> None:
        """Condition the attached backbone's next forward passes on these expert features (None: plain backbone).

        The projected tokens stay set until the next call on purpose: gradient
        checkpointing re-runs blocks (and their hooks) during backward.
        """
        self._projected = None if features is None else {k: self.projections[k](features[k]) for k in EXPERTS}

    def gates(self) -> torch.Tensor:
        """Fusion weights of the last forward, (blocks, batch, 3)."""
        return torch.stack([layer.gate for layer in self.layers])

    def attach(self, transformer: nn.Module) -> "CoFEAdapter":
        blocks = transformer.blocks
        if len(blocks) != len(self.layers):
            raise ValueError(f"adapter has {len(self.layers)} layers, transformer has {len(blocks)} blocks")
        self.detach()
        for block, layer in zip(blocks, self.layers):
            self._handles.append(block.register_forward_pre_hook(self._fuse_hook(layer)))
            self._handles.append(block.attn2.register_forward_hook(self._inject_hook(layer)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _fuse_hook(self, layer: CoFELayer):
        def hook(block: nn.Module, args: tuple) -> None:
            hidden, _, temb, _ = args
            if self._projected is None:
                layer.face = None
                return
            layer.face, gate = layer.fusion(self._projected, temb, hidden)
            layer.gate = gate.detach()
        return hook

    @staticmethod
    def _inject_hook(layer: CoFELayer):
        def hook(attn: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if layer.face is None:
                return None
            return output + layer.cross(attn, args[0], layer.face).to(output.dtype)
        return hook
