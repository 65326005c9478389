"""compile_quantized on a model that lives on the GPU (skipped without CUDA).

Calibration inputs are collected on the CPU; the quantize pass and GPTQ must bring them to
the site's device. The compiled CUDA model must agree with the same recipe compiled on the
CPU (same codes up to float-rounding ties, so outputs compared loosely).
"""
import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import lowbit  # noqa: E402


@pytest.mark.parametrize("recipe", ["w4a16", "w4a16-gptq", "w4a4", "rotate+w4a16-gptq"])
def test_compile_on_cuda_matches_cpu(tiny_llama, calib_ids, recipe):
    rotate = recipe.startswith("rotate+")
    recipe = recipe.removeprefix("rotate+")
    r = lowbit.get_recipe(recipe.removesuffix("-gptq"))
    if rotate:  # the rotation matrices must follow the weights onto the GPU
        r = r.with_passes({"name": "rotate"})
    if recipe.endswith("-gptq"):
        r = r.with_gptq()
    ids = calib_ids[:1]
    q_cpu = lowbit.compile_quantized(tiny_llama, r, calibration=calib_ids, progress=False)
    model_gpu = copy.deepcopy(tiny_llama).cuda()
    q_gpu = lowbit.compile_quantized(model_gpu, r, calibration=calib_ids, progress=False, backend="reference")
    with torch.no_grad():
        ref = q_cpu(ids).logits.double()
        out = q_gpu(ids.cuda()).logits.double().cpu()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 5e-2, rel
    errs = [s["rel_error"] for s in q_gpu.lowbit_report.sites.values() if "rel_error" in s]
    assert errs and all(e < 1.0 for e in errs)
