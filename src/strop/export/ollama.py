"""An Ollama Modelfile for an exported GGUF: the run's chat template translated to Ollama's Go template,
`PARAMETER stop` for every end-of-turn string, and the system prompt.

Jinja cannot be translated to Go in general, so the template is *measured* instead: each role's text
around its content and the generation prompt are read off renders of probe conversations, and the
translation is used only if those pieces re-render the probes exactly as the Jinja template does.
"""

from __future__ import annotations

from dataclasses import dataclass

from strop.data.template import ChatTemplate

MARK = "\ue000CONTENT\ue001"  # private-use characters no template emits
ROLES = ("system", "user", "assistant")


@dataclass
class Pieces:
    wrap: dict[str, tuple[str, str]]  # role -> (text before content, text after content)
    generation: str  # what add_generation_prompt appends
    default_system: str | None  # a system prompt the template inserts when a conversation has none


def _probe(template: ChatTemplate) -> list[list[dict]]:
    m = [{"role": r, "content": f"{MARK}{r}{MARK}"} for r in ROLES]
    user2 = {"role": "user", "content": f"{MARK}u2{MARK}"}
    return [m, [*m, user2], m[1:], [*m[1:], user2]]


def measure(template: ChatTemplate) -> Pieces | None:
    """The template as per-role pieces, or None when it is not that regular (then no TEMPLATE is written)."""
    bare = ChatTemplate(template.tokenizer, template.source, None, generates=False)
    try:
        wrap: dict[str, tuple[str, str]] = {}
        done = ""
        full = [{"role": r, "content": f"{MARK}{r}{MARK}"} for r in ROLES]
        for k, role in enumerate(ROLES):
            text = bare.render(full[: k + 1], add_generation_prompt=False)
            piece = text[len(done) :]
            before, _, rest = piece.partition(f"{MARK}{role}{MARK}")
            wrap[role] = (before, rest)
            done = text
        generation = bare.render(full[:2], True)[len(bare.render(full[:2], False)) :]
        no_system = bare.render(full[1:2], False)
        expected = wrap["user"][0] + f"{MARK}user{MARK}" + wrap["user"][1]
        default = None
        if no_system != expected and no_system.endswith(expected):
            head = no_system[: -len(expected)]
            pre, post = wrap["system"]
            if head.startswith(pre) and head.endswith(post):
                default = head[len(pre) : len(head) - len(post)]
        pieces = Pieces(wrap, generation, default)
        system = template.system_prompt or default
        for conversation in _probe(template):
            if render(pieces, conversation, system) != bare_with_system(bare, conversation, system):
                return None
        return pieces
    except Exception:  # noqa: BLE001 - a template that cannot be probed simply gets no translation
        return None


def bare_with_system(bare: ChatTemplate, conversation: list[dict], system: str | None) -> str:
    if system and conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": system}, *conversation]
    return bare.render(conversation, add_generation_prompt=True)


def render(pieces: Pieces, conversation: list[dict], system: str | None) -> str:
    """What the Go template produces (Ollama prepends SYSTEM as a system message when there is none)."""
    if system and conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": system}, *conversation]
    out = "".join(pieces.wrap[m["role"]][0] + m["content"] + pieces.wrap[m["role"]][1] for m in conversation)
    return out + pieces.generation


def _go(text: str) -> str:
    """Literal text inside a Go template (a `{{` would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(pieces: Pieces) -> str:
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_go(pieces.wrap[role][0])}{{{{ .Content }}}}'
        f"{_go(pieces.wrap[role][1])}"
        for i, role in enumerate(ROLES)
    )
    return f"{{{{- range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{_go(pieces.generation)}"


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(gguf_name: str, template: ChatTemplate, stop_strings: list[str]) -> tuple[str, bool]:
    """The Modelfile text, and whether the chat template could be translated."""
    pieces = measure(template)
    lines = [f"FROM ./{gguf_name}", ""]
    if pieces is not None:
        lines += [f"TEMPLATE {_quote(go_template(pieces))}", ""]
        system = template.system_prompt or pieces.default_system
    else:
        lines += [
            "# The run's chat template could not be translated to Ollama's; Ollama reads the GGUF's.",
            "",
        ]
        system = template.system_prompt
    if system:
        lines += [f"SYSTEM {_quote(system)}", ""]
    lines += [f'PARAMETER stop "{s}"' for s in stop_strings]
    return "\n".join(lines) + "\n", pieces is not None
