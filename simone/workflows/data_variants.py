"""Data variants of `simone ablate --data-variant NAME=SPEC`: the same recipe, tokenizer and
token budget trained on other data, so that what the data is worth can be measured.

    raw                    the base corpus read with curation off
    strict                 the base corpus without its flagged files
    contradict:P[:KINDS]   contradictions injected into a share P of the training documents
                           (`simone.data.contradict`; the changes listed in contradictions.jsonl)
    mix:DIR:P              a share P of the training tokens replaced by text of the corpus DIR
    DIR                    another corpus folder, curated as the base is

Every variant keeps the base's validation documents, unchanged, as its own validation split,
so validation bpb and the consistency suite read the same held-out text for every variant;
a training document that is one of them (by id or by text) is dropped, and the head of a
held-out slice keeps only its head, so held-out text never trains. The tokenizer is the
base's: trained once, on the base corpus, and shared by every variant. Each variant is
prepared once into OUT/data_variants/NAME (documents.jsonl, shards, variant.json saying
what was done).
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simone.config import Config
from simone.data.contradict import ContradictSpecError, contradict_documents, parse_contradict_spec
from simone.data.documents import read_documents, write_documents
from simone.data.shards import build_shards
from simone.data.split import split_key
from simone.data.tokenizer import Tokenizer
from simone.progress import Say, Show, quiet
from simone.rundir import RunDir, atomic_write_json
from simone.workflows.pipeline import stage_curate

BASE = "curated"  # the base corpus as curated: the reference every data variant is compared with
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class DataVariantError(ValueError):
    """A data variant that cannot be read or prepared (the message names it and the problem)."""


@dataclass(frozen=True)
class DataVariant:
    name: str
    spec: str  # as the user wrote it
    kind: str  # raw | strict | contradict | mix | folder
    folder: Path | None = None  # mix and folder: the other corpus
    share: float = 0.0  # mix: the share of training tokens replaced

    def describe(self) -> str:
        return f"{self.name}={self.spec}"


def parse_data_variant(item: str, reserved: set[str] | frozenset[str] = frozenset()) -> DataVariant:
    """`NAME=SPEC` as a DataVariant; DataVariantError (one line) when it does not read, or
    NAME is taken (`reserved`: the model variants' names and `curated`)."""
    name, sep, spec = item.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name or not spec:
        raise DataVariantError(f"--data-variant {item!r}: expected NAME=SPEC, e.g. c30=contradict:0.3")
    if not _NAME.match(name) or "@" in name:
        raise DataVariantError(f"--data-variant {item!r}: a name is letters, digits and _ . + - (no @ or /)")
    if name in reserved or name == BASE:
        raise DataVariantError(f"--data-variant {item!r}: {name!r} is already a variant's name; choose another")
    if spec in ("raw", "strict"):
        return DataVariant(name, spec, spec)
    if spec.startswith("contradict:") or spec == "contradict":
        try:
            parse_contradict_spec(spec)
        except ContradictSpecError as e:
            raise DataVariantError(str(e)) from None
        return DataVariant(name, spec, "contradict")
    if spec.startswith("mix:"):
        folder_text, _, share_text = spec[len("mix:") :].rpartition(":")
        try:
            share = float(share_text)
        except ValueError:
            share = float("nan")
        if not folder_text or not 0 < share < 1:
            raise DataVariantError(
                f"--data-variant {item!r}: expected mix:DIR:P with P in (0, 1), "
                f"the share of training tokens replaced by DIR's text"
            )
        return DataVariant(name, spec, "mix", _corpus_folder(item, folder_text), share)
    return DataVariant(name, spec, "folder", _corpus_folder(item, spec))


def _corpus_folder(item: str, text: str) -> Path:
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise DataVariantError(
            f"--data-variant {item!r}: {folder}: no such folder (a corpus folder, "
            f"or raw, strict, contradict:P[:KINDS], mix:DIR:P)"
        )
    return folder


# ----------------------------------------------------------------------------- preparing one


def _text_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def _words_pattern(text: str, n_words: int = 24) -> re.Pattern:
    """The first `n_words` words of `text`, matched across any whitespace (curation with and
    without cleaning may break lines differently)."""
    return re.compile(r"\s+".join(re.escape(w) for w in text.split()[:n_words]))


class HeldOut:
    """The base's validation documents, and the rule that keeps their text out of training."""

    def __init__(self, base_documents: list[dict]):
        self.documents = [d for d in base_documents if d.get("split") == "val"]
        whole = [d for d in self.documents if "slice" not in d]
        self.ids = {d.get("id") for d in whole} | {d.get("path") for d in whole}
        self.texts = {_text_key(d.get("text") or "") for d in whole}
        # a held-out slice is the tail of a document whose head trains: only the head may train
        self.slice_heads = {d.get("path"): _words_pattern(d.get("text") or "") for d in self.documents if "slice" in d}

    def training_part(self, doc: dict, documents: list[dict]) -> dict | None:
        """`doc` (of `documents`, another reading of the corpus) as it may train: None when it
        is a copy of a held-out document; cut before a held-out slice that begins in it; None
        when its file has a held-out slice whose start is found in no part of the file, so
        held-out text can never train."""
        text = doc.get("text") or ""
        if doc.get("id") in self.ids or doc.get("path") in self.ids or _text_key(text) in self.texts:
            return None
        head = self.slice_heads.get(doc.get("path"))
        if head is None:
            return doc
        m = head.search(text)
        if m is not None:
            return doc | {"text": text[: m.start()]} if m.start() > 0 else None
        others = (d.get("text") or "" for d in documents if d.get("path") == doc.get("path") and d is not doc)
        return doc if any(head.search(t) for t in others) else None

    def training_documents(self, documents: list[dict]) -> tuple[list[dict], int]:
        """Every document of `documents` as training text, held-out text left out (see
        `training_part`); and how many were dropped for it."""
        kept = [
            part | {"split": "train"}
            for doc in documents
            if (part := self.training_part(doc, documents)) is not None and (part.get("text") or "").strip()
        ]
        return kept, len(documents) - len(kept)


def _curate_other(cfg: Config, corpus: Path | None, folder: Path, curation: bool, say: Say, show: Show) -> list[dict]:
    """Curate `corpus` (None: the base corpus) into `folder` and return its documents."""
    other = copy.deepcopy(cfg)
    other.curate.enabled = curation
    if corpus is not None:  # another corpus: every document of it is candidate training text
        other.data.data_dir = str(corpus)
        other.data.validation_dir = None
    run = RunDir(folder)
    stage_curate(other, run.root, say, show)
    return list(read_documents(run.documents))


def _token_counts(tok: Tokenizer, documents: list[dict]) -> list[int]:
    return [len(ids) for ids in tok.encode_batch([d.get("text") or "" for d in documents])]


def _cut(doc: dict, tokens: int, n_tokens: int) -> dict:
    """`doc` cut to about its first `tokens` of `n_tokens` tokens (at a character boundary)."""
    text = doc.get("text") or ""
    return doc | {"text": text[: max(1, round(len(text) * tokens / max(1, n_tokens)))]}


def mix_documents(
    train: list[dict], other: list[dict], share: float, seed: int, tok: Tokenizer
) -> tuple[list[dict], dict]:
    """Replace about `share` of the training tokens of `train` by text of `other`: whole
    documents in a seeded order (the last one cut), the same number of tokens in as out.
    A document taken in is labelled with the domain of the one whose tokens it takes, so
    the set of domains (and the tokenizer's control tokens) stays the base's."""
    counts = _token_counts(tok, train)
    total = sum(counts)
    target = round(share * total)
    order = sorted(range(len(train)), key=lambda i: (split_key(f"mix-out:{train[i].get('id')}", seed), i))
    removed, out_domains, gone = 0, [], set()
    for i in order:
        if removed >= target:
            break
        take = min(counts[i], target - removed)
        removed += take
        out_domains.append((train[i].get("domain"), take))
        if take == counts[i]:
            gone.add(i)
        else:  # keep the rest of the last document
            train[i] = _cut(train[i], counts[i] - take, counts[i])
    other_counts = _token_counts(tok, other)
    if sum(other_counts) < removed:
        raise DataVariantError(
            f"mix: the other corpus has {sum(other_counts):,} tokens, fewer than the "
            f"{removed:,} it should replace; give a larger corpus or a smaller share"
        )
    order = sorted(range(len(other)), key=lambda i: (split_key(f"mix-in:{other[i].get('id')}", seed), i))
    added, taken_in = 0, []
    slots = iter(out_domains)
    domain, room = next(slots, (None, 0))
    for i in order:
        if added >= removed:
            break
        need = min(other_counts[i], removed - added)
        doc = other[i] if need == other_counts[i] else _cut(other[i], need, other_counts[i])
        while room <= 0 and domain is not None:
            domain, room = next(slots, (None, 0))
        taken_in.append(
            doc
            | {
                "id": f"mix:{doc.get('id')}",
                "path": f"mix:{doc.get('path')}",
                "domain": domain or doc.get("domain"),
                "split": "train",
                "source_domain": doc.get("domain"),
            }
        )
        added += need
        room -= need
    kept = [d for i, d in enumerate(train) if i not in gone]
    info = {
        "training_tokens": total,
        "tokens_replaced": removed,
        "tokens_added": added,
        "documents_removed": len(gone),
        "documents_added": len(taken_in),
    }
    return kept + taken_in, info


def prepare_data_variant(
    cfg: Config, shared: RunDir, variant: DataVariant, tok: Tokenizer, out: Path, say: Say = quiet, show: Show = quiet
) -> RunDir:
    """Write the variant's documents.jsonl, shards (the shared tokenizer) and variant.json into
    `out`; returns its RunDir. A rerun writes the documents again (curation and the shards are
    reused when their inputs come out the same); a curation's lines go to `say` and `show`."""
    run = RunDir(out)
    run.data.mkdir(parents=True, exist_ok=True)
    base = list(read_documents(shared.documents))
    held = HeldOut(base)
    seed = cfg.data.split_seed
    info: dict[str, Any] = {"name": variant.name, "spec": variant.spec, "kind": variant.kind, "seed": seed}
    base_train = [d for d in base if d.get("split") == "train"]
    if variant.kind == "strict":
        train = [d for d in base_train if d.get("status") != "flagged"]
        info["flagged_documents_left_out"] = len(base_train) - len(train)
    elif variant.kind == "raw":
        train, dropped = held.training_documents(_curate_other(cfg, None, out / "curation", False, say, show))
        info["held_out_copies_left_out"] = dropped
    elif variant.kind == "folder":
        train, dropped = held.training_documents(_curate_other(cfg, variant.folder, out / "curation", True, say, show))
        info.update(corpus=str(variant.folder), held_out_copies_left_out=dropped)
    elif variant.kind == "mix":
        other, dropped = held.training_documents(_curate_other(cfg, variant.folder, out / "curation", True, say, show))
        train, mixed = mix_documents(list(base_train), other, variant.share, seed, tok)
        info.update(corpus=str(variant.folder), share=variant.share, held_out_copies_left_out=dropped, **mixed)
    elif variant.kind == "contradict":
        contradicted = contradict_documents(base, parse_contradict_spec(variant.spec), seed)
        contradicted.write(out)
        train = [d for d in contradicted.documents if d.get("split") == "train"]
        info["contradictions"] = contradicted.summary
    else:
        raise DataVariantError(f"data variant {variant.describe()}: unknown kind {variant.kind!r}")
    if not train:
        raise DataVariantError(f"data variant {variant.describe()}: no training documents left")
    write_documents(run.documents, train + held.documents)
    info["training_documents"] = len(train)
    info["training_bytes"] = sum(len((d.get("text") or "").encode("utf-8")) for d in train)
    build_shards(run.documents, tok, run.data, cfg.data.control_token_prob, cfg.data.split_seed)
    atomic_write_json(run.root / "variant.json", info)
    return run
