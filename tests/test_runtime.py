"""lowbit.runtime: Session, generation with the KV cache, sampling, checksums, CLI, and
no torch at run time."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("onnxscript")

import tiny_exports  # noqa: E402
from lowbit.runtime import ManifestError, Session, select_token  # noqa: E402
from lowbit.runtime.cli import main as run_main  # noqa: E402


@pytest.fixture(scope="module")
def artifact():
    """(compiled model, export folder): tiny Llama, W2A16, byte-level tokenizer, EOS id 10."""
    return tiny_exports.w2a16()


def _torch_greedy(q, ids, n, eos=None):
    with torch.no_grad():
        out = q.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_session_loads_manifest_and_tokenizer(artifact):
    _, d = artifact
    s = Session(d, threads=2)
    assert s.providers[-1] == "CPUExecutionProvider"
    assert s.session_config["session.qdq_matmulnbits_accuracy_level"] == "0"
    assert s.num_layers == 2 and s.num_kv_heads == 2 and s.head_dim == 16
    assert s.eos_token_ids == {10}
    ids = s.encode("Hi é")
    assert ids == list(tiny_exports.byte_tokenizer().encode("Hi é").ids) and len(ids) == 5  # é is two bytes
    assert s.decode(s.encode("Hi é")) == "Hi é"


def test_greedy_text_generation_matches_pytorch(artifact):
    q, d = artifact
    s = Session(d, threads=2)
    g = s.generate("The quick brown fox", max_new_tokens=20, stop_at_eos=False)
    assert g.prompt_ids == s.encode("The quick brown fox")
    assert g.token_ids == _torch_greedy(q, g.prompt_ids, 20)
    assert g.finish_reason == "length" and len(g.decode_seconds) == 19
    assert g.text == s.decode(g.token_ids)


def test_stops_at_eos_like_pytorch(artifact):
    q, d = artifact
    s = Session(d, threads=2)
    prompt = s.encode("The quick brown fox")
    ref = _torch_greedy(q, prompt, 20, eos=None)
    eos = ref[5]  # a token the greedy path produces: declare it EOS
    s.eos_token_ids = {eos}
    g = s.generate(prompt, max_new_tokens=20)
    assert g.token_ids == _torch_greedy(q, prompt, 20, eos=eos) == ref[:ref.index(eos) + 1]
    assert g.finish_reason == "eos"


def test_streaming_pieces_and_callback(artifact):
    _, d = artifact
    s = Session(d, threads=2)
    pieces = list(s.stream("abc", max_new_tokens=16, stop_at_eos=False))
    calls = []
    g = s.generate("abc", max_new_tokens=16, stop_at_eos=False, on_token=lambda t, p: calls.append((t, p)))
    assert "".join(pieces) == "".join(p for _, p in calls) == g.text
    assert [t for t, _ in calls if t is not None] == g.token_ids
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # a possibly incomplete character is held back


def test_sampling_is_seeded_and_filtered(artifact):
    _, d = artifact
    s = Session(d, threads=2)
    a = s.generate("x", max_new_tokens=8, temperature=1.0, seed=3, stop_at_eos=False).token_ids
    b = s.generate("x", max_new_tokens=8, temperature=1.0, seed=3, stop_at_eos=False).token_ids
    assert a == b
    greedy = s.generate("x", max_new_tokens=8, stop_at_eos=False).token_ids
    assert s.generate("x", max_new_tokens=8, temperature=0.7, top_k=1, seed=5, stop_at_eos=False).token_ids == greedy
    assert s.generate("x", max_new_tokens=8, temperature=2.0, top_p=1e-6, seed=5,
                      stop_at_eos=False).token_ids == greedy


def test_select_token_distribution():
    logits = np.array([2.0, 1.0, 0.5, 0.5, -1.0, 2.0])
    assert select_token(logits) == 0  # argmax: first of the ties, like torch.argmax
    rng = np.random.default_rng(0)
    draws = np.array([select_token(logits, 1.0, rng=rng) for _ in range(6000)])
    p = np.exp(logits) / np.exp(logits).sum()
    freq = np.bincount(draws, minlength=6) / len(draws)
    assert np.abs(freq - p).max() < 0.02
    # top-k 3 keeps the two 2.0 logits and the 1.0 one; top-p 0.6 keeps the two 2.0s
    draws = {select_token(logits, 1.0, top_k=3, rng=rng) for _ in range(300)}
    assert draws == {0, 1, 5}
    draws = {select_token(logits, 1.0, top_p=0.6, rng=rng) for _ in range(300)}
    assert draws == {0, 5}


def _copy(artifact_dir, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact_dir, dst)
    return dst


def test_checksums_are_verified(artifact, tmp_path):
    _, d = artifact
    bad = _copy(d, tmp_path)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        Session(bad)
    (bad / "model.onnx").write_bytes(bytes(data[:-10]))
    with pytest.raises(ManifestError, match="truncated"):
        Session(bad)
    (bad / "tokenizer.json").unlink()
    shutil.copy(d / "model.onnx", bad / "model.onnx")
    with pytest.raises(ManifestError, match="missing"):
        Session(bad)
    man = json.loads((d / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**man, "format": "lowbit"}))
    with pytest.raises(ManifestError, match="export it with lowbit.export_onnx"):
        Session(bad)
    (bad / "manifest.json").write_text(json.dumps({**man, "format_version": 99}))
    with pytest.raises(ManifestError, match="version"):
        Session(bad)


def test_cli_run_streams_text(artifact, capsys):
    _, d = artifact
    assert run_main([str(d), "--prompt", "The quick brown fox", "--max-new-tokens", "12", "--ignore-eos",
                     "--threads", "2"]) == 0
    out, err = capsys.readouterr()
    g = Session(d, threads=2).generate("The quick brown fox", max_new_tokens=12, stop_at_eos=False)
    assert out == g.text + "\n"
    assert "tok/s" in err
    assert run_main([str(d), "--ids", "1,2,3", "--max-new-tokens", "5", "--ignore-eos", "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["prompt_ids"] == [1, 2, 3] and len(res["token_ids"]) == 5
    assert run_main([str(d / "nope"), "--prompt", "x"]) == 2


_NO_TORCH = r"""
import sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
import lowbit.runtime
from lowbit.runtime import Session
from lowbit.cli import main  # the `lowbit` console script
s = Session(DIRECTORY, threads=1)
pieces = list(s.stream("The quick", max_new_tokens=6, stop_at_eos=False))
main(["run", DIRECTORY, "--prompt", "The quick", "--max-new-tokens", "3", "--quiet"])
assert "torch" not in sys.modules, "torch was imported"
print("NO_TORCH_OK", "".join(pieces) == s.generate("The quick", max_new_tokens=6, stop_at_eos=False).text)
"""


def test_runtime_runs_without_torch(artifact):
    """``import lowbit.runtime``, a Session, streaming and ``lowbit run`` in a fresh interpreter
    where importing torch fails: the runtime imports onnxruntime, numpy and tokenizers only."""
    _, d = artifact
    code = f"DIRECTORY = {str(d)!r}\n" + _NO_TORCH
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "NO_TORCH_OK True" in r.stdout


_EVAL_TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. "
              "Winston Smith, his chin nuzzled into his breast, slipped quickly through the glass doors.")


def test_perplexity_of_an_export_on_onnxruntime(artifact, tmp_path, capsys):
    """``lowbit.eval.perplexity`` and ``lowbit eval DIR`` score an ONNX export on onnxruntime: the
    same windows as the PyTorch model (same loss within float rounding), and a loss that a float64
    log-softmax of onnxruntime's own logits reproduces."""
    from lowbit.cli import main
    from lowbit.eval import perplexity, window_token_ids

    q, d = artifact
    s = Session(d, threads=2)
    windows, window_len = 3, 40
    got = perplexity(s, s.tokenizer, _EVAL_TEXT, windows=windows, window_len=window_len, progress=False)
    ref = perplexity(q, s.tokenizer, _EVAL_TEXT, windows=windows, window_len=window_len, progress=False)
    assert got["tokens"] == ref["tokens"] == windows * (window_len - 1)
    assert abs(got["loss"] - ref["loss"]) < 1e-4 * ref["loss"]

    ids = window_token_ids(s.tokenizer, _EVAL_TEXT, windows, window_len).numpy()
    assert ids[0].tolist() == s.tokenizer.encode(_EVAL_TEXT, add_special_tokens=False).ids[:window_len]
    nll = 0.0
    for row in ids:  # one window per graph call, float64 log-softmax
        logits = s.forward(row[None])[0][0, :-1].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((logz - logits[np.arange(window_len - 1), row[1:]]).sum())
    assert abs(got["loss"] - nll / ids[:, 1:].size) < 1e-5

    text = tmp_path / "eval.txt"
    text.write_text(_EVAL_TEXT)
    args = ["eval", str(d), "--text", str(text), "--windows", str(windows), "--window-len", str(window_len)]
    assert main(args + ["--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["loss"] == pytest.approx(got["loss"], rel=1e-6) and "ONNX" in res["model"]
    with pytest.raises(ValueError, match="without --recipe"):
        main(args + ["--recipe", "w2a16"])
    with pytest.raises(ValueError, match="cpu or cuda"):
        main(args + ["--device", "mps"])
    from lowbit.cli import console_main  # what the `lowbit` command runs: one error line, status 2

    assert console_main(args + ["--device", "mps"]) == 2
    assert "lowbit: error: --device mps" in capsys.readouterr().err
