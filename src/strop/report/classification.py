"""The report's section for classification runs: accuracy and macro-F1 against the majority-label
baseline, per-class precision/recall/F1, the confusion matrix, and token attributions of a few
examples (from eval/summary.json, written by recipes/classify.py)."""

from __future__ import annotations

from strop.report.collect import dig, is_number
from strop.report.document import example, note, num, section, table, text


def is_classification(ev: dict) -> bool:
    return isinstance(ev, dict) and ev.get("task") == "classification"


def classification_headline(ev: dict) -> str | None:
    acc, f1 = dig(ev, "metrics", "accuracy"), dig(ev, "metrics", "macro_f1")
    if not isinstance(acc, dict) or not is_number(acc.get("tuned")):
        return None
    return (
        f"Accuracy {num(acc['tuned'])}, macro-F1 {num(dig(f1, 'tuned'))} on {ev.get('examples')} "
        f"{ev.get('set')} examples (always predicting {ev.get('majority_label')!r}: accuracy {num(acc.get('majority'))})."
    )


def classification_section(ev: dict) -> dict:
    title = "Evaluation (classification)"
    metrics = ev.get("metrics") or {}
    rows = [[name, num(dig(m, "tuned")), num(dig(m, "majority"))] for name, m in metrics.items()]
    blocks = [
        text(f"On the {ev.get('set')} set ({ev.get('examples')} examples), never trained on."),
        table(["metric", "this model", "majority-label baseline"], rows),
    ]
    per_class = ev.get("per_class") or {}
    if per_class:
        blocks.append(
            table(
                ["label", "precision", "recall", "F1", "support"],
                [
                    [k, num(v.get("precision")), num(v.get("recall")), num(v.get("f1")), v.get("support")]
                    for k, v in per_class.items()
                ],
            )
        )
    confusion = ev.get("confusion") or {}
    labels, matrix = confusion.get("labels"), confusion.get("matrix")
    if labels and matrix:
        blocks.append(text("Confusion matrix (rows: true label, columns: predicted label)."))
        blocks.append(
            table(
                ["true \\ predicted", *labels],
                [[name, *row] for name, row in zip(labels, matrix, strict=False)],
            )
        )
    explanations = ev.get("explanations") or []
    if explanations:
        blocks.append(
            text(
                "Token attributions (integrated gradients towards the predicted label; + pushes towards it)."
            )
        )
        for e in explanations:
            pairs = sorted(
                zip(e.get("tokens", []), e.get("attributions", []), strict=False), key=lambda p: -abs(p[1])
            )
            blocks.append(
                example(
                    f"{e.get('id')}: true {e.get('label')!r}, predicted {e.get('predicted')!r} (p={num(e.get('probability'))})",
                    [
                        (
                            "tokens",
                            " ".join(
                                f"{t}[{a:+.3f}]"
                                for t, a in zip(e.get("tokens", []), e.get("attributions", []), strict=False)
                            ),
                        ),
                        ("strongest", ", ".join(f"{t} {a:+.3f}" for t, a in pairs[:5])),
                    ],
                )
            )
    elif not rows:
        blocks.append(note("No metrics in eval/summary.json."))
    return section(title, blocks)
