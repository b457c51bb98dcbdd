"""Chat templates: messages -> token ids + a loss mask. Labels are decided here and nowhere else.

The same `ChatTemplate` renders prompts for training, `strop chat` and `strop generate`, so a tuned
model sees at inference exactly the format it was trained on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from strop.core.errors import ConfigError, DataError
from strop.data.tools import CHATML_TOOLS, TOOLS_ROLE, renders_tools

log = logging.getLogger("strop")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ALPACA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% else %}Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n{% endif %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)
BUILTIN = {"chatml": CHATML, "alpaca": ALPACA, "chatml-tools": CHATML_TOOLS}


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"data.template: not a valid Jinja template: {e}") from None


def resolve_template(name: str, tokenizer) -> tuple[str, str]:
    """Return (label, jinja source) for data.template: 'auto', a built-in name, or a Jinja string."""
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            return "tokenizer", tokenizer.chat_template
        return "chatml", CHATML
    if name in BUILTIN:
        return name, BUILTIN[name]
    if "{{" in name or "{%" in name:
        return "custom", name
    raise ConfigError(
        f"data.template: expected 'auto', {', '.join(map(repr, BUILTIN))} or a Jinja string, got {name!r}"
    )


@dataclass
class Encoded:
    ids: list[int]
    trained: list[bool]  # True where the token is a response token that carries loss
    context_turns: int = 0  # assistant turns the template re-renders later, kept as untrained context


if TYPE_CHECKING:
    from strop.core.config import RunConfig


class ChatTemplate:
    """Renders conversations with a Jinja template and tokenizes them into ids + loss mask."""

    def __init__(self, tokenizer, source: str, system_prompt: str | None = None, generates: bool = True):
        """`generates`: the model will write replies, so each trained reply must end in a stop token and the
        tokenizer needs one. A reward model only reads conversations (an encoder's tokenizer may have no
        end-of-sequence token)."""
        if generates and tokenizer.eos_token_id is None:
            raise ConfigError(
                "model.name: this tokenizer has no end-of-sequence token, so a tuned model could not learn to "
                "stop; use a causal language model's tokenizer"
            )
        self.tokenizer = tokenizer
        self.source = source
        self.system_prompt = system_prompt
        self._template = _compile(source)
        self.stop_ids = stop_token_ids(tokenizer)
        self._stop_texts = [t for t in tokenizer.convert_ids_to_tokens(sorted(self.stop_ids)) if t]
        self._warned = False

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's text of a conversation; a first `{"role": "tools", "tools": [...]}` element
        (data/tools.py) is handed to the template as `tools`, as transformers' apply_chat_template does."""
        tools = None
        if messages and messages[0]["role"] == TOOLS_ROLE:
            tools, messages = messages[0]["tools"], messages[1:]
            if not renders_tools(self.source):
                raise DataError(
                    "data.template: the chat template renders no tools or tool calls, so they would be "
                    "dropped from training silently; use a template that does, e.g. data.template: chatml-tools"
                )
        messages = list(messages)
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        tok = self.tokenizer
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=tok.bos_token or "",
                eos_token=tok.eos_token or "",
                **({"tools": tools} if tools is not None else {}),
            )
        except jinja2.TemplateError as e:
            raise DataError(f"chat template failed on a conversation: {e}") from None

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation ready for the assistant's next reply (inference).

        Cut and tokenized exactly as `encode` cuts a training conversation (earlier replies with the EOS
        it appends when the template emits no end-of-turn), so the ids before reply k at inference are
        the ids training put before it.
        """
        messages = list(messages)
        prompt = self.render(messages, add_generation_prompt=True)
        try:
            pieces, _ = self._cut(messages, prompt)
        except DataError:  # a template that can't be trained on (not incremental) still renders for chat
            return self._tokenize(prompt)
        return self._tokens(pieces, False, None).ids

    def encode(
        self,
        messages: tuple[dict, ...] | list[dict],
        train_on_prompt: bool = False,
        last_turn_only: bool = False,
        max_tokens: int | None = None,
    ) -> Encoded:
        """Tokens of the whole conversation; every assistant turn (with its end-of-turn) carries loss, or
        only the final one with `last_turn_only` (a preference pair's reply; earlier turns are its prompt).

        The template decides the format; this function only cuts its rendering of the conversation into
        trained and untrained pieces. Reply k is the text the template adds after the generation prompt
        of the turns before it, up to and including its end-of-turn marker (and the whitespace closing
        it): exactly what the model writes at inference. Two kinds of template render a reply otherwise
        once the conversation goes on, and both are honoured:

        - text after the last turn only (Phi-3's closing EOS): not part of any reply, never trained;
        - an earlier reply rendered differently (Qwen 3 drops the reasoning of replies before the last
          user turn), or after a prompt rendered differently (Mistral v0.3 puts the system message into
          the last user turn only): the model never writes that reply after that prompt, so that turn is
          context, not trained (counted in `Encoded.context_turns` and logged once); replies after the
          last user turn are trained as written, and the prompt of each reply is what inference sees.

        `max_tokens`: the caller keeps at most that many tokens, so tokenizing stops soon after: a longer
        conversation comes back with more than `max_tokens` (not all) tokens, and its first `max_tokens`
        equal those of the full encoding; time and memory grow with `max_tokens`, not with the text.
        """
        messages = list(messages)
        pieces, context = self._cut(
            messages, self.render(messages, add_generation_prompt=False), last_turn_only
        )
        if context and not self._warned:
            self._warned = True
            log.warning(
                "the chat template renders %d earlier assistant turn(s) or their prompts differently once the "
                "conversation goes on (e.g. without their reasoning, or with the system message moved to a later "
                "turn), so they are context, not trained: only replies rendered as inference prompts and the "
                "model writes them carry loss",
                context,
            )
        enc = self._tokens(pieces, train_on_prompt, max_tokens)
        enc.context_turns = context
        return enc

    def _cut(
        self, messages: list[dict], full: str, last_turn_only: bool = False
    ) -> tuple[list[tuple[str, bool, bool]], int]:
        """`full` (a rendering of `messages`) cut into (text, is a reply, carries loss) pieces, and the
        number of assistant turns left in the context because `full` renders them otherwise."""
        pieces: list[tuple[str, bool, bool]] = []
        done, context = 0, 0
        last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, reply = self._turn(messages[:k], m)
            if not (full.startswith(before) and full.startswith(reply, len(before))):
                if k == len(messages) - 1 and full == self._render_without_system(messages):
                    # the template shows the system message only while prompting (Mistral v0.3 puts it
                    # into the last user turn, so a conversation ending in a reply renders without it):
                    # train the last reply after the prompt inference gives it; earlier ones are context
                    context += len(pieces) // 2
                    pieces, full, done = [], before + reply, 0
                else:
                    context += 1  # the final rendering shows this turn or its prompt otherwise than inference
                    continue
            if len(before) < done:
                raise _not_incremental()
            pieces += [
                (full[done : len(before)], False, False),
                (reply, True, k == last or not last_turn_only),
            ]
            done = len(before) + len(reply)
        if context and not any(is_reply for _, is_reply, _ in pieces):
            raise _not_incremental()  # no reply is rendered as inference would prompt it
        if full[done:]:
            pieces.append((full[done:], False, False))
        return pieces, context

    def _turn(self, prior: list[dict], message: dict) -> tuple[str, str]:
        """The prompt inference renders before `message` (an assistant turn) and the reply the model
        writes there. A template that shows the system message only while prompting renders the reply
        after the same conversation without it."""
        before = self.render(prior, add_generation_prompt=True)
        after = self.render([*prior, message], add_generation_prompt=False)
        if not after.startswith(before) and prior and prior[0]["role"] == "system":
            shown = self.render(prior[1:], add_generation_prompt=True)  # the prompt as `after` renders it
            if after.startswith(shown):
                after = before + after[len(shown) :]
        if not after.startswith(before):
            raise _not_incremental()
        reply = self._reply(after[len(before) :])
        self._check_generation_prompt(prior, before, reply, message.get("content"))
        return before, reply

    def _render_without_system(self, messages: list[dict]) -> str | None:
        if not messages or messages[0]["role"] != "system":
            return None
        return self.render(messages[1:], add_generation_prompt=False)

    def _reply(self, turn: str) -> str:
        """The part of an assistant turn's text the model writes: up to its first end-of-turn marker and
        the whitespace after it (the rest, e.g. an EOS a template puts after the last turn, is not)."""
        ends = [at + len(s) for s in self._stop_texts if (at := turn.find(s)) >= 0]
        if not ends:
            return turn
        end = min(ends)
        return turn[: end + len(turn[end:]) - len(turn[end:].lstrip())]

    def _check_generation_prompt(self, prior: list[dict], before: str, reply: str, content) -> None:
        """Refuse a template that renders no generation prompt while a reply starts with more than its
        content: that text (the role header) would carry loss, and chat would not prompt a reply."""
        if not isinstance(content, str) or not content.strip():
            return
        head = reply[: max(reply.find(content.strip()), 0)]
        if head.strip() and before == self.render(prior, add_generation_prompt=False):
            raise DataError(
                f"data.template: the chat template renders no generation prompt (add_generation_prompt), so the "
                f"reply's header {head!r} would carry loss and chat would not ask for a reply; use a template "
                "with an add_generation_prompt block"
            )

    def _tokens(
        self, pieces: list[tuple[str, bool, bool]], train_on_prompt: bool, max_tokens: int | None
    ) -> Encoded:
        ids: list[int] = []
        trained: list[bool] = []
        for text, is_response, carries in pieces:
            if max_tokens is None:
                piece, whole = self._tokenize(text), True
            else:  # one token more than kept: enough to tell the conversation is longer
                piece, whole = tokenize_head(self.tokenizer, text, max_tokens + 1 - len(ids))
            stops = piece and piece[-1] in self.stop_ids or self._ends_turn(piece)
            if whole and is_response and not stops and self.tokenizer.eos_token_id is not None:
                piece.append(self.tokenizer.eos_token_id)  # a tuned model must learn to stop
            ids += piece
            trained += [carries or train_on_prompt] * len(piece)
            if max_tokens is not None and len(ids) > max_tokens:
                break  # the rest lies past the cut
        return Encoded(ids, trained)

    def _ends_turn(self, piece: list[int]) -> bool:
        """True when a stop token closes the piece, allowing only whitespace after it (e.g. '<|im_end|>\\n')."""
        for i in range(len(piece) - 1, -1, -1):
            if piece[i] in self.stop_ids:
                return True
            if self.tokenizer.decode([piece[i]]).strip():
                return False
        return False

    def _tokenize(self, text: str) -> list[int]:
        return list(_ids(self.tokenizer, text)["input_ids"]) if text else []


def _not_incremental() -> DataError:
    return DataError(
        "the chat template does not render this conversation as growing prefixes (does it start with an "
        "assistant turn, or skip a role?); if your conversations are fine, choose data.template: chatml or alpaca"
    )


def stop_token_ids(tokenizer) -> set[int]:
    """Tokens that end an assistant turn: EOS plus end-of-turn markers the vocabulary knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
        if marker in vocab:
            ids.add(vocab[marker])
    return ids


def encode_text(tokenizer, text: str, max_length: int) -> list[list[int]]:
    """Plain text for continued pre-training: tokens + EOS, cut into windows of `max_length`."""
    ids = tokenize_long(tokenizer, text)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return [
        ids[i : i + max_length] for i in range(0, len(ids), max_length) if len(ids[i : i + max_length]) > 1
    ]


HEAD_MARGIN = 32  # tokens beyond those kept: appending text can change the last few tokens of a prefix
CHARS_PER_TOKEN = 8  # a first guess of a prefix long enough; doubled until it is


def _ids(tokenizer, text: str, **kwargs) -> dict:
    return tokenizer(text, add_special_tokens=False, **kwargs)


def tokenize_head(tokenizer, text: str, n: int) -> tuple[list[int], bool]:
    """The first `n` tokens of `text`, and whether they are all of its tokens, in time and memory that
    grow with `n` rather than with the text (a 50 MB row tokenized whole takes gigabytes).

    Tokenizes growing prefixes (doubling) until two in a row each yield more than n + HEAD_MARGIN
    tokens and agree on the first n: a merge reaches only a few tokens back across a cut, so these are
    the first n tokens of the whole text. A text too short for that is tokenized whole.
    """
    cut, head = CHARS_PER_TOKEN * (n + HEAD_MARGIN), None
    while cut < len(text):
        ids = list(_ids(tokenizer, text[:cut])["input_ids"])
        if len(ids) > n + HEAD_MARGIN:
            if head is not None and ids[:n] == head:
                return head, False
            head = ids[:n]
        cut *= 2
    ids = list(_ids(tokenizer, text)["input_ids"]) if text else []
    return ids[:n], len(ids) <= n


CHUNK_CHARS = 1 << 16  # characters per tokenizer call on long plain text
SEAM = 16  # tokens either side of a seam on which two overlapping chunks must agree


def tokenize_long(tokenizer, text: str, chunk: int = CHUNK_CHARS) -> list[int]:
    """All tokens of `text`, equal to tokenizing it whole, in chunks of `chunk` characters so that the
    tokenizer's working memory stays bounded (its per-token bookkeeping is hundreds of bytes).

    Chunks overlap by a quarter. Two neighbours are joined at a token boundary inside the overlap where
    both have the same SEAM tokens on either side: the left chunk saw all the text before the seam and
    the right one all the text after it, so both sides are tokenized in their full context. Should no
    such boundary exist, the chunks are doubled (at worst the text is tokenized whole); a tokenizer
    without offsets (a slow one) tokenizes it whole.
    """
    if len(text) <= chunk or not getattr(tokenizer, "is_fast", False):
        return list(_ids(tokenizer, text)["input_ids"]) if text else []
    out: list[int] = []
    left, a0, skip = _ids(tokenizer, text[:chunk], return_offsets_mapping=True), 0, 0
    while True:
        b0 = a0 + chunk - chunk // 4
        right = _ids(tokenizer, text[b0 : b0 + chunk], return_offsets_mapping=True)
        seam = _seam(left, a0, right, b0, lo=b0 + chunk // 16, hi=a0 + chunk - chunk // 16)
        if seam is None:
            return tokenize_long(tokenizer, text, chunk * 2)
        i, j = seam
        out += left["input_ids"][skip:i]
        if b0 + chunk >= len(text):
            return out + list(right["input_ids"][j:])
        left, a0, skip = right, b0, j


def _seam(left: dict, a0: int, right: dict, b0: int, lo: int, hi: int) -> tuple[int, int] | None:
    """Indexes (i in left, j in right) of one token that starts at a text position in [lo, hi) in both
    chunks, with the same SEAM tokens before and after it in both; None if there is none."""
    ids_l, ids_r = left["input_ids"], right["input_ids"]
    starts = _starts(right["offset_mapping"], b0)
    for pos, i in _starts(left["offset_mapping"], a0).items():
        j = starts.get(pos)
        if j is None or not lo <= pos < hi or min(i, j) < SEAM:
            continue
        if i + SEAM <= len(ids_l) and j + SEAM <= len(ids_r):
            if ids_l[i - SEAM : i + SEAM] == ids_r[j - SEAM : j + SEAM]:
                return i, j
    return None


def _starts(offsets: list[tuple[int, int]], base: int) -> dict[int, int]:
    """Text position -> index of the token starting there (the bytes of one character share offsets:
    only the first counts)."""
    return {base + s: k for k, (s, _) in enumerate(offsets) if k and s != offsets[k - 1][0]}


def run_templates(cfg: RunConfig, tokenizer) -> tuple[str, ChatTemplate, dict[str, ChatTemplate]]:
    """The run's chat template (its name too), and those of sources that have their own (mixtures of
    differently formatted data) by source name."""
    name, source = resolve_template(cfg.data.template, tokenizer)
    generates = cfg.task != "reward"  # a reward model reads conversations, it never has to stop one
    own = {
        src.label: ChatTemplate(
            tokenizer, resolve_template(src.template, tokenizer)[1], cfg.data.system_prompt, generates
        )
        for src in (*cfg.data.train, *cfg.data.validation)
        if src.template
    }
    return name, ChatTemplate(tokenizer, source, cfg.data.system_prompt, generates), own
