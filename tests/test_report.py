"""The run report and comparison, on run directories written by hand per the run-directory contract."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from strop.core.errors import StropError
from strop.report import diagnose, write_comparison, write_report
from strop.report.compare import config_differences
from strop.report.evaluation import eval_headline, pick_samples

CONFIG = {
    "name": "pirate",
    "output_dir": "runs",
    "model": {"name": "tiny-llama"},
    "data": {"train": [{"path": "/data/pirate.jsonl"}], "val_fraction": 0.1, "max_length": 128},
    "method": {
        "name": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    },
    "optim": {"name": "adamw", "lr": 1e-3, "schedule": "cosine", "warmup_steps": 5},
    "train": {"batch_size": 8, "grad_accum": 2, "max_steps": 60, "seed": 0},
}


def train_records(losses, start_step: int = 1) -> list[dict]:
    return [
        {
            "step": start_step + i,
            "loss": float(v),
            "lr": 1e-3,
            "grad_norm": 1.0,
            "label_tokens": 100,
            "tokens_per_s": 150.0,
        }
        for i, v in enumerate(losses)
    ]


def falling(n: int = 60, start: float = 3.0, end: float = 0.5, noise: float = 0.03) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.geomspace(start, end, n) * (1 + noise * rng.standard_normal(n))


def val_records(pairs) -> list[dict]:
    return [{"step": s, "val_loss": v, "val_ppl": float(np.exp(v))} for s, v in pairs]


def result(**metrics) -> dict:
    return {"metrics": {"skipped_steps": 0, "stopped_early": False, **metrics}, "seconds": 236.0}


OVERFIT_VAL = [(10, 2.0), (20, 1.7), (30, 1.5), (40, 1.43), (50, 1.48), (60, 1.52)]


# ---- diagnosis ----------------------------------------------------------------------------------------


def test_overfitting_names_the_best_step_and_the_rise():
    records = train_records(falling()) + val_records(OVERFIT_VAL)
    found = [d for d in diagnose(records, result(best_step=40)) if d["kind"] == "overfitting"]
    assert len(found) == 1 and found[0]["severity"] == "warning"
    text = found[0]["text"]
    assert "lowest at step 40 (1.43)" in text and "rose 6% by step 60" in text
    assert "best checkpoint (step 40) was kept" in text
    # "was kept" is claimed only when result.json says that step was kept
    other = [d for d in diagnose(records, result(best_step=60)) if d["kind"] == "overfitting"]
    assert "was kept" not in other[0]["text"] and "step 40" in other[0]["text"]


def test_val_loss_rising_with_train_loss_is_not_overfitting():
    rising = np.linspace(1.0, 1.2, 60)
    records = train_records(rising) + val_records(OVERFIT_VAL)
    assert not [d for d in diagnose(records, result()) if d["kind"] == "overfitting"]


def test_underfitting_on_a_flat_loss():
    flat = 2.0 + 0.01 * np.random.default_rng(1).standard_normal(50)
    found = [d for d in diagnose(train_records(flat), result()) if d["kind"] == "underfitting"]
    assert len(found) == 1 and found[0]["severity"] == "warning"
    assert "learning rate" in found[0]["text"] and "more steps" in found[0]["text"]


def test_instability_names_the_spike_step_and_skipped_steps():
    losses = falling()
    losses[29] = 10.0  # step 30
    items = diagnose(train_records(losses), result(skipped_steps=2))
    unstable = [d["text"] for d in items if d["kind"] == "instability"]
    assert any("spiked at step 30 " in t for t in unstable)
    assert any("2 step(s) were skipped" in t for t in unstable)
    assert not [d for d in items if d["kind"] == "ok"]


def test_grad_norm_spike_is_named():
    records = train_records(falling())
    records[39]["grad_norm"] = 50.0
    texts = [d["text"] for d in diagnose(records, result())]
    assert any("Gradient norm spiked at step 40 " in t for t in texts)


def test_a_healthy_curve_gets_no_warnings():
    records = train_records(falling()) + val_records([(20, 1.6), (40, 1.4), (60, 1.3)])
    items = diagnose(records, result(best_step=60))
    assert [d["severity"] for d in items] == ["info"]
    assert items[0]["kind"] == "ok" and "fell" in items[0]["text"]


def test_too_few_points_to_judge():
    items = diagnose(train_records([3.0, 2.0, 1.0]), None)
    assert [d["kind"] for d in items] == ["too_few_points"]


# ---- write_report -------------------------------------------------------------------------------------

EVAL = {
    "set": "test",
    "set_note": None,
    "examples": 64,
    "models": ["base", "tuned", "kshot"],
    "kshot": 3,
    "likelihood": {"base": {"loss": 1.9, "ppl": 6.7}, "tuned": {"loss": 1.4, "ppl": 4.1}},
    "metrics": {
        "exact_match": {
            "base": 0.10,
            "tuned": 0.22,
            "kshot": 0.15,
            "diff": 0.12,
            "ci95": [0.05, 0.19],
            "ci_level": 0.95,
            "kshot_diff": 0.07,
            "kshot_ci95": [0.01, 0.13],
        },
        "rouge_l": {"base": 0.31, "tuned": 0.47, "diff": 0.16, "ci95": [-0.02, 0.3], "ci_level": 0.95},
    },
    "forgetting": {
        "reference": "builtin general text",
        "base_ppl": 20.1,
        "tuned_ppl": 24.3,
        "relative_change": 0.209,
        "threshold": 0.1,
        "warning": True,
    },
    "throughput": {
        "base": {"examples_per_s": 1.2, "seconds": 50},
        "tuned": {"examples_per_s": 1.1, "seconds": 55},
    },
    "generation": {"max_new_tokens": 256, "temperature": 0.0},
}


def sample(i: int, base: float, tuned: float, text: str = "What is 2+2?") -> dict:
    scores = {"base": {"exact_match": base}, "tuned": {"exact_match": tuned}}
    return {"id": i, "input": text, "reference": "4", "base": "five", "tuned": "4", "scores": scores}


def write_run(root: Path, *, config=CONFIG, records=None, res=None, data=None, ev=None, samples=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    records = records if records is not None else train_records(falling()) + val_records(OVERFIT_VAL)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if res is not None:
        (root / "result.json").write_text(json.dumps(res))
    if data is not None:
        (root / "data_summary.json").write_text(json.dumps(data))
    if ev is not None or samples is not None:
        (root / "eval").mkdir(exist_ok=True)
    if ev is not None:
        (root / "eval" / "summary.json").write_text(json.dumps(ev))
    if samples is not None:
        (root / "eval" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return root


DATA = {
    "train_examples": 216,
    "validation_examples": 24,
    "train_label_tokens": 7103,
    "template": "chatml",
    "sources": [
        {
            "path": "/data/pirate.jsonl",
            "split": "train",
            "rows": 245,
            "format": "alpaca",
            "examples_in": 243,
            "truncated": 3,
            "dropped_no_response": 2,
            "cached": False,
        }
    ],
    "validation_duplicates_removed": 1,
    "length_histogram": {
        "edges": [0, 32, 64, 96, 128],
        "train": [20, 120, 60, 16],
        "validation": [3, 12, 7, 2],
    },
    "length_percentiles": {"train": {"p50": 61, "p90": 101, "max": 128}},
}


def test_full_report_is_self_contained_and_shows_the_evaluation(tmp_path):
    samples = [
        sample(1, 0.0, 1.0, "<script>alert('x')</script> & more"),
        sample(2, 1.0, 0.0),
        sample(3, 1.0, 1.0),
    ]
    run = write_run(tmp_path / "run", res=result(best_step=40, loss=0.5), data=DATA, ev=EVAL, samples=samples)
    paths = write_report(run)
    assert set(paths) == {"html", "md", "json"} and all(p.is_file() for p in paths.values())
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") >= 3  # loss, learning rate, lengths
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html
    assert len(html.encode()) < 1_000_000
    assert "Tuned beats base on exact_match by +0.12 (95% CI +0.05 to +0.19)" in html
    assert "+0.12 (+0.05 to +0.19)" in html and "+0.07 (+0.01 to +0.13)" in html  # both CI columns
    assert "3-shot base" in html and "Scored on 64 examples of the test set" in html
    assert "Forgetting: perplexity on general text rose +20.9%" in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more" in html
    assert "<script" not in html
    assert "3 example(s) truncated" in html and "2 row(s) dropped for having no response" in html
    assert "overfit" in html and "step 40" in html
    report = json.loads(paths["json"].read_text())
    assert report["eval"]["metrics"]["exact_match"]["diff"] == 0.12
    assert any(d["kind"] == "overfitting" for d in report["diagnosis"])
    assert report["config"]["batch"] == "8 examples × 2 accumulation step(s)"
    md = paths["md"].read_text()
    assert "| exact_match | 0.10 | 0.22 | 0.15 | +0.12 (+0.05 to +0.19) | +0.07 (+0.01 to +0.13) |" in md
    assert "](report_files/loss.png)" in md and (run / "report_files" / "loss.png").is_file()


def test_a_run_with_only_config_and_metrics_still_gets_a_report(tmp_path):
    run = write_run(tmp_path / "run", records=train_records(falling()))
    paths = write_report(run)
    html = paths["html"].read_text()
    assert "data:image/png;base64," in html
    assert "No evaluation in this run" in html and "No data_summary.json" in html
    assert "No validation loss was logged" in html
    assert json.loads(paths["json"].read_text())["eval"] is None


def test_unreadable_files_are_noted_not_fatal(tmp_path):
    run = write_run(tmp_path / "run", records=train_records([3.0, 2.0]))
    (run / "result.json").write_text("{not json")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    paths = write_report(run)
    report = json.loads(paths["json"].read_text())
    assert any("result.json" in n for n in report["notes"]) and any(
        "1 unreadable line" in n for n in report["notes"]
    )
    with pytest.raises(StropError, match="not a run directory"):
        write_report(tmp_path / "missing")


def test_markdown_fences_outlast_backticks_in_samples(tmp_path):
    code = "```python\nprint('hi')\n```"
    run = write_run(tmp_path / "run", ev=EVAL, samples=[sample(1, 0.0, 1.0, code)])
    md = write_report(run)["md"].read_text()
    assert "````\n" + code + "\n````" in md


def test_samples_mix_wins_and_losses():
    samples = [sample(i, 0.0, 1.0) for i in range(10)] + [sample(10 + i, 1.0, 0.0) for i in range(3)]
    picked = pick_samples(samples, "exact_match")
    verdicts = [v for _, v in picked]
    assert len(picked) == 8 and verdicts.count("base better") == 3
    assert [s["id"] for s, _ in picked] == sorted(s["id"] for s, _ in picked)


# ---- comparison ---------------------------------------------------------------------------------------


def test_comparison_writes_both_files_and_lists_only_differing_settings(tmp_path):
    other = {**CONFIG, "name": "pirate-hi-lr", "optim": {**CONFIG["optim"], "lr": 3e-3}}
    a = write_run(tmp_path / "a", res=result(best_step=40), ev=EVAL)
    b = write_run(tmp_path / "b", config=other, records=train_records(falling(end=0.8)))
    paths = write_comparison([a, b], tmp_path / "cmp")
    assert set(paths) == {"html", "md"} and all(p.is_file() for p in paths.values())
    html, md = paths["html"].read_text(), paths["md"].read_text()
    assert html.count("data:image/png;base64,") == 2  # train and validation overlays
    assert "| optim.lr | 0.001 | 0.003 |" in md
    assert "model.name" not in md and "train.max_steps" not in md
    assert "pirate-hi-lr" in html and "0.22 (+0.12)" in md


def test_config_differences_treats_a_missing_key_as_a_difference():
    diff = config_differences([{"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1, "c": [1, 3], "d": "x"}}])
    assert diff == {"a.c": ["[1, 2]", "[1, 3]"], "a.d": [None, "x"]}


def test_report_imports_only_core():
    """strop.report sits just above strop.core: it may import nothing else from strop."""
    root = Path(__file__).resolve().parents[1] / "src" / "strop" / "report"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("strop."):
                    assert name.split(".")[1] in ("core", "report"), f"{path.name} imports {name}"


def test_headline_says_when_the_interval_spans_zero():
    ev = {"metrics": {"rouge_l": {"base": 0.31, "tuned": 0.33, "diff": 0.02, "ci95": [-0.03, 0.07]}}}
    assert (
        eval_headline(ev) == "Tuned vs base on rouge_l: +0.02 (95% CI -0.03 to +0.07): no clear difference."
    )
    ev["metrics"]["rouge_l"].update(diff=-0.05, ci95=[-0.09, -0.01])
    assert eval_headline(ev).startswith("Tuned is worse than base on rouge_l by -0.05")
    assert eval_headline({"metrics": {"bleu": {"tuned": 20.0}}}) is None  # no base: nothing to compare


def test_preference_report_judges_by_held_out_loss_not_the_training_curve(tmp_path):
    """A one-pass preference run sees new pairs every step, so a flat training loss is no verdict when
    the held-out loss of the start and the tuned model is known."""
    import json

    from strop.report import write_report

    (tmp_path / "config.yaml").write_text("task: dpo\nname: p\n")
    (tmp_path / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": i, "loss": 0.69 + 0.001 * (i % 2), "lr": 1e-4}) + "\n" for i in range(1, 41)
        )
    )
    (tmp_path / "eval").mkdir()
    summary = {"task": "dpo", "set": "test", "pairs": 10, "objective": "sigmoid",
               "metrics": {"loss": 0.66}, "start_metrics": {"loss": 0.6931}}  # fmt: skip
    (tmp_path / "eval" / "summary.json").write_text(json.dumps(summary))
    write_report(tmp_path)
    kinds = [d["kind"] for d in json.loads((tmp_path / "report.json").read_text())["diagnosis"]]
    assert "heldout_loss" in kinds and "underfitting" not in kinds
    summary["metrics"] = {}
    (tmp_path / "eval" / "summary.json").write_text(json.dumps(summary))
    write_report(tmp_path)
    kinds = [d["kind"] for d in json.loads((tmp_path / "report.json").read_text())["diagnosis"]]
    assert "underfitting" in kinds  # without held-out figures the curve is all there is


def test_a_run_mostly_outside_its_loop_reports_both_times(tmp_path):
    """DPO computes reference log-probs before its loop and scores held-out pairs after it: the
    headline gives the loop's time (segments add up across a resume) and the whole run's."""
    import json

    from strop.report import write_report

    (tmp_path / "config.yaml").write_text("task: dpo\nname: p\n")
    elapsed = [60.0 * i for i in range(1, 11)] + [60.0 * i for i in range(1, 6)]  # resumed after 600 s
    (tmp_path / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": i + 1, "loss": 0.6, "lr": 1e-4, "elapsed_s": e}) + "\n"
            for i, e in enumerate(elapsed)
        )
    )
    (tmp_path / "result.json").write_text(json.dumps({"seconds": 3600.0, "metrics": {"steps": 15}}))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Trained 15 steps in 15m 00s (the whole run: 1h 00m)" in md
    assert "| training loop time | 15m 00s |" in md and "| whole run time | 1h 00m |" in md
