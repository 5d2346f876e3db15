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


def tiny(gate_inputs=("face",), checkpointing: bool = False, injection: str = "fused", recipe: str = "cofe_tiny",
         id_projection: str = "resample", null_key: bool = False, **train) -> CoFEModel:
    r = load_cofe_recipe(recipe)
    torch.manual_seed(0)
    return CoFEModel(r.model_copy(update={
        "cofe": r.cofe.model_copy(update={"gate_inputs": list(gate_inputs), "injection": injection,
                                          "id_projection": id_projection, "null_key": null_key}),
        "train": r.train.model_copy(update={"gradient_checkpointing": checkpointing, **train})}))


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


@pytest.mark.parametrize("gate_inputs,injection", [(("face",), "fused"), (("face", "timestep", "hidden"), "fused"),
                                                   (("face",), "per_expert")])
def test_backbone_output_is_reproduced_at_init(faces, gate_inputs, injection):
    model = tiny(gate_inputs, injection=injection)
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


def clip_batch(faces, n: int = 2) -> dict:
    gen = torch.Generator().manual_seed(3)
    return {"frames": torch.randint(0, 256, (n, 5, 64, 64, 3), generator=gen, dtype=torch.uint8),
            "caption": ["a man talks", "a woman talks"][:n], "face": torch.cat(faces)[:n],
            "id_face": torch.cat(faces)[:n], "has_id": torch.zeros(n, dtype=torch.bool), "id_embedding": None}


def zero_grad_tensors(model: CoFEModel, batch: dict, cut=None) -> tuple[list[str], dict, dict]:
    """One AdamW step, then a second backward: (trainable tensors whose gradient is exactly zero,
    frozen state before, frozen state after). `cut(model)` may sever a path first."""
    trainable = model.trainable_state()
    named = lambda: list(model.named_parameters()) + list(model.named_buffers())  # noqa: E731
    frozen = lambda: {n: t.detach().clone() for n, t in named() if n not in trainable}  # noqa: E731
    before = frozen()
    if cut is not None:
        cut(model)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model(batch, torch.Generator().manual_seed(0)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model(batch, torch.Generator().manual_seed(1)).backward()
    zero = [n for n, p in trainable.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    return zero, before, frozen()


@pytest.mark.parametrize("injection,recipe,id_projection,null_key", [
    ("fused", "cofe_tiny", "resample", False), ("per_expert", "cofe_tiny", "expand", True),
    ("fused", "cofe_tiny_i2v", "resample", True)])
def test_every_cofe_tensor_learns_and_frozen_weights_stay_bit_identical(faces, injection, recipe, id_projection,
                                                                       null_key):
    model = tiny(injection=injection, recipe=recipe, id_projection=id_projection, null_key=null_key).train()
    batch = clip_batch(faces)
    zero, before, after = zero_grad_tensors(model, batch)
    trainable = model.trainable_state()
    nulls = [n for n in trainable if n.endswith("cross.null_key")]
    assert len(nulls) == (len(model.adapter.layers) if null_key else 0)  # the attention sinks are trained too
    assert len(trainable) > 40 and not zero, zero  # every projection, gate, expert and attention tensor
    assert before.keys() == after.keys() and len(before) > 100
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, changed[:5]  # VAE, text encoder, experts, DiT (and BatchNorm statistics) untouched


def _detach_output(module):
    module.register_forward_hook(lambda m, args, out: out.detach())


@pytest.mark.parametrize("cut,severed", [
    (lambda m: _detach_output(m.adapter.projections["sem"]), "adapter.projections.sem."),
    (lambda m: _detach_output(m.adapter.layers[1].fusion.gate), "adapter.layers.1.fusion.gate."),
    (lambda m: _detach_output(m.adapter.layers[0].fusion.experts[2]), "adapter.layers.0.fusion.experts.2."),
])
def test_the_gradient_check_catches_a_severed_path(faces, cut, severed):
    model = tiny(injection="per_expert").train()
    zero, _, _ = zero_grad_tensors(model, clip_batch(faces), cut)
    assert zero and all(n.startswith(severed) for n in zero), zero


def test_per_expert_attention_maps_are_recorded_and_differ_by_expert(faces):
    model = tiny(injection="per_expert")
    trainable = model.trainable_state()
    with torch.no_grad():
        for layer in model.adapter.layers:  # as after training: the output projection is no longer zero
            torch.nn.init.normal_(layer.cross.to_out.weight, std=0.2)
    x, t, text = inputs(model, batch=2)
    model.adapter.record_maps()
    with torch.no_grad():
        model.denoise(x, t, text, model.experts(torch.cat(faces)))
    tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
    for layer in model.adapter.layers:
        probs, contribution = layer.record["probs"], layer.record["contribution"]
        assert len(probs) == len(contribution) == 3
        assert all(p.shape == (2, tokens, 4) for p in probs) and all(c.shape == (2, tokens) for c in contribution)
        torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, tokens))
        assert (probs[0] - probs[1]).abs().max() > 1e-3 and (contribution[0] - contribution[2]).abs().max() > 1e-4
    fused = tiny(injection="fused")
    fused.adapter.record_maps()
    with torch.no_grad():
        fused.denoise(x, t, text, fused.experts(torch.cat(faces)))
    assert len(fused.adapter.layers[0].record["probs"]) == 1  # one attention for the gated sum
    assert len(trainable) < len(fused.trainable_state()) + 2 * 3 * 2 * 3  # K, V, norm per expert per block


def test_null_key_lets_a_video_token_take_less_face(faces):
    """With keys that all score 0 (expert 0's K zeroed) and the null key at its zero init, each of the 4
    face tokens and the sink get 1/5 of every query: expert 0 adds 4/5 of what it adds without the sink."""
    out = {}
    for null_key in (True, False):  # False: the control, every query's probabilities sum to 1
        model = tiny(injection="per_expert", null_key=null_key)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for layer in model.adapter.layers:
                layer.cross.to_k[0].weight.zero_()
                layer.cross.to_k[0].bias.zero_()
                layer.cross.to_out.weight.copy_(torch.randn(layer.cross.to_out.weight.shape, generator=gen) * 0.2)
        x, t, text = inputs(model, batch=2)
        feats = model.experts(torch.cat(faces))
        with torch.no_grad():
            plain = model.denoise(x, t, text, feats)  # scaled_dot_product_attention
            model.adapter.record_maps()
            recorded = model.denoise(x, t, text, feats)  # explicit softmax, probabilities kept
        torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-5)
        out[null_key] = [layer.record for layer in model.adapter.layers]
    for with_sink, without in zip(out[True], out[False]):
        torch.testing.assert_close(with_sink["probs"][0], torch.full_like(with_sink["probs"][0], 0.2))
        torch.testing.assert_close(without["probs"][0], torch.full_like(without["probs"][0], 0.25))
        torch.testing.assert_close(with_sink["contribution"][0], 0.8 * without["contribution"][0])
        assert with_sink["probs"][1].sum(-1).max() < 1 - 1e-3  # expert 1's sink takes a share too


def test_i2v_conditioning_is_wans(faces):
    model = tiny(recipe="cofe_tiny_i2v")
    batch = clip_batch(faces)
    cond = model.i2v_condition(batch["frames"])
    latents = model.encode_video(batch["frames"])
    assert model.transformer.config.in_channels == 36 == latents.shape[1] + cond.shape[1]
    assert cond.shape == (2, 20, *latents.shape[2:])
    mask = cond[:, :4]
    assert bool((mask[:, :, 0] == 1).all()) and bool((mask[:, :, 1:] == 0).all())  # only the first frame is given
    first_only = batch["frames"].clone()
    first_only[:, 1:] = 0
    other_rest = model.i2v_condition(first_only)
    torch.testing.assert_close(other_rest, cond)  # later frames never leak into the condition
    other_first = batch["frames"].clone()
    other_first[:, 0] = 255 - other_first[:, 0]
    assert (model.i2v_condition(other_first)[:, 4:] - cond[:, 4:]).abs().max() > 1e-3
    image = model.image_embeds(batch["frames"])
    assert image.shape[-1] == model.transformer.config.image_dim
    # the transformer reads both: a different first frame or image embedding changes its prediction
    noisy, t, text = torch.randn_like(latents), torch.tensor([500.0, 500.0]), model.text(batch["caption"])
    with torch.no_grad():
        base = model.denoise(noisy, t, text, None, cond, image)
        assert (model.denoise(noisy, t, text, None, model.i2v_condition(other_first), image) - base).abs().max() > 1e-4
        assert (model.denoise(noisy, t, text, None, cond, torch.randn_like(image)) - base).abs().max() > 1e-4


def test_condition_dropout_removes_exactly_the_dropped_conditions(faces):
    model = tiny()
    with torch.no_grad():  # a trained-looking injection, so the face matters
        for layer in model.adapter.layers:
            torch.nn.init.normal_(layer.cross.to_out.weight, std=0.2)
    x, t, text = inputs(model)
    feats = model.experts(torch.cat(faces))
    drop_first = torch.tensor([False, True])
    with torch.no_grad():
        full, plain = model.denoise(x, t, text, feats), model.denoise(x, t, text, None)
        mixed = model.denoise(x, t, text, feats, keep_face=drop_first)
    assert (full[0] - plain[0]).abs().max() > 1e-3
    torch.testing.assert_close(mixed[0], plain[0], rtol=0, atol=1e-6)  # no face for the dropped sample
    torch.testing.assert_close(mixed[1], full[1], rtol=0, atol=1e-6)   # the other keeps its face

    batch = clip_batch(faces)
    keep = torch.tensor([True, True])
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    with torch.no_grad():
        both = model(batch, gen(), keep_face=keep, keep_text=keep)
        no_text = model(batch, gen(), keep_face=keep, keep_text=drop_first)
        empty = model({**batch, "caption": ["", batch["caption"][1]]}, gen(), keep_face=keep, keep_text=keep)
    assert no_text != both
    torch.testing.assert_close(no_text, empty)  # text dropout = the empty caption
    # rates in the recipe: masks drawn from the training generator, so a run is reproducible
    rated = tiny(face_drop=0.5, text_drop=0.5)
    rated.load_state_dict(model.state_dict())
    with torch.no_grad():
        runs = [rated(batch, torch.Generator().manual_seed(s)).item() for s in (7, 7, 8, 9, 10)]
        plain_runs = [model(batch, torch.Generator().manual_seed(s)).item() for s in (7, 8, 9, 10)]
    assert runs[0] == runs[1] and runs[1:] != plain_runs


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
    resample = lambda e: e * d + d + t * d + 4 * d * d + 4 * d + 2 * d  # noqa: E731  (proj, queries, MHA, norm)
    expand = FULL_EXPERT_DIMS["id"] * t * d + t * d + 2 * d  # P_id (id_projection expand): one Linear, norm
    shared = expand + resample(FULL_EXPERT_DIMS["sem"]) + resample(FULL_EXPERT_DIMS["det"])
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


def test_detail_expert_sees_the_crop_at_its_own_size_never_upsampled():
    from lafid.cofe.config import ModelSource
    from lafid.cofe.experts import VisionExpert

    torch.manual_seed(0)
    tower = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=518, patch_size=14)
    detail = VisionExpert("dinov2", ModelSource(config={**tower, "mlp_ratio": 2}))
    semantic = VisionExpert("clip", ModelSource(config={**tower, "image_size": 224, "intermediate_size": 64}))
    crops = {side: torch.randint(0, 256, (1, side, side, 3), dtype=torch.uint8) for side in (112, 224, 600)}
    # DINOv2: 8x8 patches for a 112 crop, 16x16 for 224, capped at its 518 (37x37) for a larger one
    assert [detail(c).shape[1] for c in crops.values()] == [8 * 8 + 1, 16 * 16 + 1, 37 * 37 + 1]
    # CLIP has fixed position embeddings: always resized to its image_size
    assert [semantic(c).shape[1] for c in crops.values()] == [16 * 16 + 1] * 3


def test_gate_entropy_logging_and_load_balancing_term(faces):
    model = tiny()
    batch, gen = clip_batch(faces), lambda: torch.Generator().manual_seed(4)  # noqa: E731
    plain = model(batch, gen())
    stats = model.adapter.gate_stats()
    g = model.adapter.gates()
    assert len(stats["gate_entropy"]) == 2 and all(0 < e < 1.0987 for e in stats["gate_entropy"])
    torch.testing.assert_close(torch.tensor(stats["gate_entropy"][0]),
                               -(g[0] * g[0].log()).sum(-1).mean(), rtol=1e-5, atol=1e-6)
    balance = model.adapter.balance_loss()
    assert balance > 0
    cofe = model.recipe.cofe.model_copy(update={"balance_weight": 0.5})
    model.recipe = model.recipe.model_copy(update={"cofe": cofe})
    weighted = model(batch, gen())
    torch.testing.assert_close(weighted, plain + 0.5 * balance)
    weighted.backward()
    assert model.adapter.layers[0].fusion.gate[2].weight.grad.abs().sum() > 0
    for layer in model.adapter.layers:  # an even mix costs nothing
        layer.gate_live = torch.full((2, 3), 1 / 3)
    assert abs(model.adapter.balance_loss().item()) < 1e-6


def test_load_cofe_attaches_adapter_and_lora_to_a_fresh_transformer(faces, tmp_path):
    from safetensors.torch import save_file

    from lafid.cofe.api import load_cofe
    from lafid.cofe.model import build_transformer

    model = tiny()  # CoFE + LoRA r=8
    with torch.no_grad():  # stand-in for training: every trained tensor moves
        for p in model.trainable_state().values():
            p.add_(torch.randn_like(p) * 0.1)
    save_file({k: v.detach().contiguous() for k, v in model.trainable_state().items()},
              tmp_path / "trainable.safetensors")
    (tmp_path / "recipe.json").write_text(model.recipe.model_dump_json())
    cofe = load_cofe(tmp_path)
    assert len(cofe.lora) == sum("lora_" in k for k in model.trainable_state()) > 0
    transformer = build_transformer(model.recipe.transformer)
    backbone = {k.replace(".base_layer", ""): v for k, v in model.transformer.state_dict().items() if "lora_" not in k}
    transformer.load_state_dict(backbone)  # the same frozen backbone as the model's
    with torch.no_grad():
        before = transformer(*inputs_for(model), return_dict=False)[0]
    cofe.attach(transformer)
    cofe.experts = model.experts  # the tiny recipe's experts are random: share the model's
    face = torch.cat(faces)[:1]
    x, t, text = inputs_for(model)
    with torch.no_grad():
        cofe.set_reference(face)
        got = transformer(x, t, text, return_dict=False)[0]
        want = model.denoise(x, t, text, model.experts(face))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - before).abs().max() > 1e-3  # adapter and LoRA changed the fresh transformer


def inputs_for(model: CoFEModel):
    gen = torch.Generator().manual_seed(2)
    return torch.randn(1, 4, 2, 8, 8, generator=gen), torch.tensor([500.0]), model.text(["a woman talks"])


def ablate(model: CoFEModel, **cofe) -> CoFEModel:
    """`model` with a new adapter built with these CoFE options, moved off its zero init (a trained state)."""
    r = model.recipe
    recipe = r.model_copy(update={"cofe": r.cofe.model_copy(update=cofe)})
    model.adapter.detach()
    torch.manual_seed(0)
    model.adapter = build_adapter(model.transformer.config, model.experts.dims, recipe).attach(model.transformer)
    for p in model.adapter.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def test_a_dropped_expert_has_no_say_and_a_uniform_gate_is_even(faces):
    """cofe.drop_experts: the dropped expert's features no longer reach the prediction (control: with every
    expert kept, swapping that expert's features changes it); cofe.gate uniform: equal weights."""
    model = tiny()
    x, t, text = inputs(model, 1)
    a, b = model.experts(faces[0]), model.experts(faces[1])

    def change(expert):
        with torch.no_grad():  # only the tested expert's features differ between the two calls
            diff = model.denoise(x, t, text, a) - model.denoise(x, t, text, {**a, expert: b[expert]})
        return diff.abs().max().item()

    for injection, experts in (("fused", ("id", "sem", "det")), ("per_expert", ("id",))):
        for expert in experts:
            ablate(model, injection=injection)
            assert change(expert) > 1e-4  # the control: every expert kept
            ablate(model, injection=injection, drop_experts=[expert])
            assert change(expert) == 0.0
            gate = model.adapter.gates()[:, 0]
            assert bool((gate[:, ("id", "sem", "det").index(expert)] == 0).all())
            torch.testing.assert_close(gate.sum(-1), torch.ones(gate.shape[0]))
    ablate(model, gate="uniform", drop_experts=["det"])
    change("id")
    torch.testing.assert_close(model.adapter.gates(), torch.tensor([0.5, 0.5, 0.0]).expand(2, 1, 3))
