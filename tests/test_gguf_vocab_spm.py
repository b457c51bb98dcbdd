"""SentencePiece-style vocabularies in GGUF export (Gemma, Llama 2, Phi-3: byte-fallback BPE, '▁' for
spaces): llama.cpp tokenizes the run's chat text as the transformers tokenizer does, transformers' GGUF
reader gets the same tokens back, what llama.cpp would tokenize differently is refused by name, and the
Modelfile carries Gemma's turn format (BOS once, the system message folded into the first user turn).

The tokenizer is made the way every SentencePiece-converted tokenizer is: a vocabulary in score order
(here learned by a BPE trainer over chat-like text) whose merges are derived from it by transformers'
`generate_merges`, plus the 256 byte tokens and Gemma's special tokens."""

from __future__ import annotations

import pytest
import torch

from strop.core.errors import StropError
from strop.data.template import ChatTemplate
from strop.export.gguf_file import write_gguf
from strop.export.gguf_vocab import BYTE, CONTROL, NORMAL, USER_DEFINED, describe
from strop.models.catalogue import GEMMA3_TEMPLATE
from test_export_gguf import need_llama_cpp

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Arr! Seven times eight be 56, matey. Yo ho ho!",
    "Write a short poem about the sea. The sea is wide and blue and deep.",
    "user model assistant system question answer\n\nthe theme then there these",
    "aaaa bbbb ==== ---- 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) . , ! ? : ; ' \"",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer  like a pirate."},
        {"role": "user", "content": "Seven times eight?"},
        {"role": "assistant", "content": "Arr! 56, matey.\n\nYo ho ho!"},
        {"role": "user", "content": "Café ☃ naïve — 東京? <think>"},
    ],
]
TEXTS = [
    "The sea is wide and blue.",
    " leading space, then  two  and   three spaces",
    "lines\nand\n\nparagraphs\n\n\n",
    "aaaaaaa ======== ---------- thethethe",
    "bytes for what the vocabulary lacks: ☃ 東京 🙂 é",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
]
PREFIX = {  # how each style puts '▁' before text, and what llama.cpp is told
    "gemma": False,  # normalizer Replace(' ', '▁')
    "llama2": True,  # normalizer Prepend('▁') + Replace(' ', '▁'), per segment
    "never": False,  # Metaspace(prepend_scheme='never', split=False)
}


def spm_tokenizer(style: str = "gemma", merges: str = "sentencepiece", normalized: bool = False):
    """A tiny SentencePiece-style tokenizer. `merges='trainer'` keeps the BPE trainer's own merges, which
    are not what SentencePiece implies (export must refuse them)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    space = normalizers.Replace(" ", "\u2581")
    learner = Tokenizer(models.BPE())
    learner.normalizer = space
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [*SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), "\n", "\n\n", "<think>"]
    vocab = {t: i for i, t in enumerate(pieces)}
    for token, _ in learned:
        vocab.setdefault(token, len(vocab))
    if merges == "trainer":
        pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _trainer_merges(learner)]
    else:  # as transformers converts a SentencePiece model: every split of a token, best token first
        pairs = generate_merges(vocab, {t: -float(i) for t, i in vocab.items()})
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    )
    if style == "gemma":
        backend.normalizer = space
    elif style == "llama2":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), space])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=style, split=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<mask>", "<start_of_turn>", "<end_of_turn>"],
    )
    # Gemma's user-defined tokens: matched whole in the raw text, not special
    tok.add_tokens([AddedToken(t, normalized=normalized) for t in ("\n", "\n\n", "<think>")])
    return tok


def _trainer_merges(learner) -> list:
    import json

    return json.loads(learner.to_str())["model"]["merges"]


def tiny_model(arch: str, vocab_size: int):
    import transformers as T

    torch.manual_seed(0)
    if arch == "gemma3_text":
        cfg = T.Gemma3TextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=6,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=4,
            max_position_embeddings=256,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    else:
        cfg = T.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def export(tok, style: str, path):
    """(the GGUF path, the template) for a tiny model of the style's family."""
    template = ChatTemplate(tok, GEMMA3_TEMPLATE)
    model = tiny_model("gemma3_text" if style == "gemma" else "llama", len(tok))
    write_gguf(model, describe(tok, len(tok), template.stop_ids), template.source, path, "f16", "spm")
    return path, template


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("style", list(PREFIX))
def test_llama_cpp_tokenizes_chat_text_as_the_tokenizer_does(style, tmp_path):
    need_llama_cpp()
    from llama_cpp import Llama

    tok = spm_tokenizer(style)
    path, template = export(tok, style, tmp_path / f"{style}.gguf")
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        texts = [template.render(c, add_generation_prompt=True) for c in CONVERSATIONS] + TEXTS
        for text in texts:
            theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert theirs == ids(tok, text), (text, tok.convert_ids_to_tokens(theirs))
        for conversation in CONVERSATIONS:  # the very ids strop generates after
            prompt = template.render(conversation, add_generation_prompt=True)
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == template.prompt_ids(
                conversation
            )
        # byte tokens come back as their bytes, so what llama.cpp writes is the text
        snowman = ids(tok, "☃ é")
        assert {"<0xE2>", "<0x98>", "<0x83>"} <= set(tok.convert_ids_to_tokens(snowman))
        assert llm.detokenize(snowman).decode().strip() == "☃ é"
        assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id
    finally:
        llm.close()


def test_the_file_holds_a_scored_llama_vocabulary_and_transformers_reads_it_back(tmp_path):
    import gguf
    from transformers import AutoTokenizer

    tok = spm_tokenizer("gemma")
    path, template = export(tok, "gemma", tmp_path / "gemma.gguf")
    fields = gguf.GGUFReader(str(path)).fields
    value = {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}
    assert value["tokenizer.ggml.model"] == "llama" and value["tokenizer.ggml.pre"] == "default"
    assert (
        value["tokenizer.ggml.add_space_prefix"] is False and value["tokenizer.ggml.add_bos_token"] is False
    )
    vocab, types, scores = tok.get_vocab(), value["tokenizer.ggml.token_type"], value["tokenizer.ggml.scores"]
    assert value["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.__getitem__)
    assert all(types[vocab[f"<0x{b:02X}>"]] == BYTE for b in range(256))
    assert types[vocab["<end_of_turn>"]] == CONTROL and types[vocab["<think>"]] == USER_DEFINED
    assert value["tokenizer.ggml.eot_token_id"] == vocab["<end_of_turn>"]
    # a token made by an earlier merge scores higher: llama.cpp joins the best-scored pair first
    merged = [m.replace(" ", "") for m in value["tokenizer.ggml.merges"]]
    first = [scores[vocab[t]] for t in dict.fromkeys(merged)]
    assert first == sorted(first, reverse=True) and len(set(first)) == len(first)
    assert sum(t == NORMAL for t in types) == len(vocab) - 256 - len(tok.added_tokens_decoder)

    back = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert back.get_vocab() == vocab
    for text in [template.render(c, add_generation_prompt=True) for c in CONVERSATIONS] + TEXTS:
        assert ids(back, text) == ids(tok, text), text


def test_merges_sentencepiece_would_not_make_are_refused_by_name():
    """A BPE trained by `tokenizers` has merges llama.cpp's score-ordered joining does not reproduce."""
    tok = spm_tokenizer("gemma", merges="trainer")
    with pytest.raises(StropError, match="llama.cpp's SentencePiece vocabulary"):
        describe(tok, len(tok), {tok.eos_token_id})


@pytest.mark.parametrize("scheme", ["first", "always"])
def test_a_space_prefix_llama_cpp_would_place_differently_is_refused_by_name(scheme):
    """Metaspace's 'first' prefixes only text at the very start (llama.cpp: after special tokens too);
    'always' adds no '▁' to text that starts with a space (llama.cpp: one more)."""
    tok = spm_tokenizer(scheme)
    with pytest.raises(StropError, match=f"prepend_scheme '{scheme}'"):
        describe(tok, len(tok), {tok.eos_token_id})


def test_an_added_token_the_prefix_does_not_see_is_refused_by_name():
    """A normalized added token splits the text after the prefix was put on; llama.cpp prefixes after it."""
    tok = spm_tokenizer("llama2", normalized=True)
    with pytest.raises(StropError, match="matched after normalizing"):
        describe(tok, len(tok), {tok.eos_token_id})


def test_missing_byte_tokens_are_refused_by_name():
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    bpe = models.BPE(
        vocab={"<unk>": 0, "a": 1, "<0x41>": 2}, merges=[], byte_fallback=True, unk_token="<unk>"
    )
    backend = Tokenizer(bpe)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>")
    with pytest.raises(StropError, match="lacks 255 byte tokens"):
        describe(tok, 3, set())


@pytest.mark.parametrize("system", [None, "Talk like a pirate."])
def test_the_modelfile_carries_gemmas_turn_format_with_the_system_folded_in(system):
    """Gemma's template writes BOS once and folds a system message into the first user turn; the
    Modelfile's Go template does the same (checked by re-rendering conversations both ways)."""
    from strop.export.ollama import bare_with_system, measure, modelfile, render

    tok = spm_tokenizer("gemma")
    pieces = measure(ChatTemplate(tok, GEMMA3_TEMPLATE, system))
    assert pieces is not None and pieces.head["system"] == pieces.head["user"] == "<bos><start_of_turn>user\n"
    assert pieces.joint[("system", "user")] == "\n\n"  # folded into the first user turn
    bare = ChatTemplate(tok, GEMMA3_TEMPLATE)
    for conversation in CONVERSATIONS:
        assert render(pieces, conversation, system) == bare_with_system(bare, conversation, system)
    text, translated = modelfile("g.gguf", ChatTemplate(tok, GEMMA3_TEMPLATE, system), ["<end_of_turn>"])
    assert translated and 'PARAMETER stop "<end_of_turn>"' in text
