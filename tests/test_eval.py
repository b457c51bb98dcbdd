"""Evaluation: extractors and metrics by hand, the paired bootstrap, base vs tuned on a tiny model,
the end-of-run evaluation and `strop eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import strop.recipes.sft as recipe
from conftest import ALPACA_ROWS, tiny_config, write_jsonl
from strop.cli.main import main
from strop.core.config import EvalConfig
from strop.core.errors import ConfigError
from strop.data.formats import Record
from strop.data.template import CHATML, ChatTemplate
from strop.eval.bootstrap import paired_bootstrap
from strop.eval.examples import EvalExample, eval_examples, pick_shots, with_shots
from strop.eval.extract import get_extractor, gsm8k, last_number, normalize_number
from strop.eval.metrics import build_metrics, macro_f1
from strop.eval.suite import adapter_disabled, run_suite
from strop.models.load import load_causal_lm, load_tokenizer
from strop.models.trainable import apply_lora

# -- extraction and metrics ------------------------------------------------------------------------


def test_extractors():
    assert gsm8k("48/2 = 24\n#### 1,200") == "1200"
    assert gsm8k("so the answer is 72") is None  # strict: only the #### line counts
    assert last_number("3 apples at $2.50 cost $7.50.") == "7.5"
    assert last_number("no digits here") is None
    assert normalize_number("$1,200.00") == "1200" and normalize_number("-0.0") == "0"
    assert get_extractor(r"regex:answer: (\w+)")("answer: yes ... answer: no") == "no"
    with pytest.raises(ConfigError, match="eval.extract"):
        get_extractor("gsm9k")
    with pytest.raises(ConfigError, match="invalid regular expression"):
        get_extractor("regex:(")


def test_metrics_by_hand():
    em, contains, rouge, bleu = build_metrics(["exact_match", "contains", "rouge_l", "bleu"], None)
    assert (
        em.score(["The cat.", "a dog"], ["the cat", "a cat"]) == 0.5
    )  # case and end punctuation do not count
    assert contains.score(["I think it is Paris, France"], ["paris"]) == 1.0
    assert rouge.score(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # ROUGE-L F1 of "the cat" vs "the cat sat": LCS 2, precision 1, recall 2/3 -> 0.8
    assert rouge.score(["the cat"], ["the cat sat"]) == pytest.approx(0.8)
    assert bleu.score(["the quick brown fox jumps"], ["the quick brown fox jumps"]) == pytest.approx(100.0)
    (gsm,) = build_metrics(["exact_match"], gsm8k)
    assert gsm.score(["so 24 + 48 = 72\n#### 72", "#### 71"], ["#### 72", "#### 72"]) == 0.5
    (flexible,) = build_metrics(["exact_match"], last_number)
    assert flexible.score(["They sold 72 clips."], ["48 + 24 = 72\n#### 72"]) == 1.0


def test_macro_f1_by_hand():
    # label a: tp 1, fn 1 -> F1 2/3; label b: tp 2, fp 1 -> F1 4/5
    assert macro_f1(["a", "b", "b", "b"], ["a", "a", "b", "b"]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    (m,) = build_metrics(["macro_f1"], None)
    assert m.score(["A", "b", "B.", "b"], ["a", "a", "b", "b"]) == pytest.approx((2 / 3 + 4 / 5) / 2)


def half_length(prediction: str, reference: str) -> float:  # a custom metric, imported by name below
    return float(len(prediction) * 2 == len(reference))


def test_custom_metric_and_unknown_metric():
    (m,) = build_metrics(["test_eval:half_length"], None)
    assert m.score(["ab", "abc"], ["abcd", "abcd"]) == 0.5
    with pytest.raises(ConfigError, match="eval.metrics: cannot import"):
        build_metrics(["test_eval:nope"], None)
    with pytest.raises(ConfigError, match="eval.metrics: unknown metric 'acc'"):
        build_metrics(["acc"], None)


# -- paired bootstrap ------------------------------------------------------------------------------


def test_paired_bootstrap_against_a_direct_resampling():
    (em,) = build_metrics(["exact_match"], None)
    refs = [str(i % 3) for i in range(40)]
    a = [r if i % 2 else "x" for i, r in enumerate(refs)]  # right on odd examples: 0.5
    b = [r if i % 5 else "x" for i, r in enumerate(refs)]  # right unless i % 5 == 0: 0.8
    out = paired_bootstrap(em, refs, a, b, resamples=500, seed=3)
    assert out["diff"] == pytest.approx(0.3)
    # the same resamples, drawn and scored naively
    draws = np.random.default_rng(3).integers(0, 40, size=(500, 40))
    naive = [
        em.score([b[i] for i in d], [refs[i] for i in d]) - em.score([a[i] for i in d], [refs[i] for i in d])
        for d in draws
    ]
    assert out["ci"] == pytest.approx(list(np.quantile(naive, [0.025, 0.975])))
    assert out["ci"][0] < 0.3 < out["ci"][1]
    same = paired_bootstrap(em, refs, a, a, resamples=200)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0]


def test_paired_bootstrap_of_a_corpus_metric():
    (f1,) = build_metrics(["macro_f1"], None)
    refs = ["pos", "neg"] * 20
    a = ["pos"] * 40
    out = paired_bootstrap(f1, refs, a, refs, resamples=200)
    assert out["diff"] == pytest.approx(1 - macro_f1(a, refs))
    assert out["ci"][0] > 0  # perfect vs constant: the gain is certain


# -- examples and k-shot prompts -------------------------------------------------------------------

U = {"role": "user", "content": "q"}


def test_eval_examples_and_shots():
    recs = [
        Record(
            "1", messages=({"role": "system", "content": "sys"}, U, {"role": "assistant", "content": "a1"})
        ),
        Record("2", text="plain text is skipped"),
        Record("3", messages=(U,)),  # nothing to compare against
        Record("4", messages=({"role": "user", "content": "q4"}, {"role": "assistant", "content": "a4"})),
    ]
    ex = eval_examples(recs)
    assert [e.id for e in ex] == ["1", "4"] and ex[0].reference == "a1" and ex[0].prompt[-1] == U
    shot = EvalExample("s", ({"role": "system", "content": "other"}, {"role": "user", "content": "sq"}), "sa")
    conv = with_shots(ex[0], [shot])
    assert [m["content"] for m in conv] == ["sys", "sq", "sa", "q"]
    pool = [EvalExample(str(i), ({"role": "user", "content": "x" * i},), "y") for i in range(10)]
    picked = pick_shots(pool, 3, seed=1)
    assert picked == pick_shots(pool, 3, seed=1) and len({p.id for p in picked}) == 3
    assert all(int(p.id) < 5 for p in picked)  # from the shorter half


# -- base vs tuned on a tiny model -----------------------------------------------------------------


@pytest.fixture
def tiny_lora(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    model = apply_lora(
        load_causal_lm(tiny_llama, torch.device("cpu"), torch.float32), 4, 8, 0.0, "all-linear"
    )
    return model, ChatTemplate(tok, CHATML)


def examples_of(rows) -> list[EvalExample]:
    return [
        EvalExample(str(i), ({"role": "user", "content": r["instruction"]},), r["output"])
        for i, r in enumerate(rows)
    ]


def test_suite_with_an_untouched_adapter_finds_no_difference(tiny_lora, tmp_path):
    model, template = tiny_lora  # LoRA B starts at zero: tuned and base are the same function
    cfg = EvalConfig(max_new_tokens=6, metrics=["exact_match", "rouge_l"], kshot=2, bootstrap=200)
    ex = examples_of(ALPACA_ROWS[:6])
    s = run_suite(
        model,
        lambda: adapter_disabled(model),
        template,
        ex,
        examples_of(ALPACA_ROWS[6:]),
        cfg,
        64,
        tmp_path,
        "test",
    )
    assert s["models"] == ["tuned", "base", "kshot"] and s["kshot"] == 2 and s["examples"] == 6
    assert s["metrics"]["rouge_l"]["diff"] == 0 and s["metrics"]["rouge_l"]["ci95"] == [0.0, 0.0]
    assert s["likelihood"]["tuned"]["loss"] == pytest.approx(s["likelihood"]["base"]["loss"], abs=1e-6)
    assert s["forgetting"]["relative_change"] == pytest.approx(0, abs=1e-6) and not s["forgetting"]["warning"]
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["base"] == rows[0]["tuned"] and "kshot" in rows[0]
    assert set(rows[0]["scores"]["tuned"]) == {"exact_match", "rouge_l"}
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(s))


def test_suite_sees_a_changed_adapter_and_flags_forgetting(tiny_lora, tmp_path):
    model, template = tiny_lora
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a large change: the tuned model is no longer the base
    cfg = EvalConfig(max_new_tokens=6, metrics=["rouge_l"], forgetting_threshold=0.01, bootstrap=200)
    s = run_suite(
        model,
        lambda: adapter_disabled(model),
        template,
        examples_of(ALPACA_ROWS[:6]),
        [],
        cfg,
        64,
        tmp_path,
        "test",
    )
    assert s["likelihood"]["tuned"]["loss"] != pytest.approx(s["likelihood"]["base"]["loss"], abs=1e-3)
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert any(r["base"] != r["tuned"] for r in rows)
    f = s["forgetting"]
    assert f["relative_change"] == pytest.approx(f["tuned_ppl"] / f["base_ppl"] - 1)
    assert f["warning"] == (f["relative_change"] > 0.01)
    assert "kshot" not in s["models"] and "base" in s["models"]


# -- end of a run, and `strop eval` ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_ends_with_base_vs_tuned_and_a_report(method, tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS[:16])
    test = write_jsonl(tmp_path / "test.jsonl", ALPACA_ROWS[16:])
    cfg = tiny_config(
        tiny_llama,
        train,
        tmp_path / "out",
        method={"name": method},
        eval={"enabled": True, "max_new_tokens": 8, "metrics": ["exact_match", "rouge_l"], "bootstrap": 200},
    )
    cfg["data"]["test"] = [str(test)]
    result = recipe.train(cfg, show_progress=False)
    s = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    assert s["set"] == "test" and s["examples"] == 4 and s["models"] == ["tuned", "base"]
    assert (
        s["likelihood"]["tuned"]["loss"] < s["likelihood"]["base"]["loss"]
    )  # lr 1e-2 on this data: it learned
    assert result.eval == s and result.report is not None and result.report.is_file()
    assert (result.run_dir / "report.md").is_file() and (result.run_dir / "report.json").is_file()


def test_validation_split_is_evaluated_and_flagged_when_there_is_no_test_set(
    tiny_llama, alpaca_file, tmp_path
):
    cfg = tiny_config(
        tiny_llama,
        alpaca_file,
        tmp_path / "out",
        eval={"enabled": True, "max_new_tokens": 4, "forgetting": False},
    )
    result = recipe.train(cfg, show_progress=False)
    assert result.eval["set"] == "validation" and "chose the checkpoint" in result.eval["set_note"]
    assert result.eval["examples"] == result.data["validation_examples"] and "forgetting" not in result.eval
    assert result.eval["metrics"].keys() == {"rouge_l", "bleu"}  # the defaults without an extractor


def test_strop_eval_cli(tiny_llama, tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"question": r["instruction"], "answer": r["output"]} for r in ALPACA_ROWS[:5]],
    )
    out = tmp_path / "ev"
    code = main(
        [
            "eval",
            str(tiny_llama),
            "--data",
            str(data),
            "--metric",
            "contains",
            "--extract",
            "last_number",
            "--max-new-tokens",
            "5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "5 examples" in printed and "examples/s" in printed and "contains" in printed
    summary = json.loads((out / "summary.json").read_text())
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert summary["examples"] == 5 and summary["ppl"] > 1 and len(preds) == 5
    assert preds[0]["reference"] == ALPACA_ROWS[0]["output"] and set(preds[0]["scores"]) == {"contains"}
    assert main(["eval", str(tiny_llama), "--data", str(data), "--metric", "f1"]) == 2


def test_a_bad_metric_fails_before_training(tiny_llama, alpaca_file, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("strop.recipes.skeleton.fit", no_training)
    cfg = tiny_config(tiny_llama, alpaca_file, tmp_path / "out", eval={"enabled": True, "metrics": ["acc"]})
    with pytest.raises(ConfigError, match="eval.metrics: unknown metric 'acc'"):
        recipe.train(cfg, show_progress=False)
    cfg["eval"] = {"enabled": True, "extract": "gsm9k"}
    with pytest.raises(ConfigError, match="eval.extract"):
        recipe.train(cfg, show_progress=False)


def test_strop_eval_checks_data_and_metrics_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import strop.models.inference as inference

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(inference, "load_for_inference", no_loading)
    assert main(["eval", "some-model", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    assert main(["eval", "some-model", "--data", str(data), "--extract", "gsm9k"]) == 2
    assert "eval.extract" in capsys.readouterr().err


def test_paired_mean_difference_by_hand():
    from strop.eval.bootstrap import paired_mean_difference

    always = paired_mean_difference([0.0] * 8, [1.0] * 8)
    assert always["diff"] == 1.0 and always["ci"] == [1.0, 1.0]  # every resample: +1
    # half the prompts gain 1, half lose nothing: mean +0.5, and resamples spread it over [0, 1]
    half = paired_mean_difference([0.0] * 40, [1.0] * 20 + [0.0] * 20, resamples=2000)
    assert half["diff"] == 0.5 and 0.3 < half["ci"][0] < 0.5 < half["ci"][1] < 0.7
    # pairing matters: the same two score lists, swapped within pairs, cancel exactly
    swapped = paired_mean_difference([0.0, 1.0] * 10, [1.0, 0.0] * 10)
    assert swapped["diff"] == 0.0 and swapped["ci"][0] < 0 < swapped["ci"][1]
    with pytest.raises(ValueError):
        paired_mean_difference([1.0], [1.0, 2.0])
