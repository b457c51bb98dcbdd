"""An Ollama Modelfile for an exported GGUF: the run's chat template translated to Ollama's Go template,
`PARAMETER stop` for every end-of-turn string, and the system prompt.

Jinja cannot be translated to Go in general, so the template is *measured* instead: each role's text
around its content and the generation prompt are read off renders of probe conversations, and the
translation is used only if those pieces re-render the probes exactly as the Jinja template does.
Two shapes are measured: every message in its own wrap (ChatML, Alpaca), and a head written once (a
BOS) with the system message folded into the first user turn (Gemma, whose template has no system role).
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
    head: str = ""  # written once before the first message (e.g. BOS)
    fold: str | None = None  # the system message goes into the first user turn, followed by this text


def _probe(template: ChatTemplate) -> list[list[dict]]:
    m = [{"role": r, "content": f"{MARK}{r}{MARK}"} for r in ROLES]
    user2 = {"role": "user", "content": f"{MARK}u2{MARK}"}
    return [m, [*m, user2], m[1:], [*m[1:], user2]]


def measure(template: ChatTemplate) -> Pieces | None:
    """The template as per-role pieces, or None when it is not that regular (then no TEMPLATE is written)."""
    bare = ChatTemplate(template.tokenizer, template.source, None, generates=False)
    for shape in (_wrapped, _headed):
        try:
            pieces = shape(bare)
        except Exception:  # noqa: BLE001 - a template that cannot be probed simply gets no translation
            continue
        system = template.system_prompt or pieces.default_system
        if all(
            render(pieces, conversation, system) == bare_with_system(bare, conversation, system)
            for conversation in _probe(template)
        ):
            return pieces
    return None


def _mark(role: str) -> str:
    return f"{MARK}{role}{MARK}"


def _headed(bare: ChatTemplate) -> Pieces:
    """A head written once, then user and assistant wraps; the system message either in its own wrap or
    folded into the first user turn. Raises ValueError when renders do not have that shape."""
    u, a, u2, s = (
        {"role": role, "content": _mark(name)}
        for role, name in (("user", "user"), ("assistant", "assistant"), ("user", "u2"), ("system", "system"))
    )
    r1, r2, r3 = (bare.render(c, add_generation_prompt=False) for c in ([u], [u, a], [u, a, u2]))
    if not (r2.startswith(r1) and r3.startswith(r2)):
        raise ValueError("renders do not grow")
    user_before, user_after = r3[len(r2) :].split(_mark("u2"))
    assistant_before, assistant_after = r2[len(r1) :].split(_mark("assistant"))
    user = (user_before, user_after)
    first, after = r1.split(_mark("user"))
    if after != user[1] or not first.endswith(user[0]):
        raise ValueError("the first user turn is wrapped differently")
    head = first[: len(first) - len(user[0])]
    generation = bare.render([u, a, u2], True)[len(r3) :]
    rest = bare.render([s, u], False)
    if not rest.startswith(head):
        raise ValueError("the system message comes before the head")
    rest, turn = rest[len(head) :], r1[len(head) :]
    wrap = {"user": user, "assistant": (assistant_before, assistant_after)}
    fold = None
    if rest.startswith(user[0] + _mark("system")) and rest.endswith(_mark("user") + user[1]):
        fold = rest[len(user[0] + _mark("system")) : len(rest) - len(_mark("user") + user[1])]
        wrap["system"] = ("", "")
    elif rest.endswith(turn):
        before, after = rest[: len(rest) - len(turn)].split(_mark("system"))
        wrap["system"] = (before, after)
    else:
        raise ValueError("the system message is neither wrapped nor folded into the first turn")
    return Pieces(wrap, generation, None, head, fold)


def _wrapped(bare: ChatTemplate) -> Pieces:
    """Every message in its own wrap; a default system prompt when the template inserts one."""
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
    return Pieces(wrap, generation, default)


def bare_with_system(bare: ChatTemplate, conversation: list[dict], system: str | None) -> str:
    if system and conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": system}, *conversation]
    return bare.render(conversation, add_generation_prompt=True)


def render(pieces: Pieces, conversation: list[dict], system: str | None) -> str:
    """What the Go template produces (Ollama prepends SYSTEM as a system message when there is none)."""
    if system and conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": system}, *conversation]
    out, folded, fold = pieces.head, None, pieces.fold
    for m in conversation:
        content = m["content"]
        if fold is not None and m["role"] == "system":
            folded = content
            continue
        if fold is not None and folded is not None and m["role"] == "user":
            content, folded = folded + fold + content, None
        out += pieces.wrap[m["role"]][0] + content + pieces.wrap[m["role"]][1]
    return out + pieces.generation


def _go(text: str) -> str:
    """Literal text inside a Go template (a `{{` would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(pieces: Pieces) -> str:
    def content(role: str) -> str:
        if pieces.fold is not None and role == "user":  # the held system message, then this turn
            return f'{{{{ if $system }}}}{{{{ $system }}}}{_go(pieces.fold)}{{{{ $system = "" }}}}{{{{ end }}}}{{{{ .Content }}}}'
        return "{{ .Content }}"

    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
        + (
            "{{ $system = .Content }}"
            if pieces.fold is not None and role == "system"
            else f"{_go(pieces.wrap[role][0])}{content(role)}{_go(pieces.wrap[role][1])}"
        )
        for i, role in enumerate(ROLES)
    )
    start = '{{- $system := "" }}' if pieces.fold is not None else ""
    return f"{start}{_go(pieces.head)}{{{{- range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{_go(pieces.generation)}"


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
