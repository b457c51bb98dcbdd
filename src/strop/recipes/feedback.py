"""KTO (`task: kto`): learn from completions marked good or bad (data/feedback.py, methods/kto.py),
against the starting model, whose log-probs are computed once and kept in the run folder as DPO's are.

Run directory (as recipes/sft.py), plus eval/summary.json on the test (else validation) rows: the KTO
metrics of the starting and the tuned model (loss, reward accuracy, AUC of the log-ratio between good
and bad completions) and, where a prompt has one good and one bad completion (pairs split into rows),
the preference accuracy of the start and the tuned model with a McNemar p-value, as DPO reports it;
eval/rows.jsonl: each row's log-probs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from strop.core.device import autocast
from strop.core.errors import ConfigError
from strop.core.io import atomic_write_json, atomic_write_text
from strop.data.feedback import build_feedback, encode_feedback
from strop.data.template import run_templates
from strop.data.tokenized import TokenizedSet
from strop.eval.significance import mcnemar
from strop.export.save import export_model
from strop.methods.dpo import pair_logps
from strop.methods.kto import KTO
from strop.recipes.preference import cached_reference
from strop.recipes.skeleton import Run, Task

log = logging.getLogger("strop")


class FeedbackTask(Task):
    def data(self, run: Run) -> dict:
        cfg = run.cfg
        if cfg.train.batch_size < 2:
            raise ConfigError(
                "train.batch_size: KTO estimates its reference point from the other rows of a batch, "
                f"so it needs at least 2, got {cfg.train.batch_size}"
            )
        self.template_name, self.template, _ = run_templates(cfg, run.tokenizer)
        data = build_feedback(cfg.data, self.template, cfg.train.seed)
        test = data.records["test"][: cfg.eval.max_examples]
        self.test_set = encode_feedback(test, self.template, cfg.data.max_length) if test else None
        self.records = data.records
        data.summary["template"] = self.template_name
        self.train_set, self.validation = data.train, data.validation
        return data.summary

    def objective(self, run: Run, model) -> KTO:
        k = run.cfg.kto
        for name, ts in (("train", self.train_set), ("validation", self.validation), ("test", self.test_set)):
            if ts is not None and len(ts):
                with autocast(run.device, run.amp):  # the reference as the loop's forward computes it
                    ts.reference = cached_reference(model, ts, run.pad_id, run.cfg, run.show_progress, name)
        self.loss = KTO(k.beta, k.desirable_weight, k.undesirable_weight)
        return self.loss

    def export(self, run: Run, model) -> Path:
        return export_model(
            run.run_dir / "model", model, run.tokenizer, self.template, run.cfg, self.template_name
        )

    def evaluate(self, run: Run, model) -> dict | None:
        set_name, ts = (
            ("test", self.test_set) if self.test_set is not None else ("validation", self.validation)
        )
        if ts is None or len(ts) == 0:
            return None
        if set_name == "validation" and run.cfg.eval.max_examples:
            ts = ts.subset(list(range(min(len(ts), run.cfg.eval.max_examples))))
        with autocast(run.device, run.amp):  # scored as the loop's validation scored
            summary = _summary(run, model, ts, self.records[set_name], self.loss, set_name)
        atomic_write_json(run.run_dir / "eval" / "summary.json", summary)
        log.info(
            "eval (%d %s rows): AUC %.3f -> %.3f, reward accuracy %.3f",
            len(ts),
            set_name,
            summary["start_metrics"]["auc"],
            summary["metrics"]["auc"],
            summary["metrics"]["reward_accuracy"],
        )
        return summary


def _summary(run: Run, model, ts: TokenizedSet, records, objective: KTO, set_name: str) -> dict:
    b = run.cfg.eval.batch_size
    batches = [
        {
            k: v.to(run.device)
            for k, v in objective.collate(ts, range(i, min(i + b, len(ts))), run.pad_id).items()
        }
        for i in range(0, len(ts), b)
    ]
    policy, lengths = pair_logps(model, batches)
    assert ts.reference is not None  # objective() computed it for the held-out sets
    ref = ts.reference.astype(np.float64)
    good = np.asarray(ts.targets, dtype=bool)
    summary: dict = {
        "task": "kto",
        "set": set_name,
        "rows": len(ts),
        "objective": "kto",
        "metrics": {k.removeprefix("val_"): v for k, v in objective.summarise(policy, ref, good).items()},
        "start_metrics": {k.removeprefix("val_"): v for k, v in objective.summarise(ref, ref, good).items()},
    }
    by_id = {r.id: r for r in records}
    pairs = paired_rows([by_id[i] for i in ts.example_ids])
    if pairs:
        summary["pairs"] = len(pairs)
        g, w = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        for key, scale in (("preference_accuracy", 1.0), ("preference_accuracy_per_token", lengths[:, 0])):
            start, tuned = ref[:, 0] / scale, policy[:, 0] / scale
            before, after = start[g] > start[w], tuned[g] > tuned[w]
            summary[key] = {
                "start": float(before.mean()),
                "tuned": float(after.mean()),
                **mcnemar(before, after),
            }
    (run.run_dir / "eval").mkdir(exist_ok=True)
    rows = [
        {"id": i, "good": bool(d), "start": round(float(r), 4), "tuned": round(float(p), 4), "tokens": int(n)}
        for i, d, r, p, n in zip(ts.example_ids, good, ref[:, 0], policy[:, 0], lengths[:, 0], strict=True)
    ]
    atomic_write_text(run.run_dir / "eval" / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return summary


def paired_rows(records) -> list[tuple[int, int]]:
    """(good row, bad row) index pairs of prompts that have exactly one good and one bad completion."""
    by_prompt: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_prompt.setdefault(json.dumps(r.messages[:-1]), []).append(i)
    out = []
    for rows in by_prompt.values():
        good = [i for i in rows if records[i].desirable]
        bad = [i for i in rows if not records[i].desirable]
        if len(good) == 1 and len(bad) == 1:
            out.append((good[0], bad[0]))
    return out
