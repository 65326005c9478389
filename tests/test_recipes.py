"""Recipes round-trip through JSON and YAML; presets and ignore patterns."""
from dataclasses import replace

import pytest

from lowbit.formats import QFormat
from lowbit.recipes import PRESETS, Recipe, get_recipe


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_roundtrip_json_and_yaml(name, tmp_path):
    r = get_recipe(name)
    assert Recipe.from_json(r.to_json()) == r
    assert Recipe.from_yaml(r.to_yaml()) == r
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    assert get_recipe(str(p)) == r


def test_preset_formats():
    assert get_recipe("w2a2").weight == QFormat(2, "int", 16, "e4m3")
    assert get_recipe("w2a2").activation == QFormat(2, "int", 16, "e4m3")
    assert get_recipe("w4a16").activation is None
    assert get_recipe("w8a8").weight.bits == 8


def test_custom_recipe_with_passes_roundtrip():
    r = Recipe("mine", QFormat(3, "half", 32, "fp16"), None, passes=[{"name": "rotate", "seed": 3}],
               ignore=["lm_head", "model.layers.0.*"])
    back = Recipe.from_yaml(r.to_yaml())
    assert back == r and back.weight.grid == "half" and back.passes[0]["seed"] == 3


def test_ignore_patterns():
    r = get_recipe("w2a16")
    assert r.is_ignored("lm_head")
    assert not r.is_ignored("model.layers.0.mlp.down_proj")
    r2 = Recipe("x", QFormat(2), ignore=["*.mlp.*"])
    assert r2.is_ignored("model.layers.0.mlp.down_proj") and not r2.is_ignored("lm_head")


def test_bad_recipes():
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("w1a1")
    with pytest.raises(ValueError, match="unknown recipe fields"):
        Recipe.from_dict({"name": "x", "weight": {"bits": 2}, "wieght_method": "rtn"})
    with pytest.raises(ValueError, match="weight_method"):
        Recipe("x", QFormat(2), weight_method="magic")


def test_overrides_choose_formats_per_site_and_roundtrip():
    r = get_recipe("w2a16").with_override("lm_head", "w4a16").with_override(["*.down_proj", "*.o_proj"], "w4a4")
    w4 = get_recipe("w4a16").weight
    assert r.formats_for("lm_head") == (w4, None)  # an override beats the default ignore list
    assert r.formats_for("model.layers.3.mlp.down_proj") == (w4, get_recipe("w4a4").activation)
    assert r.formats_for("model.layers.3.mlp.up_proj") == (r.weight, None)
    assert r.formats_for("score") is None  # still ignored
    for back in (Recipe.from_json(r.to_json()), Recipe.from_yaml(r.to_yaml())):
        assert back == r and back.overrides[1]["sites"] == ["*.down_proj", "*.o_proj"]
    first = Recipe("x", QFormat(2), overrides=[{"sites": "*.q_proj", "weight": {"bits": 3}},
                                               {"sites": ["*"], "weight": {"bits": 8}}])
    assert first.formats_for("a.q_proj")[0].bits == 3 and first.formats_for("a.k_proj")[0].bits == 8


def test_bad_overrides():
    with pytest.raises(ValueError, match="'sites' and 'weight'"):
        Recipe("x", QFormat(2), overrides=[{"sites": "lm_head"}])
    with pytest.raises(ValueError, match="unknown override fields"):
        Recipe("x", QFormat(2), overrides=[{"sites": "lm_head", "weight": {"bits": 4}, "grid": "int"}])
    with pytest.raises(ValueError, match="non-empty list"):
        Recipe("x", QFormat(2), overrides=[{"sites": [], "weight": {"bits": 4}}])


def test_w2a16_half_preset_puts_weights_on_the_symmetric_grid(tiny_llama, calib_ids):
    """``w2a16-half``: every dequantized weight is +-1/2 or +-3/2 times its group's effective
    scale (never 0, unlike the int grid's {-2, -1, 0, 1}), and a site computes x W^T with them."""
    import torch

    import lowbit
    from lowbit.quant_linear import QuantLinear

    qm = lowbit.compile_quantized(tiny_llama, "w2a16-half", calibration=calib_ids, progress=False)
    sites = [m for m in qm.modules() if isinstance(m, QuantLinear)]
    assert sites and all(m.weight_format == QFormat(2, "half", 16, "e4m3") for m in sites)
    site = sites[0]
    w = site.dequantized_weight().double()
    scale = (site.weight_scales.double() * float(site.weight_global)).repeat_interleave(16, dim=1)[:, :w.shape[1]]
    live = scale > 0
    ratio = w[live] / scale[live]
    levels = (2 * ratio).round() / 2
    assert set(levels.unique().tolist()) == {-1.5, -0.5, 0.5, 1.5}
    assert (ratio - levels).abs().max() < 1e-6   # fp32 rounding of the products, nothing more
    x = torch.randn(3, site.in_features, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(site(x).double(), x.double() @ w.T, rtol=1e-5, atol=1e-5)


def test_w2a2_half_preset_clips_activations_and_survives_save_load(tiny_llama, calib_ids, tmp_path):
    """``w2a2-half``: symmetric-grid weights and activations, the activations with a clip ratio
    that each site searches among the preset's candidates on calibration data (without data,
    the format's own). The activation codes are those of the clipped format written out in
    float64 (stored scales of clip 1, the global times clip), some elements clamp, and the
    artifact keeps every site's ratio (saved and loaded model give identical logits)."""
    import torch

    import lowbit
    from lowbit.quant_linear import QuantLinear

    recipe = lowbit.get_recipe("w2a2-half")
    clip = recipe.activation.clip
    assert recipe.weight == QFormat(2, "half") and recipe.activation.grid == "half" and clip < 1
    assert clip in recipe.act_clip_search
    qm = lowbit.compile_quantized(tiny_llama, recipe, calibration=calib_ids, progress=False)
    sites = [m for m in qm.modules() if isinstance(m, QuantLinear)]
    assert sites and all(replace(m.act_format, clip=clip) == recipe.activation for m in sites)
    assert all(m.act_format.clip in recipe.act_clip_search for m in sites)
    site_clips = [m.act_format.clip for m in sites]
    uncalibrated = lowbit.compile_quantized(tiny_llama, recipe, progress=False)
    assert all(m.act_format == recipe.activation for m in uncalibrated.modules() if isinstance(m, QuantLinear))
    x = torch.randn(4, sites[0].in_features, generator=torch.Generator().manual_seed(1)) * 2
    codes, stored, gscale = torch.ops.lowbit.quantize_act(x, 2, "half", 16, "e4m3", clip)
    _, stored1, gscale1 = torch.ops.lowbit.quantize_act(x, 2, "half", 16, "e4m3")
    assert torch.equal(stored.float(), stored1.float()) and torch.equal(gscale, gscale1 * clip)
    eff = (stored.double() * gscale.double()).repeat_interleave(16, -1)
    want = torch.floor(x.double() / eff).clamp(-2, 1)
    assert torch.equal(codes.double(), want) and (torch.floor(x.double() / eff) > 1).any()
    ids = calib_ids[:1]
    with torch.no_grad():
        before = qm(ids).logits
        lowbit.save(qm, tmp_path / "a")
        loaded = lowbit.load(tmp_path / "a")
        after = loaded(ids).logits
    assert torch.equal(before, after)
    assert [m.act_format.clip for m in loaded.modules() if isinstance(m, QuantLinear)] == site_clips
