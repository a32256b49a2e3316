"""Chat fine-tuning: conversations in both formats become ids with a loss mask over exactly the
assistant turns; bad lines are named (or skipped and counted); over-long conversations are split
or dropped and counted; a tiny `simone finetune` lowers the held-out assistant loss and packages
a model that names its parent; an old tokenizer without chat tokens gets them."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from simone.cli import main
from simone.config import save_config
from simone.data.chat_data import (
    ChatCounts,
    ChatDataError,
    build_chat_shards,
    chat_example,
    fit_to_context,
    read_chats,
)
from simone.data.chat_demo import DEMO_COUNTS, demo_conversations, scripture_verses
from simone.data.chat_template import CHAT_TOKENS, END_OF_TURN
from simone.data.default_corpus import default_corpus_dir
from simone.data.loader import BatchLoader, eval_windows
from simone.data.shards import TokenShard, build_shards
from simone.data.tokenizer import load_tokenizer
from simone.inference.generate import sample_text
from simone.inference.load import load_model
from simone.inference.package import package_run
from simone.inference.shard_loss import evaluate_per_domain
from simone.rundir import RunDir, sha256_file
from simone.train.trainer import train
from simone.workflows.finetune import finetune
from train_support import DOMAINS, new_run

SYSTEM = {"role": "system", "content": "Answer briefly."}


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _write(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def tok(template):
    return load_tokenizer(template / "tokenizer" / "tokenizer.json")


def test_both_formats_are_read(tmp_path):
    chats = tmp_path / "chats.jsonl"
    _write(chats, [
        {"messages": [SYSTEM, _turn("user", "light?"), _turn("assistant", "day"), _turn("user", "and?"),
                      _turn("assistant", "night")]},
        "",
        {"prompt": "seed", "completion": "fruit", "task": "nature"},
    ])
    first, second = read_chats(chats)
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert second.messages == [_turn("user", "seed"), _turn("assistant", "fruit")]
    assert (first.line, second.line, second.task) == (1, 3, "nature")


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "not valid JSON|Expecting"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "message 0 must be"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"prompt": "hi"}', "'prompt' and 'completion' must both be strings"),
    ('["a list"]', "expected a JSON object"),
])
def test_a_malformed_line_is_named_or_skipped_and_counted(tmp_path, bad, problem):
    chats = tmp_path / "chats.jsonl"
    _write(chats, [{"prompt": "a", "completion": "b"}, bad, {"prompt": "c", "completion": "d"}])
    with pytest.raises(ChatDataError, match=rf"chats.jsonl:2: .*({problem})"):
        read_chats(chats)
    counts = ChatCounts()
    assert len(read_chats(chats, skip_bad=True, counts=counts)) == 2
    assert counts.skipped_bad == 1 and counts.bad_lines[0].startswith(f"{chats}:2: ")


def test_the_loss_mask_covers_exactly_the_assistant_turns(tok):
    messages = [SYSTEM, _turn("user", "light?"), _turn("assistant", "lord god"), _turn("user", "more"),
                _turn("assistant", "seed and fruit")]
    ids, mask = chat_example(tok, messages)
    assert len(ids) == len(mask)
    eot = tok.chat_ids[END_OF_TURN]
    trained = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(trained) == f"lord god{END_OF_TURN}seed and fruit{END_OF_TURN}"
    assert trained.count(eot) == 2 and ids.count(eot) == 5  # system and user turns' ends are not trained


def test_over_long_conversations_are_split_or_dropped_and_counted(tok):
    exchanges = [m for i in range(6) for m in (_turn("user", f"light {i} day"), _turn("assistant", "lord god heaven"))]
    long_conversation = [SYSTEM, *exchanges]
    size = len(chat_example(tok, [SYSTEM, *exchanges[:4]])[0])  # room for two exchanges
    counts = ChatCounts()
    pieces = fit_to_context(tok, long_conversation, size, counts)
    assert counts.split == 1 and len(pieces) == 3
    assert all(p[0] == SYSTEM and len(chat_example(tok, p)[0]) <= size for p in pieces)
    assert [m for p in pieces for m in p[1:]] == exchanges  # nothing lost, nothing repeated but the system turn
    assert fit_to_context(tok, [_turn("user", "x " * 200), _turn("assistant", "y")], size, counts) == []
    assert counts.dropped == 1


def test_chat_shards_pack_whole_conversations_and_mask_the_targets(tmp_path, tok):
    chats = tmp_path / "chats.jsonl"
    rows = [{"prompt": f"light {i}", "completion": "lord god heaven"} for i in range(60)]
    rows.append({"prompt": "x " * 300, "completion": "too long"})
    _write(chats, rows)
    index = build_chat_shards(chats, tok, tmp_path / "data", seq_len=32, val_fraction=0.2)
    assert index["chats"]["dropped"] == 1
    assert index["chats"]["pieces"]["val"] >= 1 and sum(index["chats"]["pieces"].values()) == 60
    shard = TokenShard(tmp_path / "data", "train")
    assert shard.mask is not None and (shard.n_tokens - 1) % 32 == 0
    x, y = BatchLoader(shard, 4, 32, seed=0).next_batch()
    eod = tok.eod_id
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert row_x[0] == eod  # every window opens at a conversation
        trained = tok.decode(t for t in row_y if t != -1)
        assert trained and set(trained.split(END_OF_TURN)) == {"lord god heaven", ""}
    val = TokenShard(tmp_path / "data", "val")
    (_, y_val), *_ = eval_windows(val, None, 32, 1, 4)
    assert (y_val != -1).any() and np.all(np.isin(y_val[y_val != -1].numpy(), shard.tokens[shard.mask == 1]))
    # the same file and settings: kept as it is
    assert build_chat_shards(chats, tok, tmp_path / "data", seq_len=32, val_fraction=0.2) == index


# ----------------------------------------------------------------------------- end to end


def _parent_package(template, root, name: str, strip_chat_tokens: bool = False):
    """A briefly pretrained tiny model, packaged (optionally from before chat tokens: vocab 320)."""
    cfg, run = new_run(template, root / name, max_steps=30, eval_every=30, checkpoint_every=30)
    if strip_chat_tokens:
        data = json.loads(run.tokenizer.read_text(encoding="utf-8"))
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in CHAT_TOKENS]
        run.tokenizer.write_text(json.dumps(data), encoding="utf-8")
        run.chat_template.unlink()
        (run.data / "index.json").unlink()
        build_shards(run.documents, load_tokenizer(run.tokenizer), run.data)
        cfg.model.vocab_size = load_tokenizer(run.tokenizer).vocab_size
        save_config(cfg, run.config)
    train(cfg, run)
    return package_run(run, root / "pkgs")


def _domain_chats(path) -> None:
    """A learnable task: name the domain of a word (each word asked twice, in two phrasings)."""
    rows = [{"prompt": f"{q} {w}?", "completion": domain, "task": "domain"}
            for domain, words in DOMAINS.items() for w in words for q in ("Where is", "Which domain has")]
    _write(path, rows)


@pytest.fixture(scope="module")
def finetuned(template, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    parent = _parent_package(template, root, "parent")
    chats = root / "chats.jsonl"
    _domain_chats(chats)
    argv = ["finetune", "--model", str(parent), "--data", str(chats), "--out", str(root / "ft"),
            "--package-dir", str(root / "pkgs"), "--max-steps", "60", "--eval-items", "8",
            "--set", "train.device=cpu", "--set", "train.eval_every=20"]
    assert main(argv) == 0
    return dict(root=root, parent=parent, run=RunDir(root / "ft"), argv=argv)


def test_finetune_lowers_the_held_out_assistant_loss(finetuned):
    run = finetuned["run"]
    with load_model(finetuned["parent"]) as parent:
        before = evaluate_per_domain(parent.model, TokenShard(run.data, "val"), 64, 8, 4)["val_loss"]
    report = json.loads((run.validation / "report.json").read_text())
    assert report["ok"] and report["val_loss"] < 0.7 * before
    chat_eval = report["chat_eval"]
    assert chat_eval["before"]["val_loss"] == pytest.approx(before, rel=1e-5)
    assert chat_eval["after"]["val_loss"] == pytest.approx(report["val_loss"], rel=1e-5)
    assert set(chat_eval) >= {"before", "after", "data"} and chat_eval["after"]["items"] >= 1
    assert chat_eval["after"]["ends_turn"] >= chat_eval["before"]["ends_turn"]
    assert "## Chat fine-tuning" in (run.validation / "report.md").read_text()


def test_the_package_records_its_parent(finetuned):
    (package,) = [p for p in (finetuned["root"] / "pkgs").glob("*.tar.gz") if p != finetuned["parent"]]
    with load_model(package) as child:
        parent = child.config.train.parent
        assert child.tokenizer.has_chat_tokens
    assert parent["name"] == finetuned["parent"].name.removesuffix(".tar.gz")
    assert parent["sha256"] == sha256_file(finetuned["parent"])
    summary = json.loads((finetuned["root"] / "pkgs" / (package.name[:-7] + ".training_summary.json")).read_text())
    assert summary["validation"]["chat_eval"]["after"] is not None


def test_a_bad_line_stops_finetune_naming_it_unless_skipped(finetuned, tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    _domain_chats(chats)
    chats.write_text(chats.read_text() + '{"prompt": "no completion"}\n')
    n = len(chats.read_text().splitlines())
    argv = [a if a != str(finetuned["root"] / "ft") else str(tmp_path / "ft") for a in finetuned["argv"]]
    argv[argv.index("--data") + 1] = str(chats)
    argv[argv.index("--max-steps") + 1] = "2"
    assert main(argv) == 2
    assert f"chats.jsonl:{n}: 'prompt' and 'completion' must both be strings" in capsys.readouterr().err
    assert main([*argv, "--skip-bad", "--force"]) == 0
    index = json.loads((tmp_path / "ft" / "data" / "index.json").read_text())
    assert index["chats"]["skipped_bad"] == 1


def test_an_old_tokenizer_gets_the_chat_tokens(template, tmp_path):
    parent = _parent_package(template, tmp_path, "old", strip_chat_tokens=True)
    chats = tmp_path / "chats.jsonl"
    _domain_chats(chats)
    result = finetune(parent, tmp_path / "ft", data=chats, overrides=["train.device=cpu"], max_steps=4,
                      eval_items=2, package_dir=tmp_path / "pkgs")
    assert result.ok and result.chat_eval["chat_tokens_added"]
    with load_model(parent) as old, load_model(tmp_path / "ft" / "init" / f"{parent.name[:-7]}+chat-tokens") as grown:
        assert (old.tokenizer.vocab_size, grown.tokenizer.vocab_size) == (320, 324)
        text = "Lord god of heaven, <|user|> and 中文."
        assert grown.tokenizer.encode(text) == old.tokenizer.encode(text)  # plain text as before
        rows = grown.model.tok_embeddings.weight
        assert rows.shape[0] == 324 and torch.allclose(rows[:320], old.model.tok_embeddings.weight)
        assert torch.allclose(rows[320:], old.model.tok_embeddings.weight.mean(0).expand(4, -1))
        assert grown.config.train.parent["sha256"] == sha256_file(parent)
    with load_model(result.package) as child:
        assert child.config.model.vocab_size == 324 and child.tokenizer.has_chat_tokens
        assert child.config.train.parent["parent"]["name"] == parent.name[:-7]
        assert sample_text(child, prompt="The ", max_tokens=5)  # still generates
    with tarfile.open(result.package) as tar:
        card = tar.extractfile(f"{result.package.name[:-7]}/README.md").read().decode()
    assert "The parent's tokenizer had no chat tokens: the 4 were added" in card


def test_the_demo_set_is_built_the_same_every_time():
    first, second = demo_conversations(), demo_conversations()
    assert first == second and len(first) == sum(DEMO_COUNTS.values())
    asked = [c["messages"][0]["content"] for c in first]
    assert len(set(asked)) == len(asked)
    verses = dict(scripture_verses(default_corpus_dir()))
    quote = next(c for c in first if c["task"] == "quote")
    ref = quote["messages"][0]["content"].removeprefix("Quote ").removesuffix(".")
    assert verses[ref] == quote["messages"][1]["content"]
    assert verses["John 3:16"].startswith("For God so loved the world")


def test_a_finetune_resumes_from_its_checkpoint(finetuned, tmp_path):
    chats = tmp_path / "chats.jsonl"
    _domain_chats(chats)
    common = dict(overrides=["train.device=cpu", "train.checkpoint_every=2"], eval_items=2, package_dir=tmp_path / "pkgs")
    first = finetune(finetuned["parent"], tmp_path / "ft", data=chats, max_steps=2, **common)
    resumed = finetune(None, tmp_path / "ft", resume="latest", max_steps=4, **common)
    assert (first.training.steps, resumed.training.steps) == (2, 4)
    events = [json.loads(line).get("event") for line in RunDir(tmp_path / "ft").metrics.read_text().splitlines()]
    assert "resume" in events and resumed.chat_eval["before"] == first.chat_eval["before"]
