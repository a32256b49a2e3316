"""The chat format: the special tokens that mark turns, and the Jinja template that lays them out.

A conversation is a document: it starts as every training document does, after the
end-of-document token (`bos_token` in the template: ours is bos, eos and pad), and each
message is its role token, its text and `<|endofturn|>`:

    <|endoftext|><|system|>Be brief.<|endofturn|><|user|>Hi<|endofturn|><|assistant|>

The same template goes to transformers (`tokenizer_config.json`'s `chat_template`) and to
llama.cpp (GGUF `tokenizer.chat_template`); `render_chat` renders it as transformers does
(sandboxed, trim_blocks and lstrip_blocks), so `apply_chat_template` gives `chat_ids`' ids.
No text encodes to these tokens (they are special tokens, see simone/data/tokenizer.py), and
`chat_ids` keeps it so inside messages: a message holding "<|user|>" cannot open a turn.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from simone.config import TokenizerConfig

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|endofturn|>"
CHAT_TOKENS = (*(f"<|{role}|>" for role in ROLES), END_OF_TURN)
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # beside tokenizer.json, in a run and a package
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles are system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|endofturn|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# what stands for message i's text while the template is rendered in `chat_ids` (the
# rendered text then holds no message text, so nothing in one can be taken for a slot)
_SLOT = "\x00"


class ChatTokenizer(Protocol):
    """What `chat_ids` needs of a `simone.data.tokenizer.Tokenizer` (which imports this module)."""

    eod_token: str

    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.cache
def _compiled() -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(CHAT_TEMPLATE)


def render_chat(
    messages: list[dict[str, Any]], add_generation_prompt: bool = False, bos_token: str = TokenizerConfig.eod_token
) -> str:
    """The conversation as text, special tokens spelled out; `add_generation_prompt` ends it with
    `<|assistant|>` for the model to answer. A role other than system, user or assistant raises
    jinja2's TemplateError."""
    return _compiled().render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token)


def chat_ids(
    tokenizer: ChatTokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of `render_chat(...)`: the template's tokens as their ids, each message's text as
    plain text. The same ids as transformers' `apply_chat_template` for every message without a
    special-token string in it; where one has one, transformers by default reads it as the
    token, and here it stays text."""
    if not all(isinstance(m.get("content"), str) for m in messages):
        raise ValueError("every chat message needs a 'content' string")
    texts: list[str] = [m["content"] for m in messages]
    slots = [{**m, "content": f"{_SLOT}{i}{_SLOT}"} for i, m in enumerate(messages)]
    pieces = render_chat(slots, add_generation_prompt, tokenizer.eod_token).split(_SLOT)
    # even pieces are the template's own text; odd ones the index of a message, encoded as plain
    # text (each lies between two special tokens, so encoding the pieces apart changes nothing)
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        ids += tokenizer.encode(texts[int(piece)]) if k % 2 else tokenizer.encode(piece, allow_special=True)
    return ids
