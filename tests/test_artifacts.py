"""lowbit.save / lowbit.load: safetensors + manifest, no pickle, clear errors."""
import json
import pickle

import pytest
import torch

import lowbit
from lowbit import ArtifactError, QuantLinear, compile_quantized


@pytest.fixture
def saved(tiny_llama, calib_ids, tmp_path):
    q = compile_quantized(tiny_llama, "w2a2", calibration=calib_ids, progress=False)
    lowbit.save(q, tmp_path / "art")
    return q, tmp_path / "art"


def test_roundtrip_is_exact_and_never_unpickles(saved, monkeypatch):
    q, d = saved

    def forbidden(*a, **k):
        raise AssertionError("artifact loading must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = lowbit.load(d)
    ids = torch.randint(0, 256, (1, 13))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
    names = {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert names == {n for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert loaded.lowbit_recipe == q.lowbit_recipe
    assert loaded.model.layers[0].mlp.down_proj.weight_scales.dtype == torch.float8_e4m3fn
    man = json.loads((d / "manifest.json").read_text())
    assert man["format"] == "lowbit" and len(man["files"]["model.safetensors"]["sha256"]) == 64


def test_corrupted_file_is_rejected(saved):
    _, d = saved
    p = d / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        lowbit.load(d)


def test_truncated_file_is_rejected(saved):
    _, d = saved
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="truncated"):
        lowbit.load(d)


def test_version_mismatch_and_bad_manifest(saved):
    _, d = saved
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="version 99"):
        lowbit.load(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        lowbit.load(d)


def test_missing_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        lowbit.load(tmp_path)
