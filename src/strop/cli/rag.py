"""`strop rag index | query | remove | raft | eval | compare`: build, search, edit and score a retrieval
index. `index` and `remove` change an index in place under its lock (a second update waits for the
first); `raft` and `compare` refuse an output that exists unless --force, and never write over an input."""

from __future__ import annotations

import json

from strop.cli.options import (
    device_arg,
    force_arg,
    judge_config,
    judge_options,
    mode_arg,
    positive_int,
    renamed,
)
from strop.core.errors import StropError

DEFAULT_MODEL = "minilm-l6"


def register(sub) -> None:
    r = sub.add_parser("rag", help="retrieval: index documents, query the index, edit it")
    rsub = r.add_subparsers(dest="rag_command", required=True, metavar="ACTION")

    ix = rsub.add_parser(
        "index",
        help="index documents (text, Markdown, HTML, JSONL/JSON/CSV/Parquet rows) for retrieval",
        description="Chunk documents by tokens (whole paragraphs where they fit, overlapping), embed the "
        "chunks and write INDEX (safetensors + JSON). Given an existing INDEX, new documents are added, "
        "changed ones re-chunked and unchanged ones kept: only new chunk texts are embedded. Updates of "
        "one INDEX at once run one after the other (the lock is the file .INDEX.lock beside it).",
    )
    ix.add_argument("docs", nargs="+", metavar="DOCS", help="files or folders of documents")
    index_arg(ix, "the index folder (created or updated)")
    renamed(ix, "--out", "--index", "strop rag index DOCS... --index INDEX")
    ix.add_argument(
        "--model", help=f"embedding encoder (default {DEFAULT_MODEL}; an existing index keeps its own)"
    )
    ix.add_argument("--chunk-size", type=positive_int, help="tokens per chunk at most (default 200)")
    ix.add_argument("--overlap", type=int, help="tokens consecutive chunks share at most (default 40)")
    ix.add_argument(
        "--text-field", help="the text field of JSONL/CSV rows (default: text, document, content, ...)"
    )
    ix.add_argument("--id-field", default="id", help="the id field of rows (default id; else FILE:LINE)")
    ix.add_argument("--sync", action="store_true", help="also remove indexed documents not among DOCS")
    ix.add_argument("--rebuild", action="store_true", help="start the index afresh (other model or chunking)")
    ix.add_argument("--batch-size", type=positive_int, default=32, help="chunks embedded at once")
    ix.add_argument("--no-progress", action="store_true", help="no progress bar")
    ix.set_defaults(handler=_rag_index)

    q = rsub.add_parser("query", help="print the chunks of INDEX that best match TEXT")
    index_arg(q)
    q.add_argument("text", metavar="TEXT")
    renamed(q, "INDEX", "--index", "strop rag query --index INDEX TEXT")
    q.add_argument("--top-k", type=positive_int, default=4, help="hits to print (default 4)")
    mode_arg(q, "--mode")
    q.add_argument("--json", action="store_true", help="one JSON object per hit")
    q.add_argument(
        "--approximate",
        action="store_true",
        help="dense hits from an HNSW graph (usearch) instead of exact search: for large indexes",
    )
    q.set_defaults(handler=_rag_query)

    rf = rsub.add_parser(
        "raft",
        help="retrieval-augmented training rows (RAFT): questions with oracle and distractor passages",
        description="Turn {question, answer, document} rows into chat rows whose prompt carries passages "
        "as --rag shows them: for a fraction P of rows the oracle document plus K distractors retrieved "
        "from INDEX, for the rest K distractors only; passages shuffled. Train on OUT like any chat data.",
    )
    rf.add_argument("rows", metavar="ROWS", help="JSONL/CSV with question, answer and document fields")
    index_arg(rf, "where distractors are retrieved from")
    rf.add_argument("--out", required=True, metavar="OUT.jsonl")
    force_arg(rf)
    rf.add_argument(
        "--oracle-fraction", type=float, default=0.8, help="rows that see their oracle (default 0.8)"
    )
    rf.add_argument("--distractors", type=int, default=3, help="distractor passages per row (default 3)")
    rf.add_argument("--document-field", help="the oracle document's field (default: document, context, ...)")
    mode_arg(rf, "--mode")
    rf.add_argument("--seed", type=int, default=0)
    rf.set_defaults(handler=_rag_raft)

    ev = rsub.add_parser(
        "eval",
        help="score retrieval: recall@k, MRR, nDCG@k against gold documents; context recall/precision",
        description="For each question row (question; gold document ids in doc_id, doc_ids or gold; "
        "optionally the reference answer), retrieve from INDEX in each mode and average recall@k, MRR "
        "and nDCG@k, and context recall and precision at the smallest k against the reference answer.",
    )
    index_arg(ev)
    ev.add_argument("questions", metavar="QUESTIONS", help="JSONL/CSV rows of questions")
    renamed(ev, "INDEX", "--index", "strop rag eval --index INDEX QUESTIONS")
    ev.add_argument("--k", default="1,3,5,10", help="cut-offs, comma-separated (default 1,3,5,10)")
    ev.add_argument("--modes", default="hybrid,dense,bm25", help="modes to compare (default all three)")
    ev.add_argument("--json", action="store_true", help="print the scores as JSON")
    ev.add_argument(
        "--approximate",
        action="store_true",
        help="dense hits from an HNSW graph (usearch) instead of exact search: for large indexes",
    )
    ev.set_defaults(handler=_rag_eval)

    cp = rsub.add_parser(
        "compare",
        help="fine-tune, RAG or both? base / +RAG / fine-tuned / +RAG / RAFT + RAG on the same questions",
        description="Answer held-out questions (question + reference answer rows; gold doc_id optional) "
        "with each arm, greedily; score token F1, exact match, ROUGE-L and embedding cosine, each with "
        "its paired-bootstrap interval against the base model; report costs and a verdict. Writes "
        "OUT/compare.json, OUT/compare.md and OUT/answers.jsonl.",
    )
    cp.add_argument("questions", metavar="QUESTIONS", help="JSONL/CSV rows: question, answer[, doc_id]")
    index_arg(cp)
    cp.add_argument(
        "--base", required=True, metavar="MODEL", help="the base model (catalogue name, folder, hub id)"
    )
    cp.add_argument("--tuned", metavar="RUN_DIR", help="a run fine-tuned on the questions' domain")
    cp.add_argument("--raft", metavar="RUN_DIR", help="a run trained on `strop rag raft` rows")
    cp.add_argument("--out", default="rag-compare", metavar="DIR", help="default ./rag-compare")
    force_arg(cp, "write into --out even when it is not empty (its compare files are replaced)")
    cp.add_argument("--top-k", type=positive_int, default=4)
    mode_arg(cp, "--mode")
    cp.add_argument(
        "--approximate",
        action="store_true",
        help="dense hits from an HNSW graph (usearch) instead of exact search: for large indexes",
    )
    cp.add_argument(
        "--metric",
        choices=["token_f1", "exact_match", "rouge_l", "embedding"],
        default="token_f1",
        help="the metric the verdict is about (default token_f1)",
    )
    cp.add_argument("--limit", type=positive_int, help="the first N questions only")
    cp.add_argument("--max-new-tokens", type=positive_int, default=128)
    cp.add_argument("--batch-size", type=positive_int, default=8)
    device_arg(cp)
    judge_options(cp)
    cp.set_defaults(handler=_rag_compare)

    rm = rsub.add_parser("remove", help="remove documents from INDEX by id")
    index_arg(rm)
    rm.add_argument("ids", nargs="+", metavar="DOC_ID")
    rm.set_defaults(handler=_rag_remove)


def index_arg(p, help: str = "the index folder (`strop rag index` builds it)") -> None:
    """--index INDEX, the one name for the retrieval index (--rag INDEX turns retrieval on elsewhere)."""
    p.add_argument("--index", required=True, metavar="INDEX", help=help)


def _rag_index(args) -> int:
    from pathlib import Path

    from strop.core.io import check_output
    from strop.rag import index as ix

    out = Path(args.index).expanduser()
    check_output(out, "--index", folder=True)
    out.parent.mkdir(parents=True, exist_ok=True)  # where the lock and the index go
    with ix.locked(out):  # from reading the index to writing it: a second update waits
        changes, index = _update_index(args, out)
    print(
        f"{args.index}: {len(index.documents)} documents, {len(index.chunks)} chunks ({changes.summary()}) "
        f"in {changes.seconds:.1f} s"
    )
    return 0


def _update_index(args, out):
    from strop.rag import index as ix
    from strop.rag.documents import read_documents
    from strop.rag.embed import Embedder

    if (
        out.is_dir() and not (out / "index.json").exists() and any(out.iterdir())
    ):  # never replace others' files
        raise StropError(
            f"--index {args.index}: folder is not empty and holds no strop index; give a new folder"
        )
    existing = None if args.rebuild or not (out / "index.json").exists() else ix.load(out)
    model = args.model or (existing.model if existing else DEFAULT_MODEL)
    size = args.chunk_size or (existing.size if existing else 200)
    overlap = (
        args.overlap if args.overlap is not None else (existing.overlap if existing else min(40, size // 5))
    )
    if not 0 <= overlap < size:
        raise StropError(f"--overlap: must be at least 0 and below --chunk-size ({size}), got {overlap}")
    if existing is not None:
        for option, given, kept in (
            ("--model", model, existing.model),
            ("--chunk-size", size, existing.size),
            ("--overlap", overlap, existing.overlap),
        ):
            if given != kept:
                raise StropError(
                    f"{option} {given}: {args.index} was built with {kept}; give the same or --rebuild"
                )
    docs = read_documents(args.docs, args.text_field, args.id_field)
    embedder = Embedder(model, batch_size=args.batch_size)
    if size + 2 > embedder.max_tokens:
        raise StropError(
            f"--chunk-size {size}: {model} reads {embedder.max_tokens} tokens; use at most {embedder.max_tokens - 2}"
        )
    index = existing or ix.Index(model, size, overlap)
    changes = ix.update(index, docs, embedder, sync=args.sync, progress=not args.no_progress)
    ix.save(index, out)
    return changes, index


def _rag_query(args) -> int:
    from strop.rag.search import Retriever

    hits = Retriever(args.index, approximate=args.approximate).search(
        args.text, top_k=args.top_k, mode=args.mode
    )
    for h in hits:
        if args.json:
            print(
                json.dumps(
                    {
                        "rank": h.rank,
                        "doc_id": h.doc_id,
                        "chunk": h.chunk,
                        "score": h.score,
                        "source": h.source,
                        "text": h.text,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(f"{h.rank}. {h.doc_id} #{h.chunk}  score {h.score:.4f}\n   {_one_line(h.text)}")
    if not hits and not args.json:
        print("no hits")
    return 0


def _rag_raft(args) -> int:
    from pathlib import Path

    from strop.core.io import atomic_write_text, check_fresh_output
    from strop.data.read import read_rows
    from strop.rag.raft import raft_rows
    from strop.rag.search import Retriever

    check_fresh_output(args.out, "--out", False, args.force, [args.rows])
    retriever = Retriever(args.index)
    rows = read_rows(args.rows)
    built = raft_rows(
        rows, retriever, args.oracle_fraction, args.distractors, args.seed, args.mode, args.document_field
    )
    atomic_write_text(Path(args.out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in built))
    oracle = sum(r["raft"]["oracle"] for r in built)
    short = sum(len(r["raft"]["passages"]) - r["raft"]["oracle"] < args.distractors for r in built)
    print(
        f"wrote {len(built)} rows to {args.out}: {oracle} with their oracle, {len(built) - oracle} without"
        + (f"; {short} rows got fewer than {args.distractors} distractors (small index)" if short else "")
    )
    return 0


def _rag_eval(args) -> int:
    from strop.data.read import read_rows
    from strop.rag.retrieval_eval import evaluate_retrieval
    from strop.rag.search import MODES, Retriever

    try:
        ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
    except ValueError:
        raise StropError(f"--k: expected whole numbers separated by commas, got {args.k!r}") from None
    if not ks or ks[0] < 1:
        raise StropError(f"--k: cut-offs must be at least 1, got {args.k!r}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise StropError(f"--modes: {bad[0] if bad else args.modes!r} is not one of {', '.join(MODES)}")
    retriever = Retriever(args.index, approximate=args.approximate)
    rows = read_rows(args.questions)
    if not rows:
        raise StropError(f"{args.questions}: no question rows (an empty file?)")
    result = evaluate_retrieval(retriever, rows, ks, modes)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    names = list(next(iter(result["modes"].values())))
    print(
        f"{result['questions']} questions ({result['with_gold']} with gold documents, "
        f"{result['with_answer']} with a reference answer)"
    )
    print("| mode | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for mode, values in result["modes"].items():
        print(f"| {mode} | " + " | ".join(f"{values[n]:.3f}" for n in names) + " |")
    return 0


def _rag_compare(args) -> int:
    from pathlib import Path

    from strop.core.io import atomic_write_text, check_fresh_output
    from strop.data.read import read_rows
    from strop.rag.search import Retriever
    from strop.recipes.rag_compare import arms, compare
    from strop.report.rag import compare_markdown

    out = Path(args.out)
    check_fresh_output(out, "--out", True, args.force, [args.questions])
    judge = judge_config(args)  # checked before any model loads
    retriever = Retriever(args.index, approximate=args.approximate)
    rows = read_rows(args.questions, limit=args.limit)
    arm_list = arms(args.base, args.tuned, args.raft)
    result = compare(
        rows,
        retriever,
        arm_list,
        args.top_k,
        args.mode,
        args.max_new_tokens,
        args.batch_size,
        args.device,
        args.metric,
    )
    answers = result.pop("answers")
    out.mkdir(parents=True, exist_ok=True)
    if judge is not None:
        from strop.eval.judging import judge_arms

        result["judge"] = judge_arms(judge, answers, [a.name for a in arm_list], out)
    atomic_write_text(
        out / "answers.jsonl", "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
    )
    atomic_write_text(out / "compare.json", json.dumps(result, indent=1) + "\n")
    markdown = compare_markdown(result)
    atomic_write_text(out / "compare.md", markdown)
    print(markdown)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'answers.jsonl'}")
    return 0


def _rag_remove(args) -> int:
    from strop.rag import index as ix

    with ix.locked(args.index):
        index = ix.load(args.index)
        before = len(index.chunks)
        ix.remove(index, list(dict.fromkeys(args.ids)))
        ix.save(index, args.index)
    print(
        f"{args.index}: removed {len(set(args.ids))} documents ({before - len(index.chunks)} chunks); "
        f"{len(index.documents)} documents left"
    )
    return 0


def _one_line(text: str, width: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
