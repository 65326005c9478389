"""Recipes round-trip through JSON and YAML; presets and ignore patterns."""
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
