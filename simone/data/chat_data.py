"""Chat fine-tuning data: conversations (JSONL) → token shards with a loss mask.

A line of the input is one conversation, in either common format:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   (multi-turn)
    {"prompt": "...", "completion": "..."}        (one user turn, then the assistant's reply)

Blank lines are skipped; a malformed line raises `ChatDataError` naming it (`chats.jsonl:12:
...`), or with `skip_bad` is left out and counted. Each conversation is laid out by the chat
template (`chat_ids`) and its loss mask marks what fine-tuning trains on: each assistant
message's tokens and the `<|endofturn|>` that ends it, nothing else (not the prompt, the role
tokens or the padding). A conversation longer than the context is split between exchanges (the
system messages open every piece); an exchange that cannot fit even alone is dropped; the counts
go in the index.

A conversation is held out for validation by a hash of its messages (`val_fraction` of them, at
least one): the same conversation lands in the same split on every machine and in any order.
The shards are those of pretraining (simone/data/shards.py: `train.bin`, `val.bin`, one domain
"chat", `index.json`) plus a loss mask beside each (`train.mask.bin`: one uint8 per token, 1
where the token is trained on; `TokenShard.mask`). Conversations are packed into the trainer's
windows of seq_len + 1 tokens without crossing one (the rest of a window is end-of-document
padding, masked out), so every piece is seen whole, from its first token. `heldout.jsonl` keeps
the held-out pieces as messages, for the before/after replies (simone/inference/chat_eval.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from simone.data.chat_template import CHAT_TOKENS, ROLES, chat_ids
from simone.data.documents import read_documents
from simone.data.shards import INDEX_FILE, token_dtype, write_index
from simone.data.tokenizer import Tokenizer
from simone.errors import SimoneError
from simone.rundir import atomic_write_text, read_json, sha256_file

CHAT_DOMAIN = "chat"
HELDOUT_FILE = "heldout.jsonl"
Messages = list[dict[str, str]]


class ChatDataError(SimoneError, ValueError):
    """A conversations file that cannot be used; the message names the file and line."""


@dataclass
class Conversation:
    messages: Messages
    line: int  # in the input file
    task: str | None = None  # the line's optional "task" label (the demo set's kinds), for the report


@dataclass
class ChatCounts:
    """What became of the input's conversations."""

    conversations: int = 0
    skipped_bad: int = 0  # malformed lines left out (skip_bad)
    split: int = 0  # longer than the context, cut between exchanges
    dropped: int = 0  # nothing of it fits the context
    dropped_exchanges: int = 0  # exchanges too long for the context on their own, in conversations kept
    pieces: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    bad_lines: list[str] = field(default_factory=list)  # the first few skipped lines' errors


# ----------------------------------------------------------------------------- reading


def conversation_messages(obj: Any) -> Messages:
    """The messages of one parsed line (either format); ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "prompt" in obj or "completion" in obj:
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
            raise ValueError("'prompt' and 'completion' must both be strings")
        messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    else:
        raise ValueError("expected {'messages': [...]} or {'prompt': ..., 'completion': ...}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to train on")
    return messages


def read_chats(path: Path, skip_bad: bool = False, counts: ChatCounts | None = None) -> list[Conversation]:
    """The conversations of `path`. A malformed line raises ChatDataError (`path:LINE: ...`);
    with `skip_bad` it is left out and counted in `counts`."""
    path = Path(path)
    counts = counts if counts is not None else ChatCounts()
    out: list[Conversation] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    task = obj.get("task") if isinstance(obj, dict) and isinstance(obj.get("task"), str) else None
                    out.append(Conversation(conversation_messages(obj), lineno, task))
                except ValueError as e:  # json.JSONDecodeError is one
                    problem = f"{path}:{lineno}: {e}"
                    if not skip_bad:
                        raise ChatDataError(f"{problem} (--skip-bad leaves such lines out)") from e
                    counts.skipped_bad += 1
                    if len(counts.bad_lines) < 5:
                        counts.bad_lines.append(problem)
    except (OSError, UnicodeDecodeError) as e:
        raise ChatDataError(f"{path}: cannot be read as UTF-8 text ({e})") from e
    counts.conversations = len(out)
    if not out:
        raise ChatDataError(f"{path}: no conversations")
    return out


# ----------------------------------------------------------------------------- ids and loss mask


def with_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` when it has the chat tokens; else the same tokenizer with the 4 added after its
    vocabulary (plain text encodes as before; the model needs an embedding row each)."""
    if tokenizer.has_chat_tokens:
        return tokenizer
    if tokenizer.path is None:
        raise ValueError("a tokenizer without chat tokens must come from a file to have them added")
    hf = tokenizers.Tokenizer.from_file(str(tokenizer.path))
    hf.add_special_tokens([t for t in CHAT_TOKENS if t not in tokenizer.chat_ids])
    return Tokenizer(hf, tokenizer.eod_token)


def chat_example(tokenizer: Tokenizer, messages: Messages) -> tuple[list[int], list[int]]:
    """The conversation's ids (`chat_ids`) and its loss mask: 1 on each assistant message's
    tokens and its `<|endofturn|>`, 0 elsewhere."""
    ids = chat_ids(tokenizer, messages)
    mask = [0] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            # the template lays turns out one after another: the ids before turn k are a prefix
            start = len(chat_ids(tokenizer, messages[:k])) + 1  # after the <|assistant|> token
            end = len(chat_ids(tokenizer, messages[: k + 1]))
            mask[start:end] = [1] * (end - start)
    return ids, mask


def _exchanges(messages: Messages) -> tuple[Messages, list[Messages]]:
    """The leading system messages, and the rest cut before each user message."""
    n_system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    groups: list[Messages] = []
    for m in messages[n_system:]:
        if m["role"] == "user" or not groups:
            groups.append([])
        groups[-1].append(m)
    return messages[:n_system], groups


def fit_to_context(tokenizer: Tokenizer, messages: Messages, max_tokens: int, counts: ChatCounts) -> list[Messages]:
    """The conversation in pieces of at most `max_tokens` ids each, each with an assistant turn
    to train on: whole when it fits, else cut between exchanges (counted in `counts`)."""
    if len(chat_ids(tokenizer, messages)) <= max_tokens:
        return [messages]
    system, groups = _exchanges(messages)
    pieces: list[Messages] = []
    current: Messages = []
    dropped = 0
    for group in groups:
        if current and len(chat_ids(tokenizer, system + current + group)) <= max_tokens:
            current += group
            continue
        if current:
            pieces.append(system + current)
        current = group
        if len(chat_ids(tokenizer, system + group)) > max_tokens:
            current, dropped = [], dropped + 1
    if current:
        pieces.append(system + current)
    pieces = [p for p in pieces if any(m["role"] == "assistant" for m in p)]  # else nothing to train on
    if not pieces:
        counts.dropped += 1
    else:
        counts.split += 1
        counts.dropped_exchanges += dropped
    return pieces


def held_out(messages: Messages, val_fraction: float) -> tuple[bool, float]:
    """Whether a conversation is held out, and the hash in [0, 1) that decides it."""
    key = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")
    u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
    return u < val_fraction, u


# ----------------------------------------------------------------------------- shards


def pack_windows(
    examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """One token stream, its mask, and each example's (start, end): examples in order, none
    crossing a window (window w is tokens [w*seq_len, w*seq_len + seq_len + 1), as the loader
    reads them), padded with `pad_id` (mask 0) to the next window where one would not fit, and
    at the end to a whole number of windows."""
    tokens: list[int] = []
    mask: list[int] = []
    spans: list[tuple[int, int]] = []
    for ids, m in examples:
        pos = len(tokens)
        if pos + len(ids) > (pos // seq_len) * seq_len + seq_len + 1:
            pad = (pos // seq_len + 1) * seq_len - pos
            tokens += [pad_id] * pad
            mask += [0] * pad
        spans.append((len(tokens), len(tokens) + len(ids)))
        tokens += ids
        mask += m
    n_windows = max(1, -(-(len(tokens) - 1) // seq_len))
    pad = n_windows * seq_len + 1 - len(tokens)
    return np.array(tokens + [pad_id] * pad), np.array(mask + [0] * pad, dtype=np.uint8), spans


def _is_current(index: dict | None, stamp: dict, data_dir: Path) -> bool:
    if not index or index.get("chat_stamp") != stamp:
        return False
    return all(
        (data_dir / index["splits"][s][key]).is_file() for s in ("train", "val") for key in ("file", "mask_file")
    )


def build_chat_shards(
    chats: Path, tokenizer: Tokenizer, data_dir: Path, seq_len: int, val_fraction: float = 0.1, skip_bad: bool = False
) -> dict:
    """Read `chats`, lay the conversations out with their loss masks and write `data_dir/`
    {train,val}.bin, {train,val}.mask.bin, heldout.jsonl and index.json (its `chats`: the
    counts). Conversations longer than seq_len + 1 tokens (the context, with the opening token
    that is never predicted) are split or dropped. Returns the index; one already built from
    the same file, tokenizer and settings is kept."""
    chats, data_dir = Path(chats), Path(data_dir)
    if not chats.is_file():
        raise ChatDataError(f"{chats}: no such conversations file")
    stamp = {
        "chats_sha256": sha256_file(chats),
        "tokenizer_sha256": tokenizer.sha256,
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "skip_bad": skip_bad,
    }
    existing = read_json(data_dir / INDEX_FILE)
    if _is_current(existing, stamp, data_dir):
        return existing
    counts = ChatCounts()
    conversations = read_chats(chats, skip_bad, counts)
    hashes = [held_out(c.messages, val_fraction) for c in conversations]
    if not any(val for val, _ in hashes):  # at least one held out: the lowest hash
        lowest = min(range(len(hashes)), key=lambda i: hashes[i][1])
        hashes[lowest] = (True, hashes[lowest][1])
    split_of = ["val" if val else "train" for val, _ in hashes]
    pieces: dict[str, list[Messages]] = {"train": [], "val": []}
    names: dict[str, list[str]] = {"train": [], "val": []}
    heldout: list[str] = []
    for conv, split in zip(conversations, split_of):
        conv_pieces = fit_to_context(tokenizer, conv.messages, seq_len + 1, counts)
        for n, piece in enumerate(conv_pieces):
            pieces[split].append(piece)
            names[split].append(f"line{conv.line}" + (f".{n + 1}" if len(conv_pieces) > 1 else ""))
            if split == "val":
                heldout.append(
                    json.dumps({"line": conv.line, "task": conv.task, "messages": piece}, ensure_ascii=False)
                )
        counts.pieces[split] += len(conv_pieces)
    if not pieces["train"] or not pieces["val"]:
        raise ChatDataError(
            f"{chats}: {counts.pieces['train']} conversation pieces to train on and {counts.pieces['val']} held out "
            f"({counts.dropped} longer than the context of {seq_len + 1} tokens dropped): both need one"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {
        split: _write_split(data_dir, split, pieces[split], names[split], tokenizer, seq_len, dtype)
        for split in ("train", "val")
    }
    atomic_write_text(data_dir / HELDOUT_FILE, "".join(line + "\n" for line in heldout))
    chats_info = {"file": str(chats.resolve()), **counts.__dict__}
    return write_index(data_dir, tokenizer, chats=chats_info, chat_stamp=stamp, splits=splits)


def _write_split(
    data_dir: Path,
    split: str,
    pieces: list[Messages],
    names: list[str],
    tokenizer: Tokenizer,
    seq_len: int,
    dtype: np.dtype,
) -> dict:
    """Write SPLIT.bin and SPLIT.mask.bin; return the split's index entry (shards.py's layout)."""
    tokens, mask, spans = pack_windows([chat_example(tokenizer, p) for p in pieces], seq_len, tokenizer.eod_id)
    tokens.astype(dtype).tofile(data_dir / f"{split}.bin")
    mask.tofile(data_dir / f"{split}.mask.bin")
    # bits per byte over what the loss counts: the assistant messages' UTF-8 bytes
    n_bytes = sum(len(m["content"].encode("utf-8")) for p in pieces for m in p if m["role"] == "assistant")
    n_tokens, n_loss = len(tokens), int(mask.sum())
    docs = [[name, CHAT_DOMAIN, start, end, 0] for name, (start, end) in zip(names, spans)]
    domain = {"start": 0, "end": n_tokens, "n_tokens": n_tokens, "n_bytes": n_bytes, "n_loss_tokens": n_loss}
    return {
        "file": f"{split}.bin",
        "mask_file": f"{split}.mask.bin",
        "n_tokens": n_tokens,
        "n_loss_tokens": n_loss,
        "n_bytes": n_bytes,
        "n_docs": len(docs),
        "docs": docs,
        "domains": {CHAT_DOMAIN: {**domain, "n_docs": len(docs), "n_slices": 0, "ranges": [[0, n_tokens]]}},
        "control_docs": [],
        "slices": [],
    }


def heldout_conversations(data_dir: Path) -> Iterator[dict]:
    """The held-out pieces `build_chat_shards` wrote: {"line", "task", "messages"} each."""
    return read_documents(Path(data_dir) / HELDOUT_FILE)
