"""`lafid train --plan`: parameter counts from meta-device builds equal the built model's, bytes follow them."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from lafid.cli import app
from lafid.cofe.config import load_cofe_recipe
from lafid.cofe.model import CoFEModel
from lafid.cofe.plan import GiB, count_params, plan


def measured(model: CoFEModel) -> dict[str, int]:
    """Parameter counts of a really built (random-weight) CoFEModel, by part."""
    n = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    frozen_t = sum(p.numel() for p in model.transformer.parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in model.transformer.parameters() if p.requires_grad)
    return {"transformer": frozen_t, "lora": lora, "adapter": n(model.adapter),
            "trainable": sum(p.numel() for p in model.trainable_state().values()), "vae": n(model.vae),
            "text": n(model.text), "identity": n(model.experts.identity), "semantic": n(model.experts.semantic),
            "detail": n(model.experts.detail)}


def with_train(recipe, **kw):
    return recipe.model_copy(update={"train": recipe.train.model_copy(update=kw)})


def test_plan_counts_equal_the_built_models_counts():
    base = load_cofe_recipe("cofe_tiny")
    for rank in (8, 0):  # LoRA on and off: the plan follows the recipe, not a constant
        recipe = base.model_copy(update={"cofe": base.cofe.model_copy(update={"lora_rank": rank})})
        torch.manual_seed(0)
        real = measured(CoFEModel(recipe))
        counted = count_params(recipe)
        assert {k: counted[k] for k in real} == real
        assert (counted["lora"] > 0) == (rank > 0)

    recipe = base
    counts = count_params(recipe)
    one = plan(recipe, 1)
    assert one.bytes["transformer"] == 4 * counts["transformer"]  # float32 frozen weights
    assert one.bytes["optimizer"] == 8 * counts["trainable"] and one.bytes["gradients"] == 4 * counts["trainable"]
    # FSDP shards the transformer, the trained weights, their gradients and AdamW state; DDP does not
    fsdp = with_train(recipe, distributed="fsdp")
    two, ddp_two = plan(fsdp, 2), plan(recipe, 2)
    for key in ("transformer", "trainable", "gradients", "optimizer"):
        assert two.bytes[key] == one.bytes[key] / 2 and ddp_two.bytes[key] == one.bytes[key]
    assert two.bytes["gather"] == 4 * counts["largest_block"] and "gather" not in ddp_two.bytes
    half = plan(with_train(recipe, mixed_precision="bf16", frozen_dtype="bfloat16"), 1)
    assert half.bytes["transformer"] == one.bytes["transformer"] / 2 and half.bytes["text"] == one.bytes["text"] / 2
    assert half.bytes["trainable"] == one.bytes["trainable"]  # trained weights stay float32


def test_plan_of_the_480p_recipes_before_anything_loads():
    from diffusers import WanTransformer3DModel

    from lafid.cofe.model import build_adapter

    small = load_cofe_recipe("cofe_wan21_1_3b_480p")
    counts = count_params(small)
    with torch.device("meta"):  # an independent meta build of the backbone and CoFE
        transformer = WanTransformer3DModel.from_config(small.transformer.config)
        adapter = build_adapter(transformer.config, {"id": 512, "sem": 1280, "det": 1024}, small)
    assert counts["transformer"] == sum(p.numel() for p in transformer.parameters()) == 1_418_996_800
    assert counts["trainable"] == sum(p.numel() for p in adapter.parameters())
    p = plan(small, 1)
    assert p.tokens == 21 * (480 // 16) * (832 // 16)  # 81 frames -> 21 latent frames, 16 px per token
    assert p.bytes["transformer"] == 2 * counts["transformer"]  # bf16

    big = load_cofe_recipe("cofe_wan21_14b_fsdp")
    one, eight = plan(big, 1), plan(big, 8)
    print("\n" + eight.table(80))
    assert 14e9 < eight.params["transformer"] < 14.5e9
    assert eight.total < 72 * GiB < one.total  # 14B + CoFE fits an 80 GB card only when sharded
    assert eight.total - eight.cached_total == sum(eight.bytes[k] for k in ("vae", "text", "experts")) > 12 * GiB

    run = CliRunner().invoke(app, ["train", "--recipe", "cofe_wan21_14b_fsdp", "--plan", "--gpus", "8"])
    assert run.exit_code == 0, run.output
    assert f"{eight.params['trainable']:,}" in run.output and f"{eight.total / GiB:.2f}" in run.output
    assert "fits a 80 GiB GPU (" in run.output and "NOT" not in run.output
    assert f"{eight.cached_total / GiB:.2f}" in run.output


def test_plan_of_the_i2v_14b_recipe_counts_its_image_encoder():
    recipe = load_cofe_recipe("cofe_wan21_i2v_14b_480p")
    assert recipe.mode == "i2v" and recipe.transformer.config["in_channels"] == 36
    p = plan(recipe, 8)
    counts = p.params
    assert counts["image_encoder"] == counts["semantic"] > 6e8  # Wan's CLIP ViT-H/14, beside the semantic expert
    assert p.bytes["experts"] == 2 * (counts["identity"] + counts["semantic"] + counts["detail"]
                                      + counts["image_encoder"])
    t2v = plan(load_cofe_recipe("cofe_wan21_14b_fsdp"), 8).params
    assert counts["transformer"] > t2v["transformer"] and t2v["image_encoder"] == 0  # I2V adds the image path
    print(f"\ni2v 14B: transformer {counts['transformer']:,}, trained {counts['trainable']:,}, "
          f"{p.total / GiB:.1f} GiB per GPU on 8")
    run = CliRunner().invoke(app, ["train", "--recipe", "cofe_wan21_i2v_14b_480p", "--plan", "--gpus", "8"])
    assert run.exit_code == 0 and "fits a 80 GiB GPU (" in run.output, run.output
