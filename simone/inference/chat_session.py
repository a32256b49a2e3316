"""A conversation with a loaded model, kept in memory: the core of `simone chat` (which only reads
lines and prints what `reply` yields).

The prompt is the model's chat format, as `simone serve` builds it (`openai_api.chat_prompt`:
simone's template, or the plain-text convention for a model without one). A reply stopped
early (Ctrl-C in the terminal closes the `reply` iterator) stays in the history as far as it
was said: the history is what the user saw. When the history outgrows the context window,
the oldest exchanges are left out of the prompt (the system message stays), and `say` hears so.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Generator

import torch

from simone.errors import SimoneError
from simone.inference.load import LoadedModel
from simone.inference.model_worker import Piece, Sampling, generate_choice
from simone.inference.openai_api import ChatPrompt, chat_prompt
from simone.progress import Say, quiet


class ChatError(SimoneError, ValueError):
    """A message the model cannot answer (too long for its context window)."""


class ChatSession:
    """The history of one conversation (`history`: [{role, content}], the system message first)
    and how replies are sampled; `seed` makes a session repeatable (None: a fresh one)."""

    def __init__(
        self,
        loaded: LoadedModel,
        system: str | None = None,
        temperature: float = 0.8,
        max_tokens: int = 256,
        seed: int | None = None,
        say: Say = quiet,
    ):
        if max_tokens < 1:
            raise ChatError(f"max_tokens must be at least 1, got {max_tokens}")
        self.loaded, self.system, self.say = loaded, system, say
        self.temperature, self.max_tokens = temperature, max_tokens
        self.generator = torch.Generator(device=loaded.device).manual_seed(
            seed if seed is not None else secrets.randbits(63)
        )
        self.history: list[dict[str, str]] = []
        self.left_out = 0  # messages of `history` the last prompt had no room for
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.left_out = 0

    def reply(self, text: str) -> Generator[str, None, None]:
        """The model's answer to `text`, piece by piece as it is sampled. The exchange joins the
        history when the reply ends, or when the iterator is closed early (the reply so far)."""
        prompt, max_tokens = self._prompt([*self.history, {"role": "user", "content": text}])
        sampling = Sampling(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=None,
            top_k=None,
            stop=prompt.stop,
            n_top_logprobs=None,
            strip=prompt.strip,
            end_ids=prompt.end_ids,
        )
        said = ""
        try:
            for event in generate_choice(self.loaded, 0, prompt.ids, sampling, self.generator, threading.Event()):
                if isinstance(event, Piece):
                    said += event.text
                    yield event.text
        finally:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": said}]

    def _prompt(self, messages: list[dict[str, str]]) -> tuple[ChatPrompt, int]:
        """The prompt of `messages` (user last) that leaves room for a reply, and that room:
        the oldest exchanges are left out until min(max_tokens, half the context) fit."""
        limit = self.loaded.config.model.max_seq_len
        system, turns = messages[: 1 if self.system else 0], messages[1 if self.system else 0 :]
        left_out = 0
        while True:
            prompt = chat_prompt(self.loaded, system + turns[left_out:])
            if len(prompt.ids) + min(self.max_tokens, limit // 2) <= limit or left_out + 1 == len(turns):
                break
            left_out += 2  # a user message and its reply
        if len(prompt.ids) >= limit:
            raise ChatError(
                f"the message is {len(prompt.ids)} tokens with the chat format, too long for the model's "
                f"context of {limit} tokens"
            )
        if left_out > self.left_out:
            self.say(f"the oldest {left_out} messages no longer fit the {limit}-token context: left out")
        self.left_out = left_out
        return prompt, min(self.max_tokens, limit - len(prompt.ids))
