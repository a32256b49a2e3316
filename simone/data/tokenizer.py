"""Byte-level BPE tokenizer: train on the training split, save, load, encode, decode.

The tokenizer is Hugging Face `tokenizers` BPE over bytes (GPT-2 style): a byte-level
pre-tokenizer without an added prefix space, no normalizer and a byte-level decoder, so
`decode(encode(text)) == text` for every Unicode string. Before the byte-level split, runs of
MAX_RUN_CHARS whitespace (or non-whitespace) characters are cut off as pieces of their own:
BPE training time grows with the square of a pre-token's length, and one file ending in
megabytes of spaces made a single multi-megabyte "word" that never finished training. The
cut is part of the pre-tokenizer saved in tokenizer.json, so training and every later
encoding (and a Hugging Face export) cut the same way; it only adds piece boundaries, so
the round trip stays exact. Special tokens come first in the
vocabulary: the end-of-document token (id 0) and one control token `<|domain:NAME|>` per
corpus domain (ids 1..), which a later stage uses to steer generation. The chat tokens
(`<|system|>`, `<|user|>`, `<|assistant|>`, `<|endofturn|>`, simone/data/chat_template.py) come
last, after the configured vocabulary (so vocab_size is tokenizer.vocab_size + 4): plain text
tokenizes exactly as it did without them. A tokenizer trained before them has none
(`has_chat_tokens`); it is kept as it is while its stamp matches.

Plain text never turns into special tokens: `encode(text)` treats "<|endoftext|>" inside a
document as ordinary characters. Special ids enter a sequence only on purpose, through
`eod_id`, `domain_token_id(name)`, `chat_ids` or `encode(text, allow_special=True)`.

Training is skipped when `documents.jsonl`, the config and the domain list are unchanged
(a `stamp.json` beside `tokenizer.json` records them).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from simone.config import TokenizerConfig
from simone.data.chat_template import CHAT_TEMPLATE, CHAT_TEMPLATE_FILE, CHAT_TOKENS
from simone.data.documents import read_documents
from simone.rundir import atomic_write_json, atomic_write_text, read_json, sha256_file

TOKENIZER_FILE = "tokenizer.json"
STAMP_FILE = "stamp.json"
# bandit B105: token markers, not passwords (the rule matches names ending in "token")
DOMAIN_TOKEN_PREFIX = "<|domain:"  # nosec B105
DOMAIN_TOKEN_SUFFIX = "|>"  # nosec B105

# Long documents are cut into chunks at a newline between two non-space characters. The
# byte-level pre-tokenizer never joins characters across such a newline, so encoding the
# chunks one by one gives exactly the ids of encoding the whole text — while letting the
# Rust side spread one long book over all cores.
CHUNK_CHARS = 1 << 14
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
# The longest run of whitespace (or of non-whitespace) one pre-token may hold. Ordinary text
# stays far below it (indentation, separator lines), so its encoding does not change.
MAX_RUN_CHARS = 256


def domain_token(name: str) -> str:
    """The control token string for a domain, e.g. `<|domain:technical|>`."""
    return f"{DOMAIN_TOKEN_PREFIX}{name}{DOMAIN_TOKEN_SUFFIX}"


def split_for_encoding(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `chunk_chars` whose encodings concatenate to the
    encoding of `text` (cuts only after a newline that sits between non-space characters)."""
    if len(text) <= chunk_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        m = _SAFE_CUT.search(text, start + chunk_chars)
        if m is None:
            break
        pieces.append(text[start : m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces


class Tokenizer:
    """A trained byte-level BPE tokenizer (thin wrapper over `tokenizers.Tokenizer`)."""

    def __init__(self, hf: tokenizers.Tokenizer, eod_token: str, path: Path | None = None):
        serialized = hf.to_str()
        # Two Rust objects from the same JSON: one reads special-token strings in the input
        # as special tokens, the other encodes them as plain text. Keeping both (instead of
        # flipping a flag) keeps the wrapper safe to share between threads.
        self._special = tokenizers.Tokenizer.from_str(serialized)
        self._special.encode_special_tokens = False
        self._plain = tokenizers.Tokenizer.from_str(serialized)
        self._plain.encode_special_tokens = True
        self.path = path
        self.eod_token = eod_token
        eod_id = self._special.token_to_id(eod_token)
        if eod_id is None:
            raise ValueError(f"{path or 'tokenizer'}: has no end-of-document token {eod_token!r}")
        self.eod_id: int = eod_id
        self._domain_ids: dict[str, int] = {}
        self.chat_ids: dict[str, int] = {}  # chat token string -> id; {} before chat tokens
        for tid, added in sorted(self._special.get_added_tokens_decoder().items()):
            content = added.content
            if content in CHAT_TOKENS:
                self.chat_ids[content] = tid
            if content.startswith(DOMAIN_TOKEN_PREFIX) and content.endswith(DOMAIN_TOKEN_SUFFIX):
                name = content[len(DOMAIN_TOKEN_PREFIX) : -len(DOMAIN_TOKEN_SUFFIX)]
                self._domain_ids[name] = tid
        self.sha256: str = hashlib.sha256(
            path.read_bytes() if path is not None else serialized.encode("utf-8")
        ).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Number of ids (trained tokens + special tokens); every id is < vocab_size."""
        return self._special.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_tokens(self) -> bool:
        """Whether every chat token is in the vocabulary (tokenizers trained before them lack them)."""
        return len(self.chat_ids) == len(CHAT_TOKENS)

    @property
    def domains(self) -> list[str]:
        """Domain names that have a control token, in id order."""
        return list(self._domain_ids)

    def domain_token_id(self, name: str) -> int:
        """Id of `<|domain:NAME|>`; KeyError naming the known domains if there is none."""
        try:
            return self._domain_ids[name]
        except KeyError:
            known = ", ".join(self._domain_ids) or "none"
            raise KeyError(f"no control token for domain {name!r}; known domains: {known}") from None

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. With `allow_special`, special-token strings in `text`
        (`<|endoftext|>`, `<|domain:X|>`) become their single ids; otherwise they are text."""
        hf = self._special if allow_special else self._plain
        if len(text) <= CHUNK_CHARS:
            return hf.encode(text, add_special_tokens=False).ids
        return [i for piece in self.encode_batch(split_for_encoding(text), allow_special) for i in piece]

    def encode_batch(self, texts: Iterable[str], allow_special: bool = False) -> list[list[int]]:
        """Encode many texts in parallel on the Rust side (all cores)."""
        hf = self._special if allow_special else self._plain
        return [e.ids for e in hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included as their strings (exact inverse of encode)."""
        return self._special.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, tid: int) -> str | None:
        return self._special.id_to_token(tid)

    def save(self, path: Path) -> Path:
        """Write `tokenizer.json` (to `path` if it names a .json file, else into folder `path`)."""
        path = Path(path)
        target = path if path.suffix == ".json" else path / TOKENIZER_FILE
        atomic_write_text(target, self._special.to_str(pretty=True))
        return target

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eod_id={self.eod_id}, domains={self.domains}, path={self.path})"
        )


# ----------------------------------------------------------------------------- loading


def load_tokenizer(path: Path, eod_token: str | None = None) -> Tokenizer:
    """Load a tokenizer from `tokenizer.json` or the folder holding it.

    The end-of-document token is read from the stamp written by `train_tokenizer` when
    `eod_token` is not given (default `<|endoftext|>`).
    """
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: tokenizer file not found (run the tokenizer stage first)")
    try:
        hf = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a plain Exception on bad JSON
        raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from e
    if eod_token is None:
        stamp = read_json(file.parent / STAMP_FILE, default={}) or {}
        eod_token = stamp.get("eod_token") or TokenizerConfig().eod_token
    return Tokenizer(hf, eod_token, path=file)


# ----------------------------------------------------------------------------- training


def _train_texts(documents_jsonl: Path) -> Iterator[str]:
    for doc in read_documents(documents_jsonl, "train"):
        if doc.get("text"):
            yield from split_for_encoding(doc["text"])


def documents_domains(documents_jsonl: Path) -> list[str]:
    """Sorted names of every domain in `documents.jsonl` (both splits)."""
    return sorted({str(doc.get("domain") or "unknown") for doc in read_documents(documents_jsonl)})


def byte_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """GPT-2's byte-level split, after cutting every run of MAX_RUN_CHARS whitespace or
    non-whitespace characters into a piece of its own (see the module docstring)."""
    bounded_runs = Regex(rf"\s{{{MAX_RUN_CHARS}}}|\S{{{MAX_RUN_CHARS}}}")
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(bounded_runs, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def train_tokenizer(
    documents_jsonl: Path, out_dir: Path, cfg: TokenizerConfig, domains: list[str] | None = None
) -> Tokenizer:
    """Train byte-level BPE on the `train` documents of `documents_jsonl`; write
    `out_dir/tokenizer.json`, `out_dir/chat_template.jinja` and `out_dir/stamp.json`; return the
    loaded tokenizer.

    `domains` (default: every domain in the file) get `<|domain:NAME|>` control tokens.
    Returns the existing tokenizer without training when the stamp matches (same
    documents.jsonl bytes, config, domains and `tokenizers` version).
    """
    documents_jsonl, out_dir = Path(documents_jsonl), Path(out_dir)
    if not documents_jsonl.is_file():
        raise FileNotFoundError(f"{documents_jsonl}: documents file not found (run curation first)")
    stamp = {
        "documents_sha256": sha256_file(documents_jsonl),
        "vocab_size": cfg.vocab_size,
        "min_frequency": cfg.min_frequency,
        "eod_token": cfg.eod_token,
        "domains": sorted(domains) if domains is not None else None,
        "tokenizers_version": tokenizers.__version__,
    }
    tokenizer_file = out_dir / TOKENIZER_FILE
    if tokenizer_file.is_file() and read_json(out_dir / STAMP_FILE) == stamp:
        return load_tokenizer(tokenizer_file, eod_token=cfg.eod_token)

    domain_names = sorted(set(domains)) if domains is not None else documents_domains(documents_jsonl)
    special_tokens = [cfg.eod_token] + [domain_token(d) for d in domain_names]
    if cfg.vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small: byte-level BPE needs 256 byte "
            f"tokens plus {len(special_tokens)} special tokens"
        )

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = byte_level_pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    n_train = [0]

    def train_texts() -> Iterator[str]:
        for text in _train_texts(documents_jsonl):
            n_train[0] += 1
            yield text

    hf.train_from_iterator(train_texts(), trainer=trainer)
    if n_train[0] == 0:
        raise ValueError(f"{documents_jsonl}: no documents with split 'train' and text to train the tokenizer on")

    hf.add_special_tokens(list(CHAT_TOKENS))  # after the configured vocabulary: plain text is unaffected
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(hf, cfg.eod_token)
    saved = tok.save(tokenizer_file)
    atomic_write_text(out_dir / CHAT_TEMPLATE_FILE, CHAT_TEMPLATE)
    atomic_write_json(out_dir / STAMP_FILE, stamp)
    return load_tokenizer(saved, eod_token=cfg.eod_token)
