"""Evaluation sets and the comparison with the original: KL, top-1 agreement, both schedules, bad input."""

import json
import math

import pytest
import torch

from helpers import SMALL, compose, run_calibrate, user_message
from nvfp4cal.evaluation.compare import Comparison
from nvfp4cal.evaluation.report import eval_lines, worse_than_max


def test_the_original_against_itself():
    logits = torch.randn(2, 9, 50, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 50, (2, 9))
    c = Comparison()
    c.add(logits, logits.clone(), ids)
    r = c.result()
    assert r["kl_mean"] == 0.0 and r["kl_p99"] == 0.0 and r["top1_agreement"] == 1.0 and r["rms_delta_p"] == 0.0
    assert r["perplexity"]["original"] == r["perplexity"]["quantized"] and r["tokens"] == 16


def test_kl_is_the_definition():
    p_logits, q_logits = torch.randn(1, 3, 7), torch.randn(1, 3, 7)
    c = Comparison()
    c.add(p_logits, q_logits, torch.zeros(1, 3, dtype=torch.long))
    lp, lq = torch.log_softmax(p_logits[0, :2].double(), -1), torch.log_softmax(q_logits[0, :2].double(), -1)
    want = (lp.exp() * (lp - lq)).sum(-1).mean()
    assert c.result(max_calibrated=None)["kl_mean"] == pytest.approx(float(want), rel=1e-5)
    r = c.result(max_calibrated=math.exp(-float(lp[:, 0].mean())) * 2)
    assert r["perplexity"]["max_calibrated"] > r["perplexity"]["original"] and "share_of_max_increase_removed" in r


def test_chunked_comparison_equals_one_pass(monkeypatch):
    import nvfp4cal.evaluation.compare as compare

    g = torch.Generator().manual_seed(1)
    p_logits, ids = torch.randn(3, 11, 40, generator=g), torch.randint(0, 40, (3, 11), generator=g)
    q_logits = p_logits + 0.5 * torch.randn(3, 11, 40, generator=g)
    results = []
    for chunk in (4, 1000):  # 30 positions: eight chunks, then one
        monkeypatch.setattr(compare, "CHUNK", chunk)
        c = Comparison()
        c.add(p_logits, q_logits, ids)
        results.append(c.result())
    a, b = results
    assert a["tokens"] == b["tokens"] == 30 and a["top1_agreement"] == b["top1_agreement"]
    for key in ("kl_mean", "kl_median", "kl_p99", "rms_delta_p"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-12)
    lp, lq = torch.log_softmax(p_logits[:, :-1].double(), -1), torch.log_softmax(q_logits[:, :-1].double(), -1)
    assert a["kl_mean"] == pytest.approx(float((lp.exp() * (lp - lq)).sum(-1).mean()), rel=1e-5)


def test_worse_than_max_is_said_only_when_it_is():
    ev = {"corpus": {"perplexity": {"original": 10.0, "max_calibrated": 12.0, "quantized": 11.0}},
          "code": {"perplexity": {"original": 5.0, "max_calibrated": 6.0, "quantized": 6.5}}}  # fmt: skip
    lines = worse_than_max({"recipe": "r", "evaluation": ev})
    assert lines == ["r is worse than max calibration on code: perplexity 6.500 > 6.000"]
    ev["code"]["perplexity"]["quantized"] = 5.5
    assert worse_than_max({"recipe": "r", "evaluation": ev}) == []


def test_worse_than_max_says_how_far_outside_the_noise():
    ev = {"code": {"perplexity": {"original": 5.0, "max_calibrated": 6.0, "quantized": 6.03},
                   "vs_max": {"mean_nll_difference": math.log(6.03 / 6.0), "standard_error": 0.01}}}  # fmt: skip
    (line,) = worse_than_max({"recipe": "r", "evaluation": ev})
    assert line.endswith("6.030 > 6.000 (0.5 standard errors of the per-token difference: within noise)")
    ev["code"]["vs_max"]["standard_error"] = 0.001
    (line,) = worse_than_max({"recipe": "r", "evaluation": ev})
    assert line.endswith("(5.0 standard errors of the per-token difference)")


def test_the_paired_difference_against_max_is_per_token():
    g = torch.Generator().manual_seed(2)
    p_logits, q_logits = torch.randn(2, 12, 30, generator=g), torch.randn(2, 12, 30, generator=g)
    ids = torch.randint(0, 30, (2, 12), generator=g)
    c = Comparison()
    c.add(p_logits, q_logits, ids)
    lq = torch.log_softmax(q_logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1).reshape(-1)
    max_nll = -lq.float() - torch.linspace(-0.5, 1.0, 22)  # max better on some tokens, worse on others
    r = c.result(math.exp(float(max_nll.double().mean())), max_nll)
    d = -lq - max_nll.double()
    assert r["vs_max"]["mean_nll_difference"] == pytest.approx(float(d.mean()), abs=1e-6)
    assert r["vs_max"]["mean_nll_difference"] == pytest.approx(
        math.log(r["perplexity"]["quantized"] / r["perplexity"]["max_calibrated"]), abs=1e-6
    )
    assert r["vs_max"]["standard_error"] == pytest.approx(float(d.std() / math.sqrt(22)), rel=1e-5)
    ppl = r["perplexity"]
    assert ppl["max_calibrated"] > ppl["original"]  # so the share removed and its standard error exist
    want = ppl["quantized"] * r["vs_max"]["standard_error"] / (ppl["max_calibrated"] - ppl["original"])
    assert r["share_removed_standard_error"] == pytest.approx(want, rel=1e-9)
    assert "vs_max" not in c.result(6.0, max_nll[:-1])  # other tokens: no pairing


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3_moe"])
def test_both_schedules_report_the_same_figures(tmp_path, model):
    args = [f"model={model}", "recipe=nvfp4_max", *SMALL, "+model.init=per_param", "eval.sets.code.rows=2",
            "eval.sets.code.seq_len=32"]  # fmt: skip
    whole = run_calibrate(tmp_path / "whole", args).report["evaluation"]
    lw = run_calibrate(tmp_path / "lw", [*args, "calibration=layerwise"]).report["evaluation"]
    assert set(whole) == set(lw) == {"corpus", "code"}
    for name in whole:
        for key in ("kl_mean", "kl_p99", "top1_agreement", "rms_delta_p"):
            assert lw[name][key] == pytest.approx(whole[name][key], rel=1e-4, abs=1e-7), (name, key)
        for k, v in whole[name]["perplexity"].items():
            assert lw[name]["perplexity"][k] == pytest.approx(v, rel=1e-5), (name, k)


def test_an_evaluation_set_from_files(tmp_path):
    for i in range(2):
        (tmp_path / f"part{i}.jsonl").write_text(
            "".join(json.dumps({"text": f"row {i} {j} " * 20}) + "\n" for j in range(20))
        )
    spec = f"{{source: {{_target_: nvfp4cal.texts.local_texts, path: '{tmp_path}/part*.jsonl'}}, rows: 3, seq_len: 16}}"
    res = run_calibrate(tmp_path, ["model=tiny_llama", "recipe=nvfp4_max", *SMALL, f"+eval.sets.files={spec}"])
    ev = res.report["evaluation"]
    assert set(ev) == {"corpus", "code", "files"} and ev["files"]["tokens"] == 3 * 15


def test_bad_evaluation_input_is_one_line(tmp_path):
    missing = "{source: {_target_: nvfp4cal.texts.local_texts, path: /no/such/eval.txt}, rows: 2, seq_len: 16}"
    # the model path does not exist either: the evaluation file is checked first
    assert "matches no file" in user_message(tmp_path, ["model=hf", "model.path=/no/such", f"+eval.sets.x={missing}"])
    (tmp_path / "short.txt").write_text("a few words\n")
    short = f"{{source: {{_target_: nvfp4cal.texts.local_texts, path: {tmp_path}/short.txt}}, rows: 2, seq_len: 512}}"
    assert "eval.sets.x holds fewer than seq_len=512 tokens" in user_message(
        tmp_path, ["model=tiny_llama", "recipe=nvfp4_max", *SMALL, f"+eval.sets.x={short}"]
    )
    assert "rows must be >= 1" in user_message(tmp_path, ["model=tiny_llama", "eval.sets.code.rows=0"])


def _original_dir(tmp_path):
    """A tiny model saved as a Hugging Face directory (weights, config, tokenizer): an "original"."""
    from hydra.utils import instantiate

    loaded = instantiate(compose(["model=tiny_llama"]).model, _convert_="all")
    out = tmp_path / "original"
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out


def test_the_evaluate_command_scores_both_layouts_alike(tmp_path, capsys):
    from nvfp4cal.cli.evaluate import main

    orig = _original_dir(tmp_path)
    data = ["data.num_samples=6", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2",
            "eval.sets.code.rows=2", "eval.sets.code.seq_len=32"]  # fmt: skip
    res = run_calibrate(tmp_path, ["model=hf", f"model.path={orig}", "recipe=nvfp4_mse", "export.format=both", *data])
    figures = {}
    for layout in ("modelopt", "compressed_tensors"):
        rc = main([str(tmp_path / "ckpt" / layout), f"original={orig}", f"report={tmp_path / layout}", *data])
        assert rc == 0
        figures[layout] = json.loads((tmp_path / layout / "report.json").read_text())["evaluation"]
        assert (tmp_path / layout / "report.md").read_text().count("| corpus |") == 1
    assert "eval code" in capsys.readouterr().out
    a, b = figures["modelopt"], figures["compressed_tensors"]
    for name in ("corpus", "code"):
        for k in ("original", "quantized"):
            assert a[name]["perplexity"][k] == pytest.approx(b[name]["perplexity"][k], rel=1e-4)
        assert a[name]["kl_mean"] == pytest.approx(b[name]["kl_mean"], rel=1e-2, abs=1e-6)
    run_ppl = res.report["evaluation"]["corpus"]["perplexity"]  # the run's own figures, same rows
    assert a["corpus"]["perplexity"]["original"] == pytest.approx(run_ppl["original"], rel=1e-5)
    assert a["corpus"]["perplexity"]["quantized"] == pytest.approx(run_ppl["quantized"], rel=1e-3)


def test_the_evaluate_command_pairs_two_checkpoints_token_by_token(tmp_path, capsys):
    """``baseline=``: a second checkpoint's losses on the same tokens; the mean difference is the log of the
    two perplexities' ratio, zero with a standard error of zero against itself."""
    from nvfp4cal.cli.evaluate import main

    orig = _original_dir(tmp_path)
    data = ["data.num_samples=6", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2",
            "eval.sets.code.rows=2", "eval.sets.code.seq_len=32"]  # fmt: skip
    for recipe in ("nvfp4_max", "nvfp4_imatrix_mse"):
        run_calibrate(tmp_path / recipe, ["model=hf", f"model.path={orig}", f"recipe={recipe}", *data])
    a, b = (tmp_path / r / "ckpt" for r in ("nvfp4_imatrix_mse", "nvfp4_max"))
    reports = {}
    for name, argv in (("alone", [str(b)]), ("paired", [str(a), f"baseline={b}"]), ("self", [str(a), f"baseline={a}"])):
        assert main([*argv, f"original={orig}", f"report={tmp_path / name}", *data]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())["evaluation"]
    out = capsys.readouterr().out
    assert "vs base code  : perplexity x1.0000 (log +0.0000 +- 0.0000: within noise)" in out
    for name in ("corpus", "code"):
        vs, ppl = reports["paired"][name]["vs_baseline"], reports["paired"][name]["perplexity"]["quantized"]
        want = math.log(ppl / reports["alone"][name]["perplexity"]["quantized"])
        assert vs["mean_nll_difference"] == pytest.approx(want, abs=1e-6) and vs["mean_nll_difference"] != 0
        assert vs["standard_error"] > 0
        assert reports["self"][name]["vs_baseline"] == {"mean_nll_difference": 0.0, "standard_error": 0.0}
    assert "vs_baseline" not in reports["alone"]["corpus"]
    assert "Against the baseline" in (tmp_path / "paired" / "report.md").read_text()


def test_the_evaluate_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    from nvfp4cal.cli.evaluate import main

    orig = _original_dir(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    cases = [
        ([str(tmp_path / "none"), f"original={orig}"], "is not a directory"),
        ([str(orig), "original=/no/such"], "original=/no/such is not a directory"),
        ([str(orig)], "original=MODEL_DIR is required"),
        ([str(orig), f"original={orig}", "eval=nonexistent"], "eval=nonexistent: no such option"),
    ]
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["X"], "vocab_size": 7}))
    cases.append(([str(other), f"original={orig}"], "does not match"))
    cases.append(([str(orig), f"original={orig}", f"baseline={tmp_path / 'none'}"], "baseline="))
    cases.append(([str(orig), f"original={orig}", f"baseline={other}"], "does not match"))
    for argv, message in cases:
        assert main(argv) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and message in err[0], err


def test_a_run_pairs_its_tokens_with_max(tmp_path):
    """The run keeps max calibration's per-token losses and compares the quantized model with them on the same
    tokens: the mean difference is log(ppl_quantized / ppl_max) on every set."""
    res = run_calibrate(tmp_path, ["model=tiny_llama", "recipe=nvfp4_mse", *SMALL, "eval.sets.code.rows=2",
                                   "eval.sets.code.seq_len=32"])  # fmt: skip
    ev = res.report["evaluation"]
    assert set(ev) == {"corpus", "code"}
    for e in ev.values():
        ppl = e["perplexity"]
        assert e["vs_max"]["mean_nll_difference"] == pytest.approx(
            math.log(ppl["quantized"] / ppl["max_calibrated"]), abs=1e-6
        )
        assert e["vs_max"]["standard_error"] > 0
    lines = [ln for ln in eval_lines(res.report) if "increase removed" in ln]
    assert lines and all(" +- " in ln for ln in lines), lines
