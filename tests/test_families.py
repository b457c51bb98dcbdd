"""The family matrix (issue 32), template side: for every family's real chat template the training
mask equals a hand-derived one, the inference prompt equals the ids training put before each reply,
one full and one LoRA step train, generation stops at the family's end-of-turn, and what
assistant-only loss cannot honour is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, write_jsonl
from family_models import CHAT_FAMILIES, FAMILIES, build_model, build_tokenizer, save
from strop.core.errors import ConfigError, DataError, StropError
from strop.data.template import ChatTemplate, resolve_template
from strop.models.generate import generate

SYSTEM = "Be a pirate."
TURNS = [("What is 7 times 8?", "Arr! 56, matey."), ("Why is the sky blue?", "The sea be blue, matey.")]
QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
NAMES = list(FAMILIES)


def conversation(system: str | None, turns) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a))]


def expected(name: str, system: str | None, turns) -> list[tuple[str, bool]]:
    """The rendering written out by hand from each family's template: (text, carries loss) pieces.
    Loss lies on each reply and its end-of-turn (with the newline the template closes the turn with),
    never on a system/user turn, a role header or text after the last turn."""
    n = len(turns)
    out: list[tuple[str, bool]] = []
    if name == "llama3":
        out.append(
            (
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                f"Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{system or ''}<|eot_id|>",
                False,
            )
        )
        for q, a in turns:
            head = f"<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
            out += [
                (head + "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
                (a + "<|eot_id|>", True),
            ]
    elif name in ("qwen2.5", "qwen3", "gpt2", "gpt_neox"):  # ChatML (GPT-2/NeoX: strop's fallback)
        system = system or (QWEN_DEFAULT if name == "qwen2.5" else None)
        if system:
            out.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
        for i, (q, a) in enumerate(turns):
            out.append((f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", False))
            if name == "qwen3":  # only the last reply keeps a think block; earlier ones are context
                last = i == n - 1
                out.append((("<think>\n\n</think>\n\n" if last else "") + a + "<|im_end|>\n", last))
            else:  # GPT-2/NeoX have no <|im_end|> token: strop appends their EOS so a reply ends
                out.append((a + "<|im_end|>\n" + ("<|endoftext|>" if name.startswith("gpt") else ""), True))
    elif name in ("gemma2", "gemma3"):
        out.append(("<bos>", False))
        for i, (q, a) in enumerate(turns):
            prefix = f"{system}\n\n" if system and i == 0 else ""  # Gemma 3 folds the system turn
            out.append((f"<start_of_turn>user\n{prefix}{q}<end_of_turn>\n<start_of_turn>model\n", False))
            out.append((a + "<end_of_turn>\n", True))
    elif name == "mistral":
        out.append(("<s>", False))
        for q, a in turns:
            out += [(f"[INST] {q} [/INST]", False), (a + "</s>", True)]
    elif name == "mistral_v0.3":  # the system message rides in the last user turn only
        out.append(("<s>", False))
        for i, (q, a) in enumerate(turns):
            last = i == n - 1  # with a system message, inference prompts an earlier reply otherwise:
            prefix = f"{system}\n\n" if system and last else ""  # that reply is context, untrained
            out += [(f"[INST] {prefix}{q}[/INST]", False), (f" {a}</s>", last or not system)]
    elif name == "phi3":
        if system:
            out.append((f"<|system|>\n{system}<|end|>\n", False))
        for q, a in turns:
            out += [(f"<|user|>\n{q}<|end|>\n<|assistant|>\n", False), (a + "<|end|>\n", True)]
        out.append(("<|endoftext|>", False))  # closes the conversation; the model stops at <|end|>
    elif name == "olmo2":
        out.append(("<|endoftext|>" + (f"<|system|>\n{system}\n" if system else ""), False))
        for i, (q, a) in enumerate(turns):
            out += [
                (("\n" if i else "") + f"<|user|>\n{q}\n<|assistant|>\n", False),
                (a + "<|endoftext|>", True),
            ]
    merged: list[tuple[str, bool]] = []
    for text, flag in out:
        if merged and merged[-1][1] == flag:
            merged[-1] = (merged[-1][0] + text, flag)
        else:
            merged.append((text, flag))
    return merged


def runs(tokenizer, enc) -> list[tuple[str, bool]]:
    """Decoded runs of consecutive tokens with the same mask value."""
    out: list[tuple[list[int], bool]] = []
    for i, m in zip(enc.ids, enc.trained, strict=True):
        if out and out[-1][1] == m:
            out[-1][0].append(i)
        else:
            out.append(([i], m))
    return [(tokenizer.decode(ids), m) for ids, m in out]


@pytest.fixture(scope="module")
def tokenizers():
    return {name: build_tokenizer(f) for name, f in FAMILIES.items()}


def template_for(tok) -> ChatTemplate:
    return ChatTemplate(tok, resolve_template("auto", tok)[1])


def system_for(name: str) -> str | None:
    return None if FAMILIES[name].system == "refused" else SYSTEM


@pytest.mark.parametrize("name", NAMES)
def test_mask_is_each_reply_and_its_end_of_turn(name, tokenizers):
    tok = tokenizers[name]
    for system in {system_for(name), None}:
        for turns in (TURNS[:1], TURNS):
            enc = template_for(tok).encode(conversation(system, turns))
            assert runs(tok, enc) == expected(name, system, turns), (system, len(turns))


@pytest.mark.parametrize("name", NAMES)
def test_inference_prompt_is_what_training_put_before_each_reply(name, tokenizers):
    template = template_for(tokenizers[name])
    conv = conversation(system_for(name), TURNS)
    enc = template.encode(conv)
    starts = [i for i in range(len(enc.ids)) if enc.trained[i] and (i == 0 or not enc.trained[i - 1])]
    replies = [k for k, m in enumerate(conv) if m["role"] == "assistant"][-len(starts) :]
    for start, k in zip(starts, replies, strict=True):
        assert template.prompt_ids(conv[:k]) == enc.ids[:start], k


@pytest.mark.parametrize(
    "name, message", [("gemma2", "System role not supported"), ("mistral", "roles must alternate")]
)
def test_a_template_without_a_system_role_refuses_one_by_its_own_message(name, message, tokenizers):
    tok = tokenizers[name]
    with pytest.raises(DataError, match=message):
        template_for(tok).encode(conversation(SYSTEM, TURNS))
    with pytest.raises(DataError, match=message):  # data.system_prompt adds one to every conversation
        ChatTemplate(tok, tok.chat_template, system_prompt=SYSTEM).encode(conversation(None, TURNS))


def test_qwen3_trains_the_think_block_of_the_last_reply_and_keeps_earlier_replies_as_context(tokenizers):
    """Qwen 3's template drops the reasoning of replies before the last user turn. Training such a reply
    without its reasoning would teach the model to answer without thinking, which inference never
    asks of it; so that reply is context (untrained) and the last one is trained with its think block,
    after exactly the prompt inference renders (earlier reasoning dropped)."""
    tok = tokenizers["qwen3"]
    template = template_for(tok)
    first = "<think>\nSeven eights.\n</think>\n\nArr! 56, matey."
    last = "<think>\nLight scatters.\n</think>\n\nThe sea be blue, matey."
    conv = conversation(SYSTEM, [(TURNS[0][0], first), (TURNS[1][0], last)])
    enc = template.encode(conv)
    assert enc.context_turns == 1
    pieces = runs(tok, enc)
    assert [p for p, m in pieces if m] == [last + "<|im_end|>\n"]
    prompt = "".join(p for p, m in pieces if not m)
    assert "Arr! 56, matey.<|im_end|>" in prompt and "Seven eights" not in tok.decode(enc.ids)
    start = enc.trained.index(True)
    assert template.prompt_ids(conv[:-1]) == enc.ids[:start]
    assert tok.decode(template.prompt_ids(conv[:-1])).endswith("<|im_start|>assistant\n")
    # one turn: the reply is trained with its reasoning; the tokens of <think> are the added ones
    enc = template.encode(conv[:3])
    assert enc.context_turns == 0 and [p for p, m in runs(tok, enc) if m] == [first + "<|im_end|>\n"]
    assert tok.convert_tokens_to_ids("<think>") in enc.ids


@pytest.mark.parametrize(
    "name", [f.name for f in CHAT_FAMILIES if not f.name.startswith("mistral")] + ["gpt2"]
)
def test_a_template_without_its_generation_prompt_is_refused_by_name(name, tokenizers):
    """Without add_generation_prompt the reply's role header would carry loss and chat would not ask for
    a reply (Mistral's template has none and needs none: a reply follows [/INST])."""
    tok = tokenizers[name]
    broken = resolve_template("auto", tok)[1].replace("add_generation_prompt", "false")
    with pytest.raises(DataError, match="data.template"):
        ChatTemplate(tok, broken).encode(conversation(system_for(name), TURNS))


@pytest.mark.parametrize("name", NAMES)
def test_a_tokenizer_without_an_end_of_sequence_token_is_refused_by_name(name):
    tok = build_tokenizer(FAMILIES[name])
    tok.eos_token = None
    with pytest.raises(ConfigError, match=r"^model\.name: .*no end-of-sequence token"):
        template_for(tok)


def biased(model, tokens: list[int]) -> None:
    """Make greedy decoding pick `tokens` in turn (the last one from then on), whatever the weights."""
    calls = iter(range(10_000))

    def hook(module, args, logits):
        step = next(calls)
        bias = torch.zeros(logits.shape[-1])
        bias[tokens[min(step, len(tokens) - 1)]] = 1e4
        return logits + bias

    model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("name", NAMES)
def test_generation_stops_at_the_family_end_of_turn(name, tokenizers):
    family, tok = FAMILIES[name], tokenizers[name]
    template = template_for(tok)
    words = tok("Arr matey", add_special_tokens=False)["input_ids"]
    after = tok(" Yo ho", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids(family.end_of_turn or tok.eos_token)
    assert end in template.stop_ids
    model = build_model(family, tok).eval()
    biased(model, [*words, end, *after])  # what would follow if decoding went on past the end
    (reply,) = generate(model, template, [conversation(system_for(name), TURNS[:1])], max_new_tokens=12)
    assert reply == "Arr matey"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family-data")
    convs = [
        conversation(system, [(f"What is {a} times {b}?", f"Arr! {a * b}, matey."), TURNS[1]])
        for a in range(2, 6)
        for system in (SYSTEM, None)
        for b in (3,)
    ]
    files = {}
    for refused in (False, True):
        keep = [c for c in convs if not refused or c[0]["role"] != "system"]
        files[refused] = write_jsonl(folder / f"rows-{refused}.jsonl", [{"messages": c} for c in keep])
    return files


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("name", NAMES)
def test_a_full_and_a_lora_step_train_every_family(
    name, method, rows, tmp_path, tmp_path_factory, monkeypatch
):
    from strop.recipes import skeleton
    from strop.recipes.sft import train

    monkeypatch.setattr(skeleton, "write_run_report", lambda run_dir: None)  # plots: tested elsewhere

    family = FAMILIES[name]
    folder = save(family, tmp_path_factory.getbasetemp() / f"family-{name}")
    data = rows[family.system == "refused"]
    cfg = tiny_config(
        folder,
        data,
        tmp_path / "out",
        method={"name": method},
        train={"batch_size": 8, "max_steps": 2},
    )
    cfg["data"].update(val_fraction=0.0, max_length=256)
    if method == "full":
        del cfg["method"]["lora"]
    run = train(cfg, show_progress=False)
    steps = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 2 and losses[1] < losses[0], losses  # the same 8 rows twice: it learned


def test_train_refuses_a_template_without_a_generation_prompt_by_name(rows, tmp_path, tmp_path_factory):
    from strop.recipes.sft import train

    folder = save(FAMILIES["qwen2.5"], tmp_path_factory.getbasetemp() / "family-qwen2.5")
    broken = FAMILIES["qwen2.5"].template.replace("add_generation_prompt", "false")
    cfg = tiny_config(folder, rows[False], tmp_path / "out")
    cfg["data"].update(template=broken, max_length=256)
    with pytest.raises(StropError, match="data.template"):
        train(cfg, show_progress=False)
