"""An Ollama Modelfile for an exported GGUF: the run's chat template translated to Ollama's Go template,
`PARAMETER stop` for every end-of-turn string, and the system prompt.

Jinja cannot be translated to Go in general, so the template is *measured* instead. A prompt (a
conversation ending in a user turn, then the generation prompt) is read as the messages' contents
joined by text that depends only on the roles around it:

    head[first role] c0 joint[r0 → r1] c1 ... joint[r(n-1) → rn] cn tail

Renders of probe conversations with marked contents give each piece; the translation is used only if
the pieces agree across probes and re-render longer conversations exactly as the Jinja template does.
This covers a BOS written once, a default system block inserted when there is none (Llama 3.1's dates,
Qwen 2.5's), a system message folded into the first user turn (Gemma) and history rendered otherwise
than the last reply (Qwen 3). A template with no place for a system message (it raises, or moves it into
the last user turn as Mistral v0.3 does) is measured without one, and the Go template drops system
messages; the Modelfile says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from strop.data.template import ChatTemplate

MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters no template emits


@dataclass
class Pieces:
    head: dict[str, str]  # first message's role -> text before its content
    joint: dict[tuple[str, str], str]  # (role, next role) -> text between their contents
    tail: str  # after the last (user) message: its closing text and the generation prompt
    system: bool  # the template has a place for a system message (else the Go template drops them)


def _turns(n: int, system: bool) -> list[str]:
    roles = ["user", *(["assistant", "user"] * n)]
    return ["system", *roles] if system else roles


PROBES = [(n, s) for s in (False, True) for n in (0, 1, 2)]  # what the pieces are read from
CHECKS = [(3, False), (3, True)]  # what they must re-render


def _conversation(roles: list[str]) -> list[dict]:
    return [{"role": r, "content": f"\ue000{i}\ue001"} for i, r in enumerate(roles)]


def _split(text: str, n: int) -> list[str] | None:
    """The text between the n marked contents, in order, or None when they are not all there in order."""
    parts, at = [], 0
    for i, m in enumerate(MARK.finditer(text)):
        if int(m.group(1)) != i:
            return None
        parts.append(text[at : m.start()])
        at = m.end()
    return [*parts, text[at:]] if len(parts) == n else None


def measure(template: ChatTemplate) -> Pieces | None:
    """The template as role-keyed pieces, or None when it is not that regular (then no TEMPLATE is written)."""
    bare = ChatTemplate(template.tokenizer, template.source, None, generates=False)
    for system in (True, False):
        pieces = _read(bare, system)
        if pieces is not None and all(
            render(pieces, _conversation(_turns(n, s))) == _prompt(bare, _conversation(_turns(n, s)))
            for n, s in CHECKS
            if system or not s
        ):
            return pieces
    return None


def _prompt(bare: ChatTemplate, conversation: list[dict]) -> str | None:
    try:
        return bare.render(conversation, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that refuses a probe has no translation for it
        return None


def _read(bare: ChatTemplate, system: bool) -> Pieces | None:
    head: dict[str, str] = {}
    joint: dict[tuple[str, str], str] = {}
    tails: set[str] = set()
    for n, s in PROBES:
        if s and not system:
            continue
        roles = _turns(n, s)
        text = _prompt(bare, _conversation(roles))
        parts = None if text is None else _split(text, len(roles))
        if parts is None:
            return None
        if head.setdefault(roles[0], parts[0]) != parts[0]:
            return None
        for a, b, piece in zip(roles[:-1], roles[1:], parts[1:-1], strict=True):
            if joint.setdefault((a, b), piece) != piece:
                return None
        tails.add(parts[-1])
    return Pieces(head, joint, tails.pop(), system) if len(tails) == 1 else None


def with_system(conversation: list[dict], system: str | None) -> list[dict]:
    """What Ollama renders: its SYSTEM prepended as a system message when the request has none."""
    if system and conversation[0]["role"] != "system":
        return [{"role": "system", "content": system}, *conversation]
    return conversation


def bare_with_system(bare: ChatTemplate, conversation: list[dict], system: str | None) -> str:
    return bare.render(with_system(conversation, system), add_generation_prompt=True)


def render(pieces: Pieces, conversation: list[dict], system: str | None = None) -> str:
    """What the Go template produces for a conversation ending in a user turn (Python's mirror of it)."""
    messages = [m for m in with_system(conversation, system) if pieces.system or m["role"] != "system"]
    out, prev = "", None
    for m in messages:
        role = m["role"]
        out += (pieces.head[role] if prev is None else pieces.joint[(prev, role)]) + m["content"]
        prev = role
    return out + pieces.tail


def _go(text: str) -> str:
    """Literal text inside a Go template (a `{{` would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(pieces: Pieces) -> str:
    """The pieces as an Ollama (Go text/template) TEMPLATE. No trim markers (`{{-`): literal pieces may
    begin or end in whitespace that must stay."""
    branches = [(f'and (eq $prev "") (eq .Role "{r}")', text) for r, text in pieces.head.items()]
    branches += [(f'and (eq $prev "{a}") (eq .Role "{b}")', text) for (a, b), text in pieces.joint.items()]
    body = "".join(
        f"{{{{ {'if' if i == 0 else 'else if'} {cond} }}}}{_go(text)}"
        for i, (cond, text) in enumerate(branches)
    )
    skip = "" if pieces.system else '{{ if ne .Role "system" }}'
    close = "" if pieces.system else "{{ end }}"
    return (
        '{{ $prev := "" }}{{ range .Messages }}'
        f"{skip}{body}{{{{ end }}}}{{{{ .Content }}}}{{{{ $prev = .Role }}}}{close}"
        f'{{{{ end }}}}{{{{ if eq $prev "user" }}}}{_go(pieces.tail)}{{{{ end }}}}'
    )


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(gguf_name: str, template: ChatTemplate, stop_strings: list[str]) -> tuple[str, bool]:
    """The Modelfile text, and whether the chat template could be translated."""
    pieces = measure(template)
    lines = [f"FROM ./{gguf_name}", ""]
    system = template.system_prompt
    if pieces is not None:
        if not pieces.system:
            lines.append(
                "# The chat template has no place for a system message: system messages are dropped."
            )
            system = None
        lines += [f"TEMPLATE {_quote(go_template(pieces))}", ""]
    else:
        lines += [
            "# The run's chat template could not be translated to Ollama's; Ollama reads the GGUF's.",
            "",
        ]
    if system:
        lines += [f"SYSTEM {_quote(system)}", ""]
    lines += [f'PARAMETER stop "{s}"' for s in stop_strings]
    return "\n".join(lines) + "\n", pieces is not None
