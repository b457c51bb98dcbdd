"""The family matrix (issue 32), after export: for every chat family, a tiny model exported to GGUF
carries the family's template and stop tokens; llama.cpp (llama-cpp-python, chat from the file's own
template) builds the very prompt ids strop builds for a multi-turn chat and stops at the family's
end-of-turn; and the Modelfile's Go template, executed by Go's own text/template (what Ollama runs),
renders the prompt the Jinja template renders."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from family_models import CHAT_FAMILIES, build_tokenizer, save
from strop.data.template import ChatTemplate, resolve_template
from strop.export.ollama import with_system
from strop.export.ship import export
from strop.models.load import load_tokenizer
from test_export_gguf import need_llama_cpp

NAMES = [f.name for f in CHAT_FAMILIES]
SYSTEM = "Be a pirate."
TURNS = [("What is 7 times 8?", "Arr! 56, matey."), ("Why is the sky blue?", "The sea be blue, matey.")]
# what llama.cpp computes alike: Gemma's query scale and layer pattern as llama.cpp fixes them, no window
EXPORTABLE = {
    "gemma2": dict(query_pre_attn_scalar=8),
    "gemma3": dict(query_pre_attn_scalar=8, num_hidden_layers=6, layer_types=None),
    "mistral": dict(sliding_window=None),
}
GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	var in struct {
		Template string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	messages := make([]*Message, len(in.Messages))
	for i := range in.Messages {
		messages[i] = &in.Messages[i]
	}
	t := template.Must(template.New("").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": messages, "System": ""}); err != nil {
		panic(err)
	}
}
"""


def chat(system: str | None, turns, ask: str = "And the rum?") -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    body = [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a))]
    return [*head, *body, {"role": "user", "content": ask}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny model exported to f16 GGUF with its Modelfile, in a folder of its own (the
    model folder it came from is `model/` beside it)."""
    root = tmp_path_factory.mktemp("family-gguf")
    out = {}
    for family in CHAT_FAMILIES:
        config = {**family.config, **EXPORTABLE.get(family.name, {})}
        # a neutral folder name: llama.cpp strips whitespace after Phi-3's special tokens when the model's
        # name says phi3, as Phi-3's own tokenizer does (rstrip); this tiny tokenizer does not
        folder = save(dataclasses.replace(family, config=config), root / family.name / f"tiny-{len(out)}")
        out[family.name] = export(str(folder), "gguf", "f16", str(root / family.name / "model.gguf")).path
    return out


def template_of(gguf: Path) -> ChatTemplate:
    """The template strop trains and chats with, from the tokenizer as saved in the model folder (what
    the export read; transformers gives Qwen's its own pre-tokenizer and NFC on loading)."""
    tok = load_tokenizer(str(next(gguf.parent.glob("tiny-*"))))
    return ChatTemplate(tok, resolve_template("auto", tok)[1])


def has_system(name: str) -> bool:
    return next(f for f in CHAT_FAMILIES if f.name == name).system not in ("refused", "last")


@pytest.mark.parametrize("name", NAMES)
def test_the_gguf_carries_the_template_and_the_end_of_turn(name, exported):
    import gguf

    family = next(f for f in CHAT_FAMILIES if f.name == name)
    fields = gguf.GGUFReader(str(exported[name])).fields
    assert fields["tokenizer.chat_template"].contents() == family.template
    tok = build_tokenizer(family)
    end = tok.convert_tokens_to_ids(family.end_of_turn)
    ids = {
        fields[k].contents()
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if k in fields
    }
    assert end in ids, (end, ids)


@pytest.mark.parametrize("name", NAMES)
def test_llama_cpp_prompts_as_strop_does_and_stops_at_the_end_of_turn(name, exported):
    """llama-cpp-python's chat completion renders the file's own template and tokenizes it. For a first
    question the ids it feeds the model are strop's `prompt_ids`; for a longer chat the text is strop's
    and the ids are the tokenizer's for that whole text (llama.cpp, like Hugging Face's
    apply_chat_template, tokenizes the history whole, where strop keeps each reply's tokens as trained:
    at a reply's start a whitespace run may split differently). With decoding steered to write a reply,
    the family's end-of-turn and more text, llama.cpp returns only the reply."""
    need_llama_cpp()
    import numpy as np
    from llama_cpp import Llama, LogitsProcessorList

    family = next(f for f in CHAT_FAMILIES if f.name == name)
    template = template_of(exported[name])
    tok = template.tokenizer
    end = tok.convert_tokens_to_ids(family.end_of_turn)
    forced = [
        *tok("Arr matey", add_special_tokens=False)["input_ids"],
        end,
        *tok(" Yo ho", add_special_tokens=False)["input_ids"],
    ]

    def ask(llm, conversation) -> tuple[list[int], dict]:
        seen: dict = {}

        def steer(input_ids, scores):
            prompt = seen.setdefault("prompt", [int(i) for i in input_ids])
            steered = np.full_like(scores, -1e9)
            steered[forced[min(len(input_ids) - len(prompt), len(forced) - 1)]] = 1e9
            return steered

        reply = llm.create_chat_completion(
            messages=conversation,
            max_tokens=12,
            temperature=0.0,
            logits_processor=LogitsProcessorList([steer]),
        )
        return seen["prompt"], reply["choices"][0]

    system = SYSTEM if has_system(name) else None
    # the file's template, always: llama-cpp-python swaps three exact templates for built-in formats
    # (its mistral-instruct one relies on the file adding BOS, which strop's files leave to the template)
    llm = Llama(model_path=str(exported[name]), n_ctx=256, verbose=False, chat_format="chat_template.default")
    try:
        first = chat(system, [])
        ids, choice = ask(llm, first)
        assert ids == template.prompt_ids(first), (tok.decode(ids), tok.decode(template.prompt_ids(first)))
        assert choice["message"]["content"].strip() == "Arr matey" and choice["finish_reason"] == "stop"
        longer = chat(system, TURNS)
        ids, choice = ask(llm, longer)
        text = template.render(longer, add_generation_prompt=True)
        assert tok.decode(ids) == text and ids == tok(text, add_special_tokens=False)["input_ids"]
        assert choice["message"]["content"].strip() == "Arr matey" and choice["finish_reason"] == "stop"
    finally:
        llm.close()


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Go's text/template, the engine Ollama renders TEMPLATE with, as a small compiled program."""
    if shutil.which("go") is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs Go (golang-go, .ci/run) to run Modelfile templates; it is missing")
        pytest.skip("needs the Go toolchain (apt-get install golang-go)")
    folder = tmp_path_factory.mktemp("go-render")
    (folder / "render.go").write_text(GO_RENDER)
    env = {
        **os.environ,
        "GOCACHE": str(folder / "cache"),
        "GOPATH": str(folder / "gopath"),
        "GOFLAGS": "-mod=mod",
    }
    subprocess.run(["go", "build", "-o", "render", "render.go"], cwd=folder, env=env, check=True, timeout=300)

    def render(template: str, messages: list[dict]) -> str:
        body = json.dumps(
            {
                "Template": template,
                "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            }
        )
        done = subprocess.run(
            [str(folder / "render")], input=body, capture_output=True, text=True, check=True, timeout=60
        )
        return done.stdout

    return render


def modelfile_parts(text: str) -> tuple[str, str | None]:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    assert template is not None, text
    return template.group(1), system.group(1) if system else None


@pytest.mark.parametrize("name", NAMES)
def test_the_modelfile_renders_the_prompt_the_jinja_template_renders(name, exported, go_render):
    template = template_of(exported[name])
    text = (exported[name].parent / "Modelfile").read_text()
    go, system = modelfile_parts(text)
    assert system is None  # a bare model folder has no system prompt of its own
    for turns in ([], TURNS[:1], TURNS):
        for system in (None, SYSTEM) if has_system(name) else (None,):
            conversation = chat(system, turns)
            assert go_render(go, conversation) == template.render(conversation, add_generation_prompt=True)
    if not has_system(name):  # the template has no place for one: Ollama's system messages are dropped
        assert "system messages are dropped" in text
        assert go_render(go, chat(SYSTEM, TURNS)) == template.render(
            chat(None, TURNS), add_generation_prompt=True
        )


def test_the_modelfile_system_prompt_is_rendered_as_ollama_prepends_it(exported, go_render):
    """A run's `data.system_prompt` becomes the Modelfile's SYSTEM, which Ollama puts before a chat that
    has no system message of its own: the Go template then renders what the run trained on."""
    from strop.export.ollama import modelfile

    template = template_of(exported["llama3"])
    system_template = ChatTemplate(template.tokenizer, template.source, system_prompt=SYSTEM)
    text, translated = modelfile("m.gguf", system_template, ["<|eot_id|>"])
    go, system = modelfile_parts(text)
    assert translated and system == SYSTEM
    conversation = chat(None, TURNS)
    want = system_template.render(with_system(conversation, SYSTEM), add_generation_prompt=True)
    assert go_render(go, with_system(conversation, system)) == want
    assert "Be a pirate." in want
