"""The lowbit console script, end to end on stories260K (skips without the shared data)."""
import json

import pytest

from lowbit.cli import main
from lowbit.llama2c import shared_data_dir


@pytest.fixture
def data():
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared data folder (../shared/data) is absent")
    return d


def test_compile_then_eval_artifact(data, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compile", "stories260k", "--recipe", "w4a16", "--out", str(out), "--quiet",
                 "--calib-samples", "2", "--calib-len", "64"]) == 0
    printed = capsys.readouterr().out
    assert "bits per weight on average" in printed and "model.layers.0.self_attn.q_proj" in printed
    assert (out / "manifest.json").is_file() and json.loads((out / "report.json").read_text())["sites"]
    text = str(data / "text" / "tinystories_val_head.txt")
    assert main(["eval", str(out), "--text", text, "--windows", "2", "--window-len", "256", "--json", "--quiet"]) == 0
    q = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "stories260k", "--text", text, "--windows", "2", "--window-len", "256", "--json", "--quiet"]) == 0
    f = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 4-bit weights cost a little perplexity, not much
    assert f["perplexity"] < q["perplexity"] < f["perplexity"] * 1.3


def test_unknown_recipe_is_a_clear_error(data):
    with pytest.raises(ValueError, match="unknown recipe"):
        main(["compile", "stories260k", "--recipe", "w1a1", "--quiet"])


def test_compile_with_an_override(data, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compile", "stories260k", "--recipe", "w2a16", "--override", "lm_head=w4a16", "--out", str(out),
                 "--quiet", "--calib-samples", "2", "--calib-len", "64"]) == 0
    sites = json.loads((out / "report.json").read_text())["sites"]
    assert sites["lm_head"]["format"] == "int4_g16_e4m3"
    assert sites["model.layers.0.mlp.up_proj"]["format"] == "int2_g16_e4m3"
    with pytest.raises(ValueError, match="PATTERN=PRESET"):
        main(["compile", "stories260k", "--override", "lm_head", "--quiet"])


def test_console_script_reports_input_errors_in_one_line(tmp_path, capsys, monkeypatch):
    """The installed ``lowbit`` command (``console_main``): a missing model and a damaged artifact
    end with one ``lowbit: error:`` line and status 2, not a traceback; ``LOWBIT_TRACEBACK=1``
    lets the exception through."""
    from lowbit.cli import console_main

    monkeypatch.delenv("LOWBIT_TRACEBACK", raising=False)
    missing = tmp_path / "no_such_model"
    assert console_main(["eval", str(missing), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lowbit: error:") and str(missing) in err[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")
    assert console_main(["eval", str(broken), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("lowbit: error:")
    monkeypatch.setenv("LOWBIT_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        console_main(["eval", str(missing), "--quiet"])


def test_train_refuses_values_out_of_range(data, tmp_path, capsys):
    """``lowbit train`` with a value out of range stops before it trains (a negative rate trained)."""
    from lowbit.cli import console_main

    for flag, value, word in (("--lr", "-1", "lr"), ("--warmup", "1.5", "warmup"), ("--batch-size", "0", "batch_size"),
                              ("--e2e-steps", "-3", "e2e_steps"), ("--grad-clip", "nan", "grad_clip"),
                              ("--e2e-steps", "30,40", "2 values for 1 stages"), ("--lr", "1e-3,-1", "lr")):
        assert console_main(["train", "stories260k", "--out", str(tmp_path / "run"), "--quiet", flag, value]) == 2, flag
        err = capsys.readouterr().err
        assert err.startswith("lowbit: error:") and word in err, (flag, err)
    assert not (tmp_path / "run" / "manifest.json").exists()
