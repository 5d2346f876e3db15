"""CoFE on the Wan DiT: identity at init, where gradients go, per-block fusion, full-size build on meta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lafid import media
from lafid.cofe.config import load_cofe_recipe
from lafid.cofe.data import crop_face
from lafid.cofe.model import CoFEModel, build_adapter

# Wan2.1-T2V-1.3B transformer config (diffusers layout).
WAN21_1_3B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# ArcFace r50/r100: 512; Wan's CLIP ViT-H/14 image tower: 1280; DINOv2 ViT-L/14: 1024.
FULL_EXPERT_DIMS = {"id": 512, "sem": 1280, "det": 1024}


def tiny(gate_inputs=("face",), checkpointing: bool = False) -> CoFEModel:
    r = load_cofe_recipe("cofe_tiny")
    torch.manual_seed(0)
    return CoFEModel(r.model_copy(update={
        "cofe": r.cofe.model_copy(update={"gate_inputs": list(gate_inputs)}),
        "train": r.train.model_copy(update={"gradient_checkpointing": checkpointing})}))


@pytest.fixture(scope="module")
def faces():
    """Two real identities (astronaut, Grace Hopper), face crops as the dataset makes them."""
    a = crop_face(media.astronaut(), [0.38, 0.1, 0.6, 0.38], 0.3, 112)
    g = crop_face(media.grace_hopper(), [0.3, 0.12, 0.72, 0.5], 0.3, 112)
    return torch.from_numpy(a)[None], torch.from_numpy(g)[None]


def inputs(model: CoFEModel, batch: int = 2):
    gen = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (batch, 5, 64, 64, 3), generator=gen, dtype=torch.uint8)
    return model.encode_video(frames), torch.tensor([900.0, 150.0][:batch]), model.text(["a man talks"] * batch)


@pytest.mark.parametrize("gate_inputs", [("face",), ("face", "timestep", "hidden")])
def test_backbone_output_is_reproduced_at_init(faces, gate_inputs):
    model = tiny(gate_inputs)
    x, t, text = inputs(model)
    feats = model.experts(torch.cat(faces))
    with torch.no_grad():
        with_cofe = model.denoise(x, t, text, feats)
        model.adapter.detach()
        plain = model.denoise(x, t, text, feats)
    assert model.adapter.gates().shape == (2, 2, 3)
    torch.testing.assert_close(with_cofe, plain, rtol=0, atol=1e-6)
    assert plain.abs().mean() > 0.1  # a real, non-trivial output was compared


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_only_cofe_and_lora(faces, checkpointing):
    model = tiny(checkpointing=checkpointing).train()
    batch = {"frames": torch.randint(0, 256, (2, 5, 64, 64, 3), dtype=torch.uint8), "caption": ["a", "b"],
             "face": torch.cat(faces), "id_face": torch.cat(faces), "has_id": torch.tensor([False, False]),
             "id_embedding": None}
    model(batch, torch.Generator().manual_seed(0)).backward()
    trainable = model.trainable_state()
    assert trainable and all(n.startswith("adapter.") or "lora_" in n for n in trainable)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(trainable)
    out_grads = [p.grad.abs().sum() for n, p in trainable.items() if n.endswith("cross.to_out.weight")]
    assert len(out_grads) == 2 and all(g > 0 for g in out_grads)  # the zero-init injection does learn
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith(("vae.", "text.", "experts."))
               and p.requires_grad) == 0


def test_fusion_weights_differ_between_blocks_and_follow_the_face(faces):
    model = tiny()
    x, t, text = inputs(model, batch=1)
    gates = []
    for face in faces:
        with torch.no_grad():
            model.denoise(x, t, text, model.experts(face))
        gates.append(model.adapter.gates()[:, 0])  # (blocks, 3)
    for g in gates:
        torch.testing.assert_close(g.sum(-1), torch.ones(2))
        assert (g[0] - g[1]).abs().max() > 1e-3
    assert (gates[0] - gates[1]).abs().max() > 1e-3


def test_wan21_1_3b_with_cofe_builds_on_meta():
    from diffusers import WanTransformer3DModel

    recipe = load_cofe_recipe("cofe_tiny")
    full = recipe.model_copy(update={"cofe": recipe.cofe.model_copy(update={"heads": 12, "gate_hidden": 256})})
    with torch.device("meta"):
        transformer = WanTransformer3DModel.from_config(WAN21_1_3B)
        adapter = build_adapter(transformer.config, FULL_EXPERT_DIMS, full).attach(transformer)
    base = sum(p.numel() for p in transformer.parameters())
    added = sum(p.numel() for p in adapter.parameters())
    print(f"\nWan2.1-1.3B: backbone {base:,} params; CoFE adds {added:,} ({added / base:.1%})")
    assert 1.2e9 < base < 1.5e9 and len(adapter.layers) == 30
    assert all(p.is_meta for p in adapter.parameters())
    # with CoFE: every one of the 30 blocks fuses (pre-hook) and injects after its text cross-attention
    assert all(len(b._forward_pre_hooks) == 1 and len(b.attn2._forward_hooks) == 1 for b in transformer.blocks)
    # the count is the paper's layout, from the config alone: d = 12 x 128, experts d/4 wide, gate 256, 4 tokens
    d, h, g, t = 1536, 1536 // 4, 256, 4
    gate = 3 * d * g + g + g * 3 + 3  # W1 on concat(P_id, P_sem, P_det), W2 -> 3 weights
    experts = 3 * (2 * d + d * h + h + h * d + d)  # LayerNorm, Linear, GELU, Linear
    cross = 3 * (d * d + d) + d  # to_k, to_v, to_out, RMSNorm on k
    shared = sum(e * d + d + t * d + 4 * d * d + 4 * d + 2 * d for e in FULL_EXPERT_DIMS.values())  # proj, queries, MHA, norm
    assert added == shared + 30 * (gate + experts + cross)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"{added:,}" in readme and f"{base:,}" in readme, "README's CoFE parameter count is stale"


def test_arcface_onnx_and_torch_backends_agree_and_precomputed_rows_win(faces, tmp_path):
    from safetensors.torch import save_file

    from lafid.cofe.config import IdentityConfig
    from lafid.cofe.experts import IResNet, IdentityExpert

    torch.manual_seed(0)
    net = IResNet([1, 1, 1, 1], width=8).eval()
    save_file(net.state_dict(), tmp_path / "arcface.safetensors")
    torch.onnx.export(net, torch.randn(1, 3, 112, 112), tmp_path / "arcface.onnx", input_names=["data"],
                      dynamic_axes={"data": {0: "n"}}, dynamo=False)
    port = IdentityExpert(IdentityConfig(backend="iresnet", path=tmp_path / "arcface.safetensors",
                                         layers=[1, 1, 1, 1], width=8))
    onnx = IdentityExpert(IdentityConfig(backend="onnx", path=tmp_path / "arcface.onnx"))
    both = torch.cat(faces)
    a, b = port(both), onnx(both)
    assert a.shape == (2, 1, 512)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert torch.nn.functional.cosine_similarity(a[0], a[1]).item() < 0.999  # two people, two embeddings
    given = torch.randn(2, 512)
    mixed = onnx(both, given, torch.tensor([True, False]))
    torch.testing.assert_close(mixed[0, 0], torch.nn.functional.normalize(given[0], dim=-1))
    torch.testing.assert_close(mixed[1], b[1])
