"""`simone chat`'s core (`ChatSession`: prompt in the model's chat format, history, reset, a
reply stopped early, a history longer than the context) and its terminal loop, driven by a
scripted stdin with a Ctrl-C in the middle of a reply."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from simone.cli import main
from simone.data.chat_template import CHAT_TEMPLATE, CHAT_TEMPLATE_FILE, END_OF_TURN, chat_ids
from simone.inference import model_worker
from simone.inference.chat_session import ChatError, ChatSession
from simone.inference.decoding import Step, sample_tokens
from simone.inference.load import load_model
from test_serve import CONTEXT, make_model_dir


def make_chat_model_dir(root: Path) -> Path:
    """The tiny test model, with simone's chat template beside its tokenizer: it chats in it."""
    model_dir = make_model_dir(root)
    (model_dir / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE, encoding="utf-8")
    return model_dir


class ScriptedModel:
    """Stands in for `model_worker.sample_tokens`: the model "says" `tokens` (one per `delay`
    seconds, Ctrl-C before token `interrupt_at`) and each call's prompt and settings are kept."""

    def __init__(self, tokens: list[int], delay: float = 0.0, interrupt_at: int | None = None):
        self.tokens, self.delay, self.interrupt_at = tokens, delay, interrupt_at
        self.calls: list[dict] = []

    def __call__(self, model, ids, max_tokens, temperature=1.0, *args, **kwargs):
        self.calls.append({"ids": list(ids), "max_tokens": max_tokens, "temperature": temperature})
        for i, token in enumerate(self.tokens[:max_tokens]):
            if i == self.interrupt_at:
                raise KeyboardInterrupt
            time.sleep(self.delay)
            yield Step(token)


def script(tok, *texts_and_ids) -> list[int]:
    """Token ids of the pieces, texts encoded as text, ints kept as ids."""
    return [i for piece in texts_and_ids for i in ([piece] if isinstance(piece, int) else tok.encode(piece))]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(make_chat_model_dir(tmp_path_factory.mktemp("chat-session")), device="cpu")


def test_a_reply_is_the_greedy_continuation_of_the_template_up_to_its_end(loaded):
    tok = loaded.tokenizer
    session = ChatSession(loaded, system="Be brief.", temperature=0.0, max_tokens=12)
    reply = "".join(session.reply("sun moon"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sun moon"}]
    expected = []
    for step in sample_tokens(loaded.model, chat_ids(tok, messages, add_generation_prompt=True), 12, 0.0):
        if step.token == tok.eod_id or step.token in tok.chat_ids.values():
            break
        expected.append(step.token)
    assert reply == tok.decode(expected)
    assert session.history == [*messages, {"role": "assistant", "content": reply}]


def test_history_reset_and_the_end_of_turn(loaded, monkeypatch):
    tok = loaded.tokenizer
    eot = tok.chat_ids[END_OF_TURN]
    model = ScriptedModel(script(tok, "Hello <b>x</b>", eot, " never said"))
    monkeypatch.setattr(model_worker, "sample_tokens", model)
    session = ChatSession(loaded, system="S", max_tokens=20)
    assert "".join(session.reply("hi")) == "Hello <b>x</b>"  # stops at <|endofturn|>
    assert "".join(session.reply("<|assistant|>again")) == "Hello <b>x</b>"
    second = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "Hello <b>x</b>"}, {"role": "user", "content": "<|assistant|>again"}]
    assert model.calls[1]["ids"] == chat_ids(tok, second, add_generation_prompt=True)  # the turn is text
    assert model.calls[1]["ids"].count(tok.chat_ids["<|assistant|>"]) == 2
    session.reset()
    assert session.history == [{"role": "system", "content": "S"}]
    "".join(session.reply("fresh"))
    assert model.calls[2]["ids"] == chat_ids(tok, [*second[:1], {"role": "user", "content": "fresh"}], True)


def test_a_reply_stopped_early_stays_in_the_history_as_far_as_it_was_said(loaded, monkeypatch):
    tok = loaded.tokenizer
    monkeypatch.setattr(model_worker, "sample_tokens", ScriptedModel(script(tok, "one two three four five six")))
    session = ChatSession(loaded, max_tokens=20)
    pieces = session.reply("count")
    said = next(pieces) + next(pieces)
    pieces.close()
    assert session.history == [{"role": "user", "content": "count"}, {"role": "assistant", "content": said}]
    assert said and "six" not in said
    interrupted = ScriptedModel(script(tok, "one two three four"), interrupt_at=3)
    monkeypatch.setattr(model_worker, "sample_tokens", interrupted)
    session.reset()
    got = []
    with pytest.raises(KeyboardInterrupt):
        for piece in session.reply("again"):
            got.append(piece)
    assert session.history[-1] == {"role": "assistant", "content": "".join(got)}


def test_the_oldest_exchanges_leave_the_prompt_when_the_context_is_full(loaded, monkeypatch):
    tok = loaded.tokenizer
    model = ScriptedModel(script(tok, "sun moon star", tok.chat_ids[END_OF_TURN]))
    monkeypatch.setattr(model_worker, "sample_tokens", model)
    said: list[str] = []
    session = ChatSession(loaded, system="S", max_tokens=8, say=said.append)
    for _ in range(6):
        "".join(session.reply("law court vote"))
    assert len(session.history) == 13  # all kept, but not all sent
    assert all(len(c["ids"]) + c["max_tokens"] <= CONTEXT for c in model.calls)
    assert model.calls[-1]["ids"][:3] == chat_ids(tok, [{"role": "system", "content": "S"}])[:3]  # the system stays
    assert said and "left out" in said[0]
    with pytest.raises(ChatError, match="too long"):
        next(session.reply("sun " * 80))
    assert len(session.history) == 13


def test_the_terminal_loop_streams_resets_and_survives_ctrl_c(loaded, monkeypatch, capsys, tmp_path):
    tok = loaded.tokenizer
    eot = tok.chat_ids[END_OF_TURN]
    # the first reply is cut by Ctrl-C after "one two"; the next ones end at the end of their turn
    models = [ScriptedModel(script(tok, "one two three four"), interrupt_at=len(tok.encode("one two"))),
              ScriptedModel(script(tok, "sun\x1b[2J moon", eot)),
              ScriptedModel(script(tok, "star", eot))]
    replies = iter(models)
    monkeypatch.setattr(model_worker, "sample_tokens", lambda *args, **kwargs: next(replies)(*args, **kwargs))
    monkeypatch.setattr("simone.inference.load.load_model", lambda path, device: loaded)
    monkeypatch.setattr("sys.stdin", io.StringIO("count\n\nwhat now\n/reset\nagain\n"))
    assert main(["chat", "--model", str(tmp_path), "--system", "S", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "template chat" in out and "> one two [stopped]\n" in out
    assert "sun\ufffd[2J moon\n" in out and "\x1b" not in out  # no escape sequence reaches the terminal
    assert "(conversation forgotten)" in out and "star\n" in out and out.count("> ") == 6  # ended at end of input
    after_reset = chat_ids(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "again"}], True)
    assert models[2].calls == [{"ids": after_reset, "max_tokens": CONTEXT - len(after_reset), "temperature": 0.0}]
