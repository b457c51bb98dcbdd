"""`strop predict | explain | score`: what classification and reward runs say about texts and replies."""

from __future__ import annotations

from strop.cli.options import check_out, emit_jsonl, force_arg, positive_int


def register(sub) -> None:
    pr = sub.add_parser(
        "predict",
        help="label texts with a trained classifier",
        description="Label every row of a file (.jsonl/.csv/.parquet with a 'text' field, and "
        "'text_pair' for pairs; .txt: one text per line) with a classification run; writes JSONL rows "
        "{text, label, probabilities}.",
    )
    pr.add_argument("target", metavar="RUN_DIR")
    pr.add_argument("--file", required=True)
    pr.add_argument("--out", help="output JSONL (default: print to stdout)")
    force_arg(pr)
    pr.add_argument("--batch-size", type=positive_int, default=32)
    pr.set_defaults(handler=_predict)

    ex = sub.add_parser(
        "explain",
        help="which tokens drove a classifier's prediction",
        description="Integrated-gradients token attributions (Sundararajan et al. 2017) towards the "
        "predicted label: positive pushed towards it, negative away.",
    )
    ex.add_argument("target", metavar="RUN_DIR")
    ex.add_argument("--text", required=True)
    ex.add_argument("--pair", help="the second text, for pair classification")
    ex.add_argument("--steps", type=positive_int, default=32, help="integration steps")
    ex.set_defaults(handler=_explain)

    sc = sub.add_parser(
        "score",
        help="score replies with a trained reward model",
        description="Score every row of a file ({prompt, response} or {messages} ending in the reply) "
        "with a reward run; writes the rows with a 'reward' field as JSONL.",
    )
    sc.add_argument("target", metavar="RUN_DIR")
    sc.add_argument("--file", required=True)
    sc.add_argument("--out", help="output JSONL (default: print to stdout)")
    force_arg(sc)
    sc.set_defaults(handler=_score)


def _predict(args) -> int:
    check_out(args.out, args.force, [args.file])
    import json
    from pathlib import Path

    from strop.api import Classifier
    from strop.data.classes import read_texts

    clf = Classifier(args.target)  # a wrong run is named before the file is read
    texts = read_texts(Path(args.file))
    predictions = clf.predict(texts, args.batch_size)
    lines = []
    for (text, pair), p in zip(texts, predictions, strict=True):
        row = {"text": text, **({"text_pair": pair} if pair is not None else {}), **p}
        lines.append(json.dumps(row, ensure_ascii=False))
    emit_jsonl(lines, args.out, "predictions")
    return 0


def _explain(args) -> int:
    from strop.api import Classifier
    from strop.eval.attribution import render_attributions

    e = Classifier(args.target).explain(args.text, args.pair, steps=args.steps)
    print(f"predicted {e['predicted']} (p={e['probability']:.3f})")
    print(render_attributions(e["tokens"], e["attributions"]))
    print(f"(integrated gradients, {args.steps} steps; completeness gap {e['completeness_gap']:+.4f})")
    return 0


def _score(args) -> int:
    check_out(args.out, args.force, [args.file])
    import json

    from strop.api import RewardModel

    rows = RewardModel(args.target).score_file(args.file)
    emit_jsonl([json.dumps(r, ensure_ascii=False) for r in rows], args.out, "scored rows")
    return 0
