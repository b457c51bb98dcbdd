"""Retrieval: chunking, documents, embeddings, BM25, fusion, and an index that adds, updates and removes.

The tiny random BERT's embeddings carry no meaning, so these tests check what retrieval computes (hand
formulas, planted words found lexically, vectors kept or recomputed); tests/test_slow_rag.py checks
that the packaged MiniLM finds planted passages by meaning and matches sentence-transformers.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import assert_user_error, run_cli
from strop.rag import index as ix
from strop.rag.chunk import chunk_text
from strop.rag.documents import html_text, read_documents
from strop.rag.embed import Embedder
from strop.rag.lexical import BM25, terms
from strop.rag.search import RRF_K, Retriever

WORD = re.compile(r"\S+")


def words(text: str) -> int:
    return len(WORD.findall(text))


def word_windows(text: str, size: int) -> list[tuple[int, int]]:
    spans = [m.span() for m in WORD.finditer(text)]
    return [(spans[i][0], spans[min(i + size, len(spans)) - 1][1]) for i in range(0, len(spans), size)]


def paragraphs(n: int, length: int) -> str:
    return "\n\n".join(" ".join(f"p{p}w{w}" for w in range(length)) for p in range(n))


def test_chunks_are_whole_paragraphs_within_size_and_overlap():
    text = paragraphs(10, 7)  # 70 words in paragraphs of 7
    chunks = chunk_text("d", text, size=20, overlap=7, count=words, windows=word_windows)
    for c in chunks:
        assert c.text == text[c.start : c.end] and c.tokens == words(c.text) <= 20
        assert c.text.startswith("p") and c.text.split()[0].endswith("w0")  # starts a paragraph
        assert c.text.split()[-1].endswith("w6")  # ends one
    assert [c.number for c in chunks] == list(range(len(chunks)))
    for a, b in zip(chunks, chunks[1:], strict=False):
        shared = set(a.text.split()) & set(b.text.split())
        assert len(shared) == 7  # exactly one paragraph of overlap
        assert b.start > a.start
    covered = set().union(*(c.text.split() for c in chunks))
    assert covered == set(text.split())  # nothing lost


def test_no_overlap_means_a_partition_and_long_paragraphs_are_cut():
    text = paragraphs(3, 5) + "\n\n" + "One sentence here. " * 12 + "\n\n" + "x " * 45
    chunks = chunk_text("d", text.strip(), size=8, overlap=0, count=words, windows=word_windows)
    assert all(c.tokens <= 8 for c in chunks)
    joined = " ".join(c.text for c in chunks).split()
    assert joined == text.split()  # every word once, in order
    assert any(c.text == "One sentence here. One sentence here." for c in chunks)  # cut at sentence ends


@pytest.mark.parametrize("size,overlap", [(0, 0), (4, 4), (4, -1)])
def test_chunk_settings_are_checked(size, overlap):
    with pytest.raises(ValueError):
        chunk_text("d", "a b", size, overlap, words, word_windows)


def test_documents_from_text_html_and_rows(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\nBody text.\n")
    (tmp_path / "docs" / "b.html").write_text(
        "<html><head><title>t</title><style>p{}</style></head><body><h1>Head</h1><p>One &amp; two"
        "<script>evil()</script></p><ul><li>item</li></ul></body></html>"
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "r1", "content": "first"}\n{"content": "second"}\n{"content": "  "}\n')
    docs = read_documents([str(tmp_path / "docs"), str(rows)])
    by_id = {d.id: d for d in docs}
    assert by_id[f"{tmp_path}/docs/a.md"].text == "# Title\n\nBody text."
    assert by_id[f"{tmp_path}/docs/b.html"].text == "Head\n\nOne & two\n\nitem"
    assert by_id["r1"].text == "first" and by_id[f"{rows}:2"].text == "second"
    assert len(docs) == 4  # the blank row is no document


def test_html_text_keeps_paragraphs():
    assert html_text("<p>a  b</p><p>c<br>d</p>") == "a b\n\nc\n\nd"


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"title": "x"}\n', "rows.jsonl:1: no text field one of text"),
        ('{"text": 3}\n', "rows.jsonl:1: field 'text': expected text"),
        ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "document id 'a' is also the id of"),
        ('{"text": \n', "rows.jsonl:1: invalid JSON"),
    ],
)
def test_bad_document_rows_name_the_line(tmp_path, content, message):
    (tmp_path / "rows.jsonl").write_text(content)
    with pytest.raises(Exception, match=re.escape(message)):
        read_documents([str(tmp_path / "rows.jsonl")])


def test_bm25_scores_equal_the_hand_computed_formula():
    texts = ["the cat sat on the mat", "dogs chase the cat and the cat runs", "birds sing", "a cat"]
    bm25 = BM25(texts)
    toks = terms(texts)
    n, mean = len(toks), sum(map(len, toks)) / len(toks)

    def hand(query: str) -> list[float]:
        out = []
        for d in toks:
            s = 0.0
            for w in terms([query])[0]:
                df = sum(w in x for x in toks)
                if df:
                    tf = d.count(w)
                    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                    s += idf * tf / (tf + 1.5 * (1 - 0.75 + 0.75 * len(d) / mean))
            out.append(s)
        return out

    for query in ("cat", "cat mat", "dogs birds", "unknown words"):
        assert bm25.scores(query).tolist() == pytest.approx(hand(query), rel=1e-5)


@pytest.fixture(scope="module")
def embedder(tiny_bert):
    return Embedder(str(tiny_bert), batch_size=3)


def test_embeddings_are_mean_pooled_unit_vectors_independent_of_batching(embedder, tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    texts = ["a short one", "a rather longer text about the sea and the sky", "x"]
    got = embedder.embed(texts)
    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    for text, vec in zip(texts, got, strict=True):
        with torch.no_grad():
            hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
        want = hidden.mean(0) / hidden.mean(0).norm()  # one text, no padding: the plain mean
        torch.testing.assert_close(vec, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embedder.embed(texts[::-1]), got.flip(0), atol=1e-5, rtol=1e-5)


class CountingEmbedder:
    """The tiny embedder's vectors, with chunks measured in words, counting the texts it embeds."""

    def __init__(self, inner):
        self.inner, self.texts = inner, []
        self.count, self.windows, self.dim = words, word_windows, inner.dim

    def embed(self, texts, progress=False):
        self.texts += texts
        return self.inner.embed(texts)


def corpus(tmp_path, docs: dict[str, str]):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))
    return read_documents([str(path)])


DOCS = {
    "sea": "The ocean is salty.\n\nWhales sing under water.",
    "space": "Mars is a red planet.\n\nSaturn has rings of ice.",
    "food": "Bread needs flour and yeast.",
}


def build_index(tmp_path, encoder, capsys, docs: dict[str, str]) -> str:
    """`strop rag index` over {id: text} rows with the tiny encoder; the index folder."""
    rows = tmp_path / "docs.jsonl"
    rows.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))
    index = str(tmp_path / "idx")
    argv = ["rag", "index", str(rows), "--index", index, "--model", str(encoder), "--no-progress"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    return index


def test_update_embeds_only_new_chunk_texts_and_remove_removes(embedder, tmp_path):
    counting = CountingEmbedder(embedder)
    index = ix.Index(str(embedder.name), size=6, overlap=0)
    first = ix.update(index, corpus(tmp_path, DOCS), counting)
    assert first.added == ["sea", "space", "food"] and first.embedded == len(index.chunks) == 5
    vectors = {c.text: index.vectors[i].clone() for i, c in enumerate(index.chunks)}

    changed = {**DOCS, "space": "Mars is a red planet.\n\nJupiter is the largest planet."}
    counting.texts.clear()
    second = ix.update(index, corpus(tmp_path, changed), counting)
    assert second.updated == ["space"] and second.unchanged == ["sea", "food"]
    assert counting.texts == ["Jupiter is the largest planet."]  # the only new chunk text
    for i, c in enumerate(index.chunks):
        if c.text in vectors:
            assert torch.equal(index.vectors[i], vectors[c.text])
    assert "Saturn has rings of ice." not in {c.text for c in index.chunks}

    ix.save(index, tmp_path / "idx")
    ix.remove(index, ["sea"])
    ix.save(index, tmp_path / "idx")
    again = ix.load(tmp_path / "idx")
    assert set(again.documents) == {"space", "food"} and again.vectors.shape == (3, embedder.dim)
    assert all(c.doc_id != "sea" for c in again.chunks)
    assert "Whales" not in "".join(p.read_text(errors="ignore") for p in (tmp_path / "idx").iterdir())
    retriever = Retriever(again, embedder)
    for mode in ("bm25", "dense", "hybrid"):
        assert all(h.doc_id != "sea" for h in retriever.search("whales ocean salty", top_k=3, mode=mode))
    with pytest.raises(Exception, match="'nope' is not in the index"):
        ix.remove(again, ["nope"])


def test_sync_removes_documents_no_longer_given(embedder, tmp_path):
    embedder = CountingEmbedder(embedder)
    index = ix.Index(str(embedder.inner.name), size=50, overlap=0)
    ix.update(index, corpus(tmp_path, DOCS), embedder)
    kept = ix.update(index, corpus(tmp_path, {"food": DOCS["food"]}), embedder)
    assert kept.removed == [] and set(index.documents) == set(DOCS)
    synced = ix.update(index, corpus(tmp_path, {"food": DOCS["food"]}), embedder, sync=True)
    assert synced.removed == ["sea", "space"] and set(index.documents) == {"food"}
    assert synced.embedded == 0


def test_bm25_finds_planted_passages_and_hybrid_fuses_ranks(embedder, tmp_path):
    filler = {f"f{i}": f"Filler paragraph number {i} about nothing in particular." for i in range(20)}
    planted = {"needle": "The zorbulon reactor vents quarkine at dawn."}
    index = ix.Index(str(embedder.name), size=50, overlap=0)
    ix.update(index, corpus(tmp_path, {**filler, **planted}), embedder)
    retriever = Retriever(index, embedder)
    hits = retriever.search("when does the zorbulon vent quarkine?", top_k=3, mode="bm25")
    assert hits[0].doc_id == "needle" and hits[0].text == planted["needle"] and len(hits) == 1

    query = "zorbulon filler"
    dense = retriever.dense_scores(query)
    lexical = retriever.bm25.scores(query)
    rank_d = {i: r for r, i in enumerate(sorted(range(len(dense)), key=lambda i: (-dense[i], i)), 1)}
    positive = [i for i in sorted(range(len(lexical)), key=lambda i: (-lexical[i], i)) if lexical[i] > 0]
    rank_l = {i: r for r, i in enumerate(positive, 1)}
    want = {i: 1 / (RRF_K + rank_d[i]) + (1 / (RRF_K + rank_l[i]) if i in rank_l else 0) for i in rank_d}
    hits = retriever.search(query, top_k=5, mode="hybrid")
    best = sorted(want, key=lambda i: (-want[i], i))[:5]
    assert [(h.doc_id, h.chunk) for h in hits] == [
        (index.chunks[i].doc_id, index.chunks[i].number) for i in best
    ]
    assert [h.score for h in hits] == pytest.approx([want[i] for i in best])
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]


def test_cli_indexes_queries_updates_and_removes(tiny_bert, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Aardvarks eat ants at night.")
    (docs / "b.md").write_text("Beavers build dams in rivers.")
    out = str(tmp_path / "idx")
    argv = ["rag", "index", str(docs), "--index", out, "--model", str(tiny_bert), "--chunk-size", "32"]
    rc, stdout, err = run_cli(argv + ["--no-progress"], capsys)
    assert rc == 0, err
    assert "2 documents, 2 chunks (2 added" in stdout
    rc, stdout, err = run_cli(
        ["rag", "query", "--index", out, "beavers dams", "--json", "--top-k", "1", "--mode", "bm25"], capsys
    )
    assert rc == 0, err
    hit = json.loads(stdout)
    assert (
        hit["doc_id"] == f"{docs}/b.md"
        and hit["text"] == "Beavers build dams in rivers."
        and hit["rank"] == 1
    )
    (docs / "a.txt").write_text("Aardvarks eat termites too.")
    rc, stdout, err = run_cli(argv[:5] + ["--no-progress"], capsys)  # model and chunking from the index
    assert rc == 0, err
    assert "1 updated, 1 unchanged" in stdout and "1 chunks embedded, 1 reused" in stdout
    rc, stdout, err = run_cli(["rag", "remove", "--index", out, f"{docs}/b.md"], capsys)
    assert rc == 0, err
    rc, stdout, err = run_cli(["rag", "query", "--index", out, "beavers dams", "--mode", "bm25"], capsys)
    assert rc == 0 and "no hits" in stdout
    rc, _, err = run_cli(argv[:5] + ["--chunk-size", "16"], capsys)
    assert_user_error(rc, err, "--chunk-size 16", "was built with 32", "--rebuild")
    fresh = tmp_path / "idx2"
    rc, _, err = run_cli(
        ["rag", "index", str(docs), "--index", str(fresh), "--model", str(tiny_bert), "--chunk-size", "400"],
        capsys,
    )
    assert_user_error(rc, err, "--chunk-size 400", "reads 256 tokens; use at most 254")
    assert not fresh.exists()
    (docs / "b.md").unlink()  # b is removed already; index a alone with --sync, then a new c.md
    (docs / "c.md").write_text("Cranes nest in marshes.")
    rc, stdout, err = run_cli(
        ["rag", "index", str(docs / "c.md"), "--index", out, "--sync", "--no-progress"], capsys
    )
    assert rc == 0, err
    assert "1 documents, 1 chunks (1 added, 0 updated, 0 unchanged, 1 removed" in stdout


def test_the_augmented_turn_is_rendered_by_the_template_with_passages_in_order(tokenizer):
    from strop.data.template import BUILTIN, ChatTemplate
    from strop.rag.prompt import INSTRUCTION, augment
    from strop.rag.search import Hit

    hits = [
        Hit(1, "doc-b", 0, 0.9, "Second  passage\ntext.", "b.md"),
        Hit(2, "doc-a", 3, 0.5, "First.", "a.md"),
    ]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is it?"}]
    rendered = ChatTemplate(tokenizer, BUILTIN["chatml"]).render(
        augment(messages, hits), add_generation_prompt=True
    )
    user = rendered.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    assert (
        user
        == f"{INSTRUCTION}\n\nContext:\n[1] (doc-b) Second passage text.\n[2] (doc-a) First.\n\nQuestion: What is it?"
    )
    assert "<|im_start|>system\nBe brief.<|im_end|>" in rendered
    assert messages[1]["content"] == "What is it?"  # the caller's messages are left as they were
    assert augment(messages, []) == messages


def test_generate_with_rag_answers_the_augmented_prompt_and_names_its_sources(
    tiny_llama, tiny_bert, tmp_path, capsys
):
    from strop.api import LanguageModel
    from strop.rag.prompt import with_context

    index = build_index(tmp_path, tiny_bert, capsys, DOCS)
    question = "Which planet has rings of ice?"
    rc, out, err = run_cli(
        [
            "generate",
            str(tiny_llama),
            "--prompt",
            question,
            "--rag",
            index,
            "--top-k",
            "2",
            "--rag-mode",
            "bm25",
            "--max-new-tokens",
            "6",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert rc == 0, err
    row = json.loads(out)
    assert [s["doc_id"] for s in row["sources"]] == ["space"] and row["prompt"] == question
    hits = Retriever(index).search(question, 2, "bm25")
    want = LanguageModel(str(tiny_llama), device="cpu").generate(
        [[{"role": "user", "content": with_context(question, hits)}]], 6, 0.0, 1.0, 1
    )
    assert row["response"] == want[0]
    rc, _, err = run_cli(
        ["generate", str(tiny_llama), "--prompt", "x", "--rag", str(tmp_path / "nope")], capsys
    )
    assert_user_error(rc, err, "not a strop index")


def test_chat_with_rag_augments_each_turn_but_keeps_the_history_plain(
    tiny_llama, tiny_bert, tmp_path, monkeypatch, capsys
):
    import builtins

    import strop.models.generate as gen
    from strop.rag.prompt import with_context

    index = build_index(tmp_path, tiny_bert, capsys, DOCS)
    turns = iter(["Tell me about whales.", "And bread?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(turns))
    seen = []

    def fake_stream(model, template, messages, *args):
        seen.append(messages)
        yield "ok"

    monkeypatch.setattr(gen, "stream", fake_stream)
    rc, out, err = run_cli(
        ["chat", str(tiny_llama), "--rag", index, "--top-k", "1", "--rag-mode", "bm25"], capsys
    )
    assert rc == 0, err
    retriever = Retriever(index)
    first, second = seen
    assert first == [
        {
            "role": "user",
            "content": with_context(
                "Tell me about whales.", retriever.search("Tell me about whales.", 1, "bm25")
            ),
        }
    ]
    assert second[:2] == [
        {"role": "user", "content": "Tell me about whales."},
        {"role": "assistant", "content": "ok"},
    ]
    assert second[2]["content"] == with_context("And bread?", retriever.search("And bread?", 1, "bm25"))
    assert "sources: [1] sea #" in out and "sources: [1] food #0" in out


def test_raft_rows_have_the_oracle_in_the_asked_fraction_and_distractors_from_elsewhere(
    tiny_bert, tmp_path, capsys
):
    topics = {f"t{i}": f"Topic {i} fact: the number {i} is lucky in village {i}." for i in range(12)}
    index = build_index(tmp_path, tiny_bert, capsys, topics)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(
            json.dumps(
                {
                    "doc_id": k,
                    "question": f"Which number is lucky in village {k[1:]}?",
                    "answer": k[1:],
                    "document": v,
                }
            )
            + "\n"
            for k, v in topics.items()
        )
    )
    out = tmp_path / "raft.jsonl"
    argv = [
        "rag",
        "raft",
        str(qa),
        "--index",
        index,
        "--out",
        str(out),
        "--oracle-fraction",
        "0.25",
        "--distractors",
        "2",
    ]
    rc, stdout, err = run_cli(argv + ["--mode", "bm25"], capsys)
    assert rc == 0, err
    assert "3 with their oracle, 9 without" in stdout
    built = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(built) == 12 and sum(r["raft"]["oracle"] for r in built) == 3
    for r, (doc_id, text) in zip(built, topics.items(), strict=True):
        prompt = r["messages"][0]["content"]
        assert r["messages"][1] == {"role": "assistant", "content": doc_id[1:]}
        assert (f"({doc_id}) {text}" in prompt) == r["raft"]["oracle"]
        others = [p for p in r["raft"]["passages"] if p != doc_id]
        assert len(others) == 2 and all(p in topics for p in others)
        assert prompt.endswith(f"Question: Which number is lucky in village {doc_id[1:]}?")
    rc, again, _ = run_cli(argv + ["--mode", "bm25", "--out", str(tmp_path / "again.jsonl")], capsys)
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()  # the seed fixes every choice
    argv.append("--force")  # the refusals below are the ones they name, not raft.jsonl existing
    rc, _, err = run_cli(argv + ["--oracle-fraction", "1.5"], capsys)
    assert_user_error(rc, err, "--oracle-fraction")
    qa.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    rc, _, err = run_cli(argv, capsys)
    assert_user_error(rc, err, "qa.jsonl:1", "no document field")


def test_retrieval_and_answer_scores_equal_hand_computed_values():
    from strop.rag import scores

    ranked = ["x", "g1", "x", "g2", "g1"]
    gold = {"g1", "g2", "g3"}
    assert scores.recall_at_k(ranked, gold, 1) == 0 and scores.recall_at_k(ranked, gold, 4) == pytest.approx(
        2 / 3
    )
    assert scores.reciprocal_rank(ranked, gold) == 0.5 and scores.reciprocal_rank(["x"], gold) == 0
    dcg = 1 / math.log2(3) + 1 / math.log2(5)  # g1 at rank 2, g2 at 4; g1 again at 5 earns nothing
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert scores.ndcg_at_k(ranked, gold, 5) == pytest.approx(dcg / ideal)
    assert scores.ndcg_at_k(["g1"], {"g1"}, 3) == 1.0
    assert scores.exact_match("The Eiffel tower!", "eiffel  Tower") == 1.0
    assert scores.token_f1("the big red dog", "a red dog barked") == pytest.approx(
        2 * (2 / 3) * (2 / 3) / (4 / 3)
    )
    assert scores.token_f1("", "") == 1.0 and scores.token_f1("x", "") == 0.0
    ref = "Insulin lowers blood sugar"  # content words: insulin, lowers, blood, sugar
    passages = [
        "Cats sleep.",
        "Insulin is a hormone that lowers blood sugar.",
        "Sugar is sweet; blood is red.",
    ]
    assert scores.context_recall(passages, ref) == 1.0
    assert scores.context_recall(passages[:1], ref) == 0.0
    # relevant: passage 2 (4/4 words) and 3 (2/4 = the 0.5 threshold): precision@2 = 1/2, @3 = 2/3
    assert scores.context_precision(passages, ref) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_rag_eval_scores_each_mode(tiny_bert, tmp_path, capsys):
    index = build_index(tmp_path, tiny_bert, capsys, DOCS)
    qs = tmp_path / "qs.jsonl"
    qs.write_text(
        json.dumps({"question": "Which planet is red?", "doc_id": "space", "answer": "Mars is red"})
        + "\n"
        + json.dumps({"question": "What does bread need?", "doc_ids": ["food"]})
        + "\n"
    )
    rc, out, err = run_cli(
        ["rag", "eval", "--index", index, str(qs), "--k", "1,3", "--modes", "bm25,dense", "--json"], capsys
    )
    assert rc == 0, err
    result = json.loads(out)
    assert result["with_gold"] == 2 and result["with_answer"] == 1
    bm25 = result["modes"]["bm25"]
    assert bm25["recall@1"] == bm25["mrr"] == bm25["ndcg@3"] == 1.0
    assert bm25["context_recall@1"] == 1.0  # "mars", "red" are in the top passage
    assert set(result["modes"]["dense"]) == set(bm25)
    rc, out, err = run_cli(["rag", "eval", "--index", index, str(qs), "--modes", "bm25"], capsys)
    assert rc == 0 and "| bm25 | 1.000 |" in out
    rc, _, err = run_cli(["rag", "eval", "--index", index, str(qs), "--k", "0"], capsys)
    assert_user_error(rc, err, "--k")
    rc, _, err = run_cli(["rag", "eval", "--index", index, str(qs), "--modes", "fuzzy"], capsys)
    assert_user_error(rc, err, "--modes", "'fuzzy'")


def test_rag_compare_answers_with_every_arm_and_scores_against_base(
    tiny_llama, tiny_bert, alpaca_file, tmp_path, tmp_path_factory, capsys
):
    from conftest import tiny_config
    from strop.api import LanguageModel
    from strop.rag import scores
    from strop.rag.prompt import with_context
    from strop.recipes.run import train
    from test_models import _lively_dir

    index = build_index(tmp_path, tiny_bert, capsys, DOCS)
    run = train(
        tiny_config(tiny_llama, alpaca_file, tmp_path / "runs", train={"max_steps": 2}), show_progress=False
    )
    qs = tmp_path / "qs.jsonl"
    qs.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"question": "Which planet has rings?", "answer": "Saturn", "doc_id": "space"},
                {"question": "What does bread need?", "answer": "flour and yeast", "doc_id": "food"},
                {"question": "Do whales sing?", "answer": "yes, under water", "doc_id": "sea"},
            ]
        )
    )
    out = tmp_path / "cmp"
    lively = str(_lively_dir(tmp_path_factory.getbasetemp(), "llama"))  # a base whose replies are not empty
    argv = [
        "rag",
        "compare",
        str(qs),
        "--index",
        index,
        "--base",
        lively,
        "--tuned",
        str(run.run_dir),
        "--raft",
        str(run.run_dir),
        "--out",
        str(out),
        "--top-k",
        "1",
        "--mode",
        "bm25",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    result = json.loads((out / "compare.json").read_text())
    names = [a["arm"] for a in result["arms"]]
    assert names == ["base", "base + RAG", "fine-tuned", "fine-tuned + RAG", "RAFT + RAG"]
    assert result["retrieval_recall"] == 1.0
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["sources"][0]["doc_id"] for a in answers] == ["space", "food", "sea"]
    hits = Retriever(index).search("Which planet has rings?", 1, "bm25")
    want = LanguageModel(lively, device="cpu").generate(
        [[{"role": "user", "content": with_context("Which planet has rings?", hits)}]], 4, 0.0, 1.0, 1
    )
    assert answers[0]["base + RAG"] == want[0] and all(a["base"] and a["base + RAG"] for a in answers)
    assert result["arms"][0]["scores"]["embedding"] != 0 and result["arms"][0]["cost"]["answer_tokens"] > 0
    refs = [a["reference"] for a in answers]
    for arm in result["arms"]:
        f1 = sum(scores.token_f1(a[arm["arm"]], r) for a, r in zip(answers, refs, strict=True)) / 3
        assert arm["scores"]["token_f1"] == pytest.approx(f1)
        if arm["arm"] != "base":
            d = arm["vs_base"]["token_f1"]
            base_f1 = result["arms"][0]["scores"]["token_f1"]
            assert d["diff"] == pytest.approx(f1 - base_f1) and d["ci"][0] <= d["diff"] <= d["ci"][1]
        assert (arm["cost"]["index_seconds"] is not None) == arm["rag"]
        assert (
            arm["cost"]["train_seconds"] is None
            if arm["target"] == lively
            else arm["cost"]["train_seconds"] > 0
        )
    rag_prompt = result["arms"][1]["cost"]["prompt_tokens"]
    assert rag_prompt > result["arms"][0]["cost"]["prompt_tokens"]  # the passages cost prompt tokens
    assert "vs_base_rag" in result["arms"][3] and "vs_base_rag" in result["arms"][4]
    md = (out / "compare.md").read_text()
    assert "| RAFT + RAG |" in md and "**Verdict.**" in md and result["verdict"] in md
    rc, _, err = run_cli(argv[:7] + ["--tuned", str(tmp_path), "--out", str(tmp_path / "c2")], capsys)
    assert_user_error(rc, err, "not a strop run directory")
    from test_judge import scripted_judge

    with scripted_judge(lambda prompt: "[[A]]") as judge:  # a judge that always names the first answer
        rc, stdout, err = run_cli([*argv, "--force", "--judge", judge.url], capsys)
        assert rc == 0, err
        asked = judge.prompts
    j = json.loads((out / "compare.json").read_text())["judge"]
    assert list(j["arms"]) == names[1:] and j["judge"]["model"] == "scripted"
    for arm in j["arms"].values():  # both orders asked, so a first-position judge is a tie every time
        assert arm["win_rate"] == 0.5 and arm["position_bias"] == 1.0 and arm["judged"] == 3
    assert all("[Reference Answer]" in p for p in asked)  # the reference is shown
    md = (out / "compare.md").read_text()
    assert "| RAFT + RAG | 0.500 (0.500 to 0.500) | 3 of 3 | 3 | 1.00 | 0 |" in md
    assert "The judge itself was not checked" in md


def _arm(name: str, f1: float, lo: float, hi: float) -> dict:
    d = {"token_f1": {"diff": f1 - 0.2, "ci": [lo, hi]}}
    return {"arm": name, "scores": {"token_f1": f1}, "vs_base": {} if name == "base" else d, "vs_base_rag": d}


def test_the_verdict_names_a_clear_winner_and_refuses_an_unclear_one():
    from strop.recipes.rag_compare import verdict

    clear = [
        _arm("base", 0.2, 0, 0),
        _arm("base + RAG", 0.5, 0.2, 0.4),
        _arm("fine-tuned", 0.21, -0.05, 0.07),
    ]
    text = verdict(clear, "token_f1")
    assert text.startswith("base + RAG answers best: token_f1 0.500 against the base model's 0.200, +0.300")
    assert "Retrieval alone helps" in text and "Fine-tuning alone makes no clear difference" in text
    unclear = [_arm("base", 0.2, 0, 0), _arm("base + RAG", 0.25, -0.01, 0.1)]
    assert verdict(unclear, "token_f1").startswith("No arm is clearly better than the base model")


def test_raft_oracle_from_the_index_is_the_documents_best_chunk(embedder, tmp_path):
    from strop.data.read import Row
    from strop.rag.raft import raft_rows

    index = ix.Index(str(embedder.name), size=6, overlap=0)
    ix.update(index, corpus(tmp_path, DOCS), CountingEmbedder(embedder))
    retriever = Retriever(index, embedder)
    row = Row({"doc_id": "space", "question": "What has rings of ice?", "answer": "Saturn"}, "qa.jsonl:1")
    (built,) = raft_rows([row], retriever, oracle_fraction=1.0, distractors=1, mode="bm25")
    prompt = built["messages"][0]["content"]
    assert "(space) Saturn has rings of ice." in prompt and "Mars" not in prompt  # its second chunk only
    assert built["raft"]["oracle"] and len(built["raft"]["passages"]) == 2


def test_eval_with_rag_scores_answers_to_the_augmented_prompts(tiny_llama, tiny_bert, tmp_path, capsys):
    index = build_index(tmp_path, tiny_bert, capsys, DOCS)
    data = tmp_path / "qa.jsonl"
    data.write_text(
        json.dumps({"instruction": "Which planet has rings of ice?", "output": "Saturn"})
        + "\n"
        + json.dumps({"instruction": "What does bread need?", "output": "Flour and yeast"})
        + "\n"
    )
    out = tmp_path / "ev"
    argv = [
        "eval",
        str(tiny_llama),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]
    rc, stdout, err = run_cli(argv + ["--rag", index, "--top-k", "1", "--rag-mode", "bm25"], capsys)
    assert rc == 0, err
    found = [json.loads(line) for line in (out / "sources.jsonl").read_text().splitlines()]
    assert [f["sources"][0]["doc_id"] for f in found] == ["space", "food"]
    assert found[0]["question"] == "Which planet has rings of ice?"
    with_rag = json.loads((out / "summary.json").read_text())
    rc, _, err = run_cli(
        argv[:4] + ["--out", str(tmp_path / "plain"), "--max-new-tokens", "4", "--device", "cpu"], capsys
    )
    assert rc == 0, err
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert with_rag["loss"] != plain["loss"]  # the reference was scored after a different prompt
    assert not (tmp_path / "plain" / "sources.jsonl").exists()


def test_serve_with_rag_answers_with_passages_and_returns_their_sources(
    tiny_bert, tmp_path, tmp_path_factory, capsys
):
    from strop.models.generate import generate
    from strop.models.inference import load_for_inference
    from strop.rag.prompt import augment
    from test_models import _lively_dir
    from test_serve import running

    index = build_index(tmp_path, tiny_bert, capsys, DOCS)
    lively = _lively_dir(tmp_path_factory.getbasetemp(), "llama")
    retriever = Retriever(index)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Which planet has rings of ice?"},
    ]
    with running(lively, rag=(retriever, 1, "bm25")) as s:
        reply = s.client.chat.completions.create(
            model=s.client.models.list().data[0].id, messages=conversation, max_tokens=6, temperature=0
        )
        assert reply.model_extra["sources"][0]["doc_id"] == "space"
        stream = s.client.chat.completions.create(
            model=reply.model, messages=conversation, max_tokens=6, temperature=0, stream=True
        )
        chunks = list(stream)
        assert chunks[0].model_extra["sources"][0]["doc_id"] == "space"
        assert all("sources" not in (c.model_extra or {}) for c in chunks[1:])
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    loaded = load_for_inference(str(lively), device="cpu")
    hits = retriever.search("Which planet has rings of ice?", 1, "bm25")
    want = generate(loaded.model, loaded.template, [augment(conversation, hits)], max_new_tokens=6)[0]
    assert reply.choices[0].message.content.strip() == want == streamed.strip()  # generate() strips


def test_approximate_search_finds_what_exact_search_finds():
    from strop.rag.chunk import Chunk

    pytest.importorskip("usearch")
    gen = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(500, 16, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(20, 16, generator=gen), dim=1)
    chunks = [Chunk(f"d{i}", 0, 0, 1, f"text {i}", 1) for i in range(500)]
    index = ix.Index("fake", 8, 0, {f"d{i}": {"source": "s"} for i in range(500)}, chunks, vectors)

    class Fixed:  # the "encoder": query text i -> the i-th random query vector
        def embed(self, texts):
            return queries[[int(t) for t in texts]]

    exact, approx = Retriever(index, Fixed()), Retriever(index, Fixed(), approximate=True)
    overlap = []
    for i in range(20):
        a = [(h.doc_id, round(h.score, 5)) for h in exact.search(str(i), top_k=5, mode="dense")]
        b = [(h.doc_id, round(h.score, 5)) for h in approx.search(str(i), top_k=5, mode="dense")]
        assert b[0] == a[0]  # the nearest chunk, with its cosine
        overlap.append(len(set(a) & set(b)) / 5)
    assert sum(overlap) / len(overlap) >= 0.95
