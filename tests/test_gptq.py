"""GPTQ, calibration data and the HTML report."""
import math

import pytest
import torch

import lowbit
from lowbit import calibration
from lowbit.formats import QFormat, quantize_codes, quantize_weight_rtn
from lowbit.passes.gptq import gptq_quantize, hessian, layer_output_error


def _correlated_inputs(n=1024, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(n, k, generator=g) @ mix + 0.05 * torch.randn(n, k, generator=g)
    x[:, 3] *= 10  # an outlier channel
    return x


@pytest.mark.parametrize("fmt", [QFormat(2), QFormat(3), QFormat(4), QFormat(2, "half"), QFormat(3, "half"),
                                 QFormat(4, "int", 32, "fp16")])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_output_error(fmt, act_order):
    x = _correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    qt = gptq_quantize(w, hessian(x), fmt, act_order=act_order)
    rtn = quantize_weight_rtn(w, fmt)
    # codes are exactly the format's rounding of the stored values: an ordinary QTensor
    assert torch.equal(quantize_codes(qt.dequantize(), qt.eff_scales(), fmt), qt.codes)
    assert qt.codes.min() >= fmt.qmin and qt.codes.max() <= fmt.qmax
    assert layer_output_error(w, qt, x) < 0.85 * layer_output_error(w, rtn, x)


def test_gptq_objective_matches_float64_definition():
    """The output error computed from the Hessian equals the direct float64 computation."""
    x = _correlated_inputs(512, 64)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    qt = gptq_quantize(w, hessian(x), QFormat(3))
    d = (w.double() - qt.dequantize().double())
    via_h = torch.einsum("nk,kl,nl->", d, hessian(x), d).item()
    direct = ((x.double() @ d.T) ** 2).sum().item() / x.shape[0]
    assert math.isclose(via_h, direct, rel_tol=1e-9)


def test_dead_columns_and_padding():
    x = _correlated_inputs(256, 64)
    x[:, 10] = 0  # never excited
    w = torch.randn(8, 64)
    qt = gptq_quantize(w, hessian(x), QFormat(4))
    assert torch.all(qt.codes[:, 10] == 0)


def test_compile_with_gptq_on_generated_calibration(tiny_llama):
    calib = calibration.from_generations(tiny_llama, samples=4, seq_len=32, seed=0, progress=False)
    again = calibration.from_generations(tiny_llama, samples=4, seq_len=32, seed=0, progress=False)
    assert calib.shape == (4, 32) and torch.equal(calib, again)
    rtn = lowbit.compile_quantized(tiny_llama, "w3a16", calibration=calib, progress=False)
    gq = lowbit.compile_quantized(tiny_llama, lowbit.get_recipe("w3a16").with_gptq(), calibration=calib,
                                  progress=False)
    site = "model.layers.1.mlp.down_proj"
    assert gq.lowbit_report.sites[site]["method"] == "gptq"
    mean = lambda q: sum(s["rel_error"] for s in q.lowbit_report.sites.values()) / len(q.lowbit_report.sites)
    assert mean(gq) < mean(rtn)


def test_gptq_without_calibration_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="GPTQ needs calibration"):
        lowbit.compile_quantized(tiny_llama, lowbit.get_recipe("w4a16").with_gptq(), progress=False)


def test_calibration_from_text_is_seeded(tmp_path):
    from lowbit.llama2c import Llama2cTokenizer, shared_data_dir

    d = shared_data_dir()
    if d is None:
        pytest.skip("shared data folder (../shared/data) is absent")
    tok = Llama2cTokenizer(d / "stories260K" / "tok512.bin")
    text_path = d / "text" / "tinystories_val_head.txt"
    a = calibration.from_text(tok, text_path, samples=3, seq_len=64, seed=1)
    head = text_path.read_text()[:20000]
    b = calibration.from_text(tok, head, samples=3, seq_len=64, seed=1)
    c = calibration.from_text(tok, head, samples=3, seq_len=64, seed=2)
    assert a.shape == (3, 64) and torch.equal(b, calibration.from_text(tok, head, samples=3, seq_len=64, seed=1))
    assert not torch.equal(b, c)
    text = tok.decode(a[0].tolist())
    assert text.strip() and text.strip()[:20] in (d / "text" / "tinystories_val_head.txt").read_text()


def test_html_report_has_plots_and_sites(tiny_llama, calib_ids, tmp_path):
    from lowbit.report_html import write_report

    recipe = lowbit.get_recipe("w2a2").with_passes({"name": "rotate"}, {"name": "split_outliers"})
    q = lowbit.compile_quantized(tiny_llama, recipe, calibration=calib_ids, progress=False)
    site = q.lowbit_report.sites["model.layers.0.mlp.down_proj"]
    assert len(site["act_absmax_float"]) == 128 and len(site["act_absmax"]) == 144  # before / after the split
    lowbit.save(q, tmp_path / "a")
    out = write_report(tmp_path / "a")
    page = out.read_text()
    assert page.count("data:image/png;base64,") >= 4  # error, blocks, outlier ratio, channel detail
    assert "model.layers.1.self_attn.v_proj" in page and "split_outliers" in page


def test_calibration_runs_block_by_block(tiny_llama, calib_ids, monkeypatch):
    """The quantize pass asks for one block's activations at a time (bounded memory)."""
    requests = []
    from lowbit.pass_manager import SequentialCalibration

    original = SequentialCalibration.collect

    def spy(self, nodes):
        nodes = list(nodes)
        requests.append(nodes)
        return original(self, nodes)

    monkeypatch.setattr(SequentialCalibration, "collect", spy)
    q = lowbit.compile_quantized(tiny_llama, lowbit.get_recipe("w4a16").with_gptq(), calibration=calib_ids,
                                 progress=False)
    assert len(requests) == 2  # two decoder blocks; lm_head is ignored
    assert all(len(r) == 7 for r in requests)  # q, k, v, o, gate, up, down
    assert all(s["method"] == "gptq" for s in q.lowbit_report.sites.values())


def test_sites_reading_one_activation_share_inputs_and_one_hessian(tiny_llama, calib_ids, monkeypatch):
    """q/k/v (and gate/up) get one inputs tensor from the calibration, and GPTQ builds its
    Hessian once for them: 4 Hessians per block (qkv, o, gate/up, down), not 7."""
    from lowbit.pass_manager import SequentialCalibration
    from lowbit.passes import gptq

    shared = []
    original = SequentialCalibration.collect

    def spy(self, nodes):
        got = original(self, list(nodes))
        shared.append((len(got), len({id(v) for v in got.values()})))
        return got

    built = []
    real_hessian = gptq.hessian
    monkeypatch.setattr(SequentialCalibration, "collect", spy)
    monkeypatch.setattr(gptq, "hessian", lambda x: built.append(x.shape) or real_hessian(x))
    lowbit.compile_quantized(tiny_llama, lowbit.get_recipe("w4a16").with_gptq(), calibration=calib_ids,
                             progress=False)
    assert shared == [(7, 4), (7, 4)]  # 7 sites, 4 distinct inputs per block
    assert len(built) == 2 * 4
