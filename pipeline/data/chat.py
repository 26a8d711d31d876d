"""The one chat template (ChatML), rendered with the tokenizer's reserved chat tokens.

The same template is stored as Jinja in the exported tokenizer_config.json, so
`tokenizer.apply_chat_template` in transformers renders exactly the text we train on.

Each message's content follows its role line after one space ("<|im_start|>assistant\n Paris<|im_end|>").
The lossless tokenizer has no dummy prefix, so a word at the start of a line gets different pieces
("Paris") from the same word in running text ("▁Paris"); the space makes an answer reuse the pieces the
model saw in pretraining. On the built-in set that took exact match after fine-tuning from 0.18 to 0.30
(tiny model, 1500 pretraining steps). The space belongs to the content, so it carries loss and the
generation prompt still ends with the newline.
"""
from __future__ import annotations

from .vocab import IM_END, IM_START

ROLES = ("system", "user", "assistant")

JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + IM_START + "' + message['role'] + '\\n ' + message['content'] + '" + IM_END + "' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
)


def render(messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans that carry loss: each assistant turn's content and
    its closing IM_END, so the model learns to answer and to stop."""
    parts, targets, position = [], [], 0
    for message in messages:
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"unknown chat role {role!r}; expected one of {ROLES}")
        head = f"{IM_START}{role}\n"
        body = f" {content}{IM_END}"
        if role == "assistant":
            start = position + len(head)
            targets.append((start, start + len(body)))
        parts.append(head + body + "\n")
        position += len(parts[-1])
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts), targets
