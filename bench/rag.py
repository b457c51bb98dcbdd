"""Fine-tune, RAG, or both, on shared medical QA data, as a user would run it: the README's figures.

    python bench/rag.py                         # MedQuAD, then PubMedQA (~40 min each on 2 cores)
    python bench/rag.py --only pubmedqa         # PubMedQA
    python bench/rag.py --questions 50          # fewer held-out questions, faster

For each dataset: documents go into an index (MedQuAD: every answer, an NIH page passage; PubMedQA:
every abstract's context); a seeded set of questions is held out from training, their documents in the
index. SmolLM2-135M-Instruct + LoRA is fine-tuned on the other questions (examples/rag/sft.yaml) and on
RAFT rows built from them (examples/rag/raft.yaml); then `strop rag compare` answers the held-out questions with base / base + RAG / fine-tuned /
fine-tuned + RAG / RAFT + RAG. Also `strop rag eval` for the retrieval alone. Resumable: finished steps
are kept in --work.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def strop(*args: str) -> None:
    print("$ strop " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "strop", *args], check=True)


def medquad(n_questions: int, n_docs: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(documents, QA rows): a document per answer; the QA row names its answer's document."""
    rows = [json.loads(line) for line in (SHARED / "medquad" / "train.jsonl").open()]
    random.Random(seed).shuffle(rows)
    rows = rows[:n_docs]
    docs = [{"id": f"mq{i}", "text": r["output"]} for i, r in enumerate(rows)]
    qa = [
        {"question": r["instruction"], "answer": r["output"], "doc_id": f"mq{i}"} for i, r in enumerate(rows)
    ]
    return docs, qa


def pubmedqa(n_questions: int, n_docs: int, seed: int) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (SHARED / "pubmedqa" / "train.jsonl").open()]
    random.Random(seed).shuffle(rows)
    docs = [{"id": f"pmid{r['pmid']}", "text": r["context"]} for r in rows]
    qa = [
        {
            "question": r["question"],
            "answer": f"{r['answer'].capitalize()}. {r['long_answer']}",
            "doc_id": f"pmid{r['pmid']}",
        }
        for r in rows
    ]
    return docs, qa


DATASETS = {"medquad": medquad, "pubmedqa": pubmedqa}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def run(name: str, work: Path, args) -> dict:
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    docs, qa = DATASETS[name](args.questions, args.docs, args.seed)
    held_out, train_rows = qa[: args.questions], qa[args.questions :][: args.train_rows]
    write_jsonl(d / "docs.jsonl", docs)
    questions = write_jsonl(d / "questions.jsonl", held_out)
    qa_train = write_jsonl(d / "qa-train.jsonl", train_rows)  # {question, answer, doc_id}: SFT and RAFT rows
    timings: dict[str, float] = {}
    index = d / "index"
    if not (index / "index.json").is_file():
        t = time.time()
        strop(
            "rag",
            "index",
            str(d / "docs.jsonl"),
            "--index",
            str(index),
            "--chunk-size",
            str(args.chunk_size),
            "--overlap",
            str(args.chunk_size // 8),
        )
        timings["index"] = time.time() - t
    strop("rag", "eval", "--index", str(index), str(questions), "--k", f"1,{args.top_k},10")
    if not (d / "raft.jsonl").is_file():
        strop(
            "rag",
            "raft",
            str(qa_train),
            "--index",
            str(index),
            "--out",
            str(d / "raft.jsonl"),
            "--distractors",
            str(args.top_k - 1),
            "--oracle-fraction",
            "0.8",
        )
    runs = {}
    for arm, data in (("sft", qa_train), ("raft", d / "raft.jsonl")):  # the shipped examples/rag configs
        run_dir = d / "runs" / f"rag-{arm}"
        if not (run_dir / "result.json").is_file():
            strop(
                "train",
                str(ROOT / "examples" / "rag" / f"{arm}.yaml"),
                "--no-progress",
                "--set",
                f"data.train=[{data}]",
                "--set",
                f"output_dir={d / 'runs'}",
                "--set",
                f"train.max_steps={args.steps}",
                "--set",
                f"train.eval_every={args.steps}",
            )
        runs[arm] = run_dir
    strop(
        "rag",
        "compare",
        str(questions),
        "--index",
        str(index),
        "--base",
        "smollm2-135m-instruct",
        "--tuned",
        str(runs["sft"]),
        "--raft",
        str(runs["raft"]),
        "--out",
        str(d / "compare"),
        "--top-k",
        str(args.top_k),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--device",
        "cpu",
    )
    return {
        "name": name,
        "timings": timings,
        "compare": json.loads((d / "compare" / "compare.json").read_text()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(DATASETS))
    p.add_argument("--work", default="/tmp/strop-bench-rag")
    p.add_argument("--questions", type=int, default=100, help="held-out questions")
    p.add_argument("--docs", type=int, default=2000, help="MedQuAD documents in the index")
    p.add_argument("--train-rows", type=int, default=400, help="training questions")
    p.add_argument("--steps", type=int, default=60, help="training steps of batch 8 per run")
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    work = Path(args.work)
    for name in [args.only] if args.only else list(DATASETS):
        run(name, work, args)
        print(f"\n## {name}\n")
        print((work / name / "compare" / "compare.md").read_text())


if __name__ == "__main__":
    main()
