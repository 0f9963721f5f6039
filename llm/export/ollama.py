"""An Ollama `Modelfile` for a GGUF export: the file, the chat template in Go template syntax, the stop token.

Ollama does not run Jinja. The template is rebuilt from what the model's own
Jinja template renders for a few marked conversations: when every turn is written
as `<start>role<sep>content<end>` (ChatML and its cousins), with or without a
default system message, the Go template below writes exactly the same text. A
template of another shape is not guessed at: the Modelfile then says so and
Ollama falls back to the template stored in the GGUF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_SYSTEM, _USER, _ANSWER, _NEXT = "SYSTEM-7f3a", "USER-7f3a", "ANSWER-7f3a", "NEXT-7f3a"


@dataclass(frozen=True)
class TurnLayout:
    """How a template writes each turn: start + role + separator + content + end."""

    start: str
    separator: str
    end: str
    default_system: str | None
    """The system message the template writes when the conversation has none."""

    def turn(self, role: str, content: str) -> str:
        return f"{self.start}{role}{self.separator}{content}{self.end}"


def turn_layout(tokenizer: Any) -> TurnLayout | None:
    """The turn layout of the tokenizer's chat template, or None when its text does not follow one."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None

    def render(messages: list[dict[str, str]]) -> str:
        text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text

    full = render(
        [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": _USER},
            {"role": "assistant", "content": _ANSWER},
            {"role": "user", "content": _NEXT},
        ]
    )
    found = re.fullmatch(
        rf"(?P<start>.*?)system(?P<sep>.*?){_SYSTEM}(?P<end>.*?)(?P=start)user(?P=sep){_USER}(?P=end)"
        rf"(?P=start)assistant(?P=sep){_ANSWER}(?P=end)(?P=start)user(?P=sep){_NEXT}(?P=end)(?P=start)assistant(?P=sep)",
        full,
        re.DOTALL,
    )
    if found is None:
        return None
    layout = TurnLayout(found["start"], found["sep"], found["end"], None)
    alone = render([{"role": "user", "content": _USER}])
    tail = layout.turn("user", _USER) + layout.start + "assistant" + layout.separator
    head = alone[: -len(tail)] if alone.endswith(tail) else None
    if head == "":
        return layout
    opening = layout.start + "system" + layout.separator
    if head and head.startswith(opening) and head.endswith(layout.end):
        return TurnLayout(layout.start, layout.separator, layout.end, head[len(opening) : len(head) - len(layout.end)])
    return None


def go_template(layout: TurnLayout) -> str:
    """The Ollama (Go text/template) equivalent of a turn layout.

    No `{{-` trimming: the layout's own newlines are part of the text the model saw in training.
    """
    system = layout.turn("system", "{{ .System }}")
    default = layout.turn("system", layout.default_system) if layout.default_system is not None else ""
    return (
        f"{{{{ if .System }}}}{system}{{{{ else }}}}{default}{{{{ end }}}}"
        '{{ range .Messages }}{{ if ne .Role "system" }}'
        f"{layout.turn('{{ .Role }}', '{{ .Content }}')}"
        "{{ end }}{{ end }}"
        f"{layout.start}assistant{layout.separator}"
    )


def modelfile(gguf_name: str, *, tokenizer: Any, stop_token: str) -> str:
    """The Modelfile text for `ollama create <name> -f Modelfile`, beside the GGUF file."""
    lines = [f"FROM ./{gguf_name}"]
    layout = turn_layout(tokenizer)
    if layout is not None and _copyable(layout):
        lines.append(f'TEMPLATE """{go_template(layout)}"""')
    else:
        lines.append("# The chat template has no Go equivalent here: Ollama uses the one stored in the GGUF file.")
    lines.append(f'PARAMETER stop "{stop_token}"')
    return "\n".join(lines) + "\n"


def _copyable(layout: TurnLayout) -> bool:
    """Whether the layout's text can stand in a Go template: actions open with `{{`, the TEMPLATE value ends at 3 quotes."""
    texts = (layout.start, layout.separator, layout.end, layout.default_system or "")
    return not any("{{" in text or '"""' in text for text in texts)
