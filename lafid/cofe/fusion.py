"""CoFE fusion: shared expert projections, per-block gated experts, decoupled face cross-attention.

Attached to a diffusers `WanTransformer3DModel` through hooks, so diffusers' code
and the backbone's module tree stay untouched: a forward pre-hook on each block
computes that block's gate and expert tokens (it sees the block's hidden state and
timestep projection), and a forward hook on the block's text cross-attention
(`attn2`) adds a second attention from the same queries to the face tokens.

Two injections: `fused` sums the gated experts' tokens and attends to the sum
once; `per_expert` gives each expert its own decoupled cross-attention (own K/V)
and sums their outputs with the block's gate after attention, so every expert has
its own attention map. Either way the added output projection starts at zero, so
step 0 reproduces the backbone.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

EXPERTS = ("id", "sem", "det")
GATE_INPUTS = ("face", "timestep", "hidden")
INJECTIONS = ("fused", "per_expert")


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
        """All-zero tokens are padding (the identity expert's missing reference faces): no query sees them."""
        kv = self.proj(tokens)
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        pad = tokens.detach().abs().amax(-1) == 0
        out, _ = self.attn(q, kv, kv, key_padding_mask=pad if bool(pad.any()) else None, need_weights=False)
        return self.norm(q + out)


class VectorProjection(nn.Module):
    """P_id for one-vector experts (`cofe.id_projection: expand`): the vector -> `n_tokens` distinct tokens
    through one linear map (IP-Adapter's image projection), instead of attention over a single key,
    which can only add the same value to every learned query."""

    def __init__(self, in_dim: int, dim: int, n_tokens: int):
        super().__init__()
        self.n_tokens, self.dim = n_tokens, dim
        self.proj = nn.Linear(in_dim, n_tokens * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Several vectors (several reference faces): their mean over the non-zero ones (zero = padding)."""
        if tokens.shape[1] > 1:
            present = (tokens.detach().abs().amax(-1) > 0).to(tokens.dtype)
            vector = (tokens * present[..., None]).sum(1) / present.sum(1, keepdim=True).clamp_min(1)
        else:
            vector = tokens[:, 0]
        return self.norm(self.proj(vector).view(tokens.shape[0], self.n_tokens, self.dim))


class Expert(nn.Module):
    """ε_k^l: a residual MLP that adapts the shared projected tokens to one block."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class FaceFusion(nn.Module):
    """Per-block gate g = softmax(W2 GELU(W1 [inputs])) over the three experts, and each expert's tokens."""

    def __init__(self, dim: int, expert_hidden: int, gate_hidden: int, gate_inputs: Sequence[str],
                 dropped: Sequence[str] = (), uniform: bool = False):
        super().__init__()
        self.gate_inputs = tuple(gate_inputs)
        self.uniform = uniform  # ablation: equal weights over the kept experts instead of the learned gate
        # ablation: dropped experts get gate weight 0 and a zero gate input (the others' weights renormalised)
        self.register_buffer("kept", torch.tensor([k not in dropped for k in EXPERTS]), persistent=False)
        width = dim * (len(EXPERTS) + ("timestep" in self.gate_inputs) + ("hidden" in self.gate_inputs))
        self.gate = nn.Sequential(nn.Linear(width, gate_hidden), nn.GELU(), nn.Linear(gate_hidden, len(EXPERTS)))
        self.experts = nn.ModuleList(Expert(dim, expert_hidden) for _ in EXPERTS)

    def forward(self, projected: dict[str, torch.Tensor], temb: torch.Tensor,
                hidden: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([eps_k(P_k f_k) for each expert], gate (B, 3))."""
        feats = [projected[k] for k in EXPERTS]
        parts = [f.mean(1) * keep for f, keep in zip(feats, self.kept)]
        if "timestep" in self.gate_inputs:
            # (B, 6, D) for Wan2.1, (B, S, 6, D) for Wan2.2 TI2V: pool to (B, D)
            parts.append(temb.float().flatten(1, -2).mean(1).to(parts[0].dtype))
        if "hidden" in self.gate_inputs:
            parts.append(hidden.mean(1).to(parts[0].dtype))
        if self.uniform:  # the learned gate is not consulted (and gets no gradient either way)
            logits = parts[0].new_zeros(parts[0].shape[0], len(EXPERTS))
        else:
            logits = self.gate(torch.cat(parts, dim=-1))
        gate = logits.masked_fill(~self.kept, float("-inf")).softmax(-1)
        return [expert(f) for expert, f in zip(self.experts, feats)], gate


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(2, (heads, -1)).transpose(1, 2)


class FaceCrossAttention(nn.Module):
    """Decoupled cross-attention: the block's own text queries attend to face tokens through new K/V.

    `sets` = 1 (fused injection: one K/V for the gated sum of experts) or 3
    (per-expert injection: one K/V per expert, outputs summed with the gate
    weights before the shared, zero-initialised output projection).

    `null_key`: each set also has one learned key whose value is zero (an attention
    sink), so a video token can attend to nothing and get no face at all; without
    it every video token gets a convex mix of the face values.
    """

    def __init__(self, dim: int, sets: int = 1, eps: float = 1e-6, null_key: bool = False):
        super().__init__()
        # per set, a learned key after the key norm, value fixed at zero; zero at init (logit 0)
        self.null_key = nn.Parameter(torch.zeros(sets, dim)) if null_key else None
        if sets == 1:
            self.to_k, self.to_v, self.norm_k = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.RMSNorm(dim, eps=eps)
        else:
            self.to_k = nn.ModuleList(nn.Linear(dim, dim) for _ in range(sets))
            self.to_v = nn.ModuleList(nn.Linear(dim, dim) for _ in range(sets))
            self.norm_k = nn.ModuleList(nn.RMSNorm(dim, eps=eps) for _ in range(sets))
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def _attend(self, q: torch.Tensor, face: torch.Tensor, k: int | None, heads: int,
                maps: list | None) -> torch.Tensor:
        pick = (lambda m: m) if k is None else (lambda m: m[k])  # noqa: E731
        key = pick(self.norm_k)(pick(self.to_k)(face.to(q.dtype)))
        value = pick(self.to_v)(face.to(q.dtype))
        tokens = key.shape[1]
        if self.null_key is not None:
            null = self.null_key[0 if k is None else k].to(q.dtype).expand(key.shape[0], 1, -1)
            key, value = torch.cat([key, null], 1), torch.cat([value, torch.zeros_like(null)], 1)
        qh, kh, vh = _heads(q, heads), _heads(key, heads), _heads(value, heads)
        if maps is not None:  # explicit softmax to keep the probabilities (same result as SDPA)
            probs = (qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(-1)
            # (B, queries, face tokens), heads averaged; the null key's share is what is left to 1
            maps.append(probs[..., :tokens].detach().float().mean(1))
            out = probs @ vh
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh)
        return out.transpose(1, 2).flatten(2)

    def forward(self, text_attn: nn.Module, x: torch.Tensor, faces: list[torch.Tensor],
                gate: torch.Tensor | None = None, record: dict | None = None) -> torch.Tensor:
        """`faces`: [fused tokens] (fused) or one token set per expert, weighted by `gate` (B, sets).

        `record`, when given, receives `probs` (per expert: (B, queries, tokens)) and
        `contribution` (per expert: (B, queries), the norm of what it adds at each query).
        """
        q = text_attn.norm_q(text_attn.to_q(x))
        maps: list | None = [] if record is not None else None
        if len(faces) == 1:
            outs = [self._attend(q, faces[0], None, text_attn.heads, maps)]
            weights = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        else:
            outs = [self._attend(q, f, k, text_attn.heads, maps) for k, f in enumerate(faces)]
            weights = gate.to(x.dtype)
        mixed = sum(weights[:, k, None, None] * o for k, o in enumerate(outs))
        if record is not None:
            record["probs"] = maps
            record["contribution"] = [(weights[:, k, None, None] * F.linear(o, self.to_out.weight)).detach()
                                      .float().norm(dim=-1) for k, o in enumerate(outs)]
        return self.to_out(mixed)


class CoFELayer(nn.Module):
    """Everything CoFE adds to one DiT block; `gate` keeps the block's last fusion weights for logging."""

    def __init__(self, dim: int, expert_hidden: int, gate_hidden: int, gate_inputs: Sequence[str],
                 injection: str = "fused", null_key: bool = False, dropped: Sequence[str] = (),
                 uniform: bool = False):
        super().__init__()
        self.injection = injection
        self.fusion = FaceFusion(dim, expert_hidden, gate_hidden, gate_inputs, dropped, uniform)
        self.cross = FaceCrossAttention(dim, 1 if injection == "fused" else len(EXPERTS), null_key=null_key)
        self.faces: list[torch.Tensor] | None = None
        self.gate: torch.Tensor | None = None        # detached, for logging
        self.gate_live: torch.Tensor | None = None   # with its graph, for the load-balancing term
        self.record: dict | None = None              # set to {} to keep the next forward's attention maps

    def fuse(self, projected: dict[str, torch.Tensor], temb: torch.Tensor, hidden: torch.Tensor) -> None:
        tokens, gate = self.fusion(projected, temb, hidden)
        if self.injection == "fused":
            tokens = [sum(gate[:, k, None, None] * t for k, t in enumerate(tokens))]
        self.faces, self.gate_live, self.gate = tokens, gate, gate.detach()


class CoFEAdapter(nn.Module):
    """All trainable CoFE parameters: P_id, P_sem, P_det shared by every block, plus one CoFELayer per block."""

    def __init__(self, dim: int, num_blocks: int, expert_dims: dict[str, int], *, face_tokens: int = 4,
                 heads: int = 8, expert_hidden: int | None = None, gate_hidden: int = 256,
                 gate_inputs: Sequence[str] = ("face",), injection: str = "fused", id_projection: str = "resample",
                 null_key: bool = False, dropped: Sequence[str] = (), uniform_gate: bool = False):
        super().__init__()
        if set(dropped) - set(EXPERTS) or len(set(dropped)) >= len(EXPERTS):
            raise ValueError(f"drop_experts must name fewer than all of {EXPERTS}, got {list(dropped)}")
        unknown = set(gate_inputs) - set(GATE_INPUTS)
        if unknown or "face" not in gate_inputs:
            raise ValueError(f"gate_inputs must include 'face' and be among {GATE_INPUTS}, got {list(gate_inputs)}")
        if injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
        self.injection = injection
        self.projections = nn.ModuleDict({k: TokenProjection(expert_dims[k], dim, face_tokens, heads) for k in EXPERTS})
        if id_projection == "expand":
            self.projections["id"] = VectorProjection(expert_dims["id"], dim, face_tokens)
        elif id_projection != "resample":
            raise ValueError(f"id_projection must be resample or expand, got {id_projection!r}")
        self.layers = nn.ModuleList(
            CoFELayer(dim, expert_hidden or dim // 4, gate_hidden, gate_inputs, injection, null_key, dropped,
                      uniform_gate)
            for _ in range(num_blocks))
        self._projected: dict[str, torch.Tensor] | None = None
        self._keep: torch.Tensor | None = None
        self._handles: list = []

    def set_faces(self, features: dict[str, torch.Tensor] | None, keep: torch.Tensor | None = None) -> None:
        """Condition the attached backbone's next forward passes on these expert features (None: plain backbone).

        `keep` (B,) bool: samples where it is False get no face at all (face dropout
        for classifier-free guidance), exactly as if `features` were None for them.
        The projected tokens stay set until the next call on purpose: gradient
        checkpointing re-runs blocks (and their hooks) during backward.
        """
        self._projected = None if features is None else {k: self.projections[k](features[k]) for k in EXPERTS}
        self._keep = keep

    def gates(self) -> torch.Tensor:
        """Fusion weights of the last forward, (blocks, batch, 3)."""
        return torch.stack([layer.gate for layer in self.layers])

    def gate_stats(self) -> dict[str, list]:
        """Per block: mean weight of each expert over the batch, and the gate's mean entropy (nats; ln 3 = uniform)."""
        g = self.gates().float()
        entropy = -(g * g.clamp_min(1e-12).log()).sum(-1).mean(1)
        return {"gates": g.mean(1).tolist(), "gate_entropy": entropy.tolist()}

    def balance_loss(self) -> torch.Tensor:
        """Load-balancing term of the last forward: 3 sum_k mean_b(g_k)^2 - 1 per block, averaged (0 = even use)."""
        usage = torch.stack([layer.gate_live.float().mean(0) for layer in self.layers])
        return (len(EXPERTS) * usage.square().sum(-1) - 1).mean()

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

    def record_maps(self, on: bool = True) -> None:
        """Keep each block's per-expert attention probabilities and contributions of the next forwards."""
        for layer in self.layers:
            layer.record = {} if on else None

    def _fuse_hook(self, layer: CoFELayer):
        def hook(block: nn.Module, args: tuple) -> None:
            hidden, _, temb, _ = args
            if self._projected is None:
                layer.faces = None
                return
            layer.fuse(self._projected, temb, hidden)
        return hook

    def _inject_hook(self, layer: CoFELayer):
        def hook(attn: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if layer.faces is None:
                return None
            added = layer.cross(attn, args[0], layer.faces, layer.gate_live, layer.record)
            if self._keep is not None:
                added = added * self._keep.to(added.dtype)[:, None, None]
            return output + added.to(output.dtype)
        return hook
