"""`simone export --format hf` and the package's `hf/` folder: `transformers` opens them in a
process that never imports simone, and gets our logits, our token ids and our greedy text."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

from simone.cli import main
from simone.config import save_config
from simone.inference.load import load_model
from simone.model import build_model
from simone.inference.package import package_run
from simone.rundir import RunDir
from simone.checkpoint import save_checkpoint
from train_support import new_run

pytest.importorskip("transformers")

PROMPT = "The lord god of heaven"
N_GREEDY = 32
# Runs in a fresh interpreter without PYTHONPATH: transformers alone reads each folder.
HF_SIDE = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = json.load(open(sys.argv[1]))
    results = {}
    for name, folder in job["folders"].items():
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = [tok(s).input_ids for s in job["strings"]]
        with torch.no_grad():
            logits = model(torch.tensor([job["logit_ids"]])).logits[0]
            prompt = tok(job["prompt"], return_tensors="pt").input_ids
            greedy = model.generate(prompt, max_new_tokens=job["n_greedy"], do_sample=False)
        torch.save(logits, job["out"] + f"/{name}.logits.pt")
        results[name] = {
            "class": type(model).__name__, "ids": ids,
            "decoded": [tok.decode(i) for i in ids],
            "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
            "greedy": greedy[0, prompt.size(1):].tolist(),
        }
    results["simone_imported"] = "simone" in sys.modules
    json.dump(results, open(job["out"] + "/results.json", "w"))
""")


def tokenizer_strings(domains: list[str]) -> list[str]:
    """A few hundred strings: words, Unicode, whitespace runs, control tokens, random mixes."""
    fixed = ["", " ", "  ", "\t", "\n", "\n\n\n", " \t \n ", "   leading", "trailing   ", "a  b   c    d",
             "line\r\nbreak", "tab\there", "In the beginning God created the heaven and the earth.",
             "café naïve résumé", "Ωμέγα λόγος", "Привет, мир", "中文字符测试", "日本語のテキスト",
             "한국어", "عربي", "עברית", "emoji 🙂👍🏽 family 👨‍👩‍👧", "e\u0301 combining", "\u00a0nbsp\u2009thin",
             "zero\u200bwidth", "<|endoftext|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|>",
             "text <|endoftext|> more", "<|endof", "|>", "<|", "<|domain:unknown|>", "’quotes’ “double”",
             "a . b , c ! do n't"]  # decode must not "clean up" spaces before punctuation
    for d in domains:
        fixed += [f"<|domain:{d}|>", f"<|endoftext|><|domain:{d}|>The lord", f"x<|domain:{d}|>y z"]
    rng = random.Random(0)
    pool = list("abcdefghij KLMNOP.,;:!?'\"-\n\t  ") + list("éüß中文🙂ωж") + ["<|endoftext|>"] + [
        f"<|domain:{d}|>" for d in domains] + ["lord ", "heaven ", "poetry ", "  ", "\n\n"]
    rand = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    return fixed + rand


def _save_model_run(template: Path, dest: Path, **model) -> Path:
    """A run dir holding one checkpoint of an untrained model with random norm weights (so a
    swapped or dropped norm shows in the logits)."""
    cfg, run = new_run(template, dest)
    for k, v in model.items():
        setattr(cfg.model, k, v)
    if cfg.model.governance:
        from simone.data.tokenizer import load_tokenizer

        cfg.model.n_domains = len(load_tokenizer(run.tokenizer).domains)
    torch.manual_seed(0)
    net = build_model(cfg.model)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_config(cfg, run.config)
    save_checkpoint(run.checkpoints, 1, net.state_dict(), {}, cfg.to_dict(), best=True)
    return run.root


VARIANTS = {
    "llama": dict(n_kv_heads=2),
    "gpt2": dict(arch="gpt2"),
    "governance": dict(governance=True, policy=True, memory=False),
}


@pytest.fixture(scope="module")
def exported(template, tmp_path_factory):
    """Each variant's run exported through the CLI, plus one packaged run's hf/ folder,
    all read by transformers in one subprocess."""
    root = tmp_path_factory.mktemp("hf_export")
    runs, folders = {}, {}
    for name, model in VARIANTS.items():
        runs[name] = _save_model_run(template, root / f"run-{name}", **model)
        folders[name] = root / f"hf-{name}"
        assert main(["export", "--model", str(runs[name]), "--format", "hf", "--out", str(folders[name])]) == 0
    pkg = package_run(RunDir(runs["llama"]), root / "pkgs")
    with tarfile.open(pkg) as tar:
        tar.extractall(root / "unpacked", filter="data")
    folders["package"] = next((root / "unpacked").iterdir()) / "hf"
    runs["package"] = pkg

    loaded = load_model(runs["llama"], device="cpu")
    tok = loaded.tokenizer
    strings = tokenizer_strings(tok.domains)
    logit_ids = tok.encode(PROMPT + " and the earth, the waters; the light of the day")
    out = root / "hf_side"
    out.mkdir()
    job = {"folders": {k: str(v) for k, v in folders.items()}, "strings": strings, "prompt": PROMPT,
           "logit_ids": logit_ids, "n_greedy": N_GREEDY, "out": str(out)}
    (root / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", HF_SIDE, str(root / "job.json")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    return dict(runs=runs, folders=folders, results=results, strings=strings, logit_ids=logit_ids,
                out=out, tokenizer=tok)


def test_transformers_reads_the_folders_without_importing_simone(exported):
    assert exported["results"]["simone_imported"] is False
    classes = {name: exported["results"][name]["class"] for name in exported["folders"]}
    assert classes == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
                       "governance": "LlamaForCausalLM", "package": "LlamaForCausalLM"}
    for name, folder in exported["folders"].items():
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "generation_config.json", "README.md"]), name
        eod = exported["tokenizer"].eod_id
        assert exported["results"][name]["special"] == [eod, eod, eod], name


@pytest.mark.parametrize("name", ["llama", "gpt2", "governance", "package"])
def test_logits_match_ours(exported, name):
    loaded = load_model(exported["runs"][name], device="cpu")
    with torch.no_grad():
        ours, _ = loaded.model(torch.tensor([exported["logit_ids"]]))
    theirs = torch.load(exported["out"] / f"{name}.logits.pt", weights_only=True)
    torch.testing.assert_close(theirs, ours[0], rtol=0, atol=1e-4)
    assert ours.abs().max() > 0.1  # not a vacuous comparison of near-zero logits


@pytest.mark.parametrize("name", ["llama", "package"])
def test_tokenizer_gives_our_ids_and_text_back(exported, name):
    tok, results = exported["tokenizer"], exported["results"][name]
    strings = exported["strings"]
    assert len(strings) >= 300
    # the Hugging Face tokenizer reads special-token strings as their ids (allow_special)
    assert results["ids"] == [tok.encode(s, allow_special=True) for s in strings]
    assert results["decoded"] == strings
    n_control = sum(tok.eod_id in ids or any(i in ids for i in map(tok.domain_token_id, tok.domains))
                    for ids in results["ids"])
    assert n_control > 20  # control tokens were really exercised


@pytest.mark.parametrize("name", ["llama", "gpt2", "governance"])
def test_greedy_continuation_matches_ours(exported, name):
    loaded = load_model(exported["runs"][name], device="cpu")
    tok = loaded.tokenizer
    prompt = torch.tensor([tok.encode(PROMPT)])
    ours = []
    for token in loaded.model.generate(prompt, N_GREEDY, temperature=0.0, eos_id=tok.eod_id):
        ours.append(int(token))
        if ours[-1] == tok.eod_id:
            break
    assert len(ours) == N_GREEDY
    assert exported["results"][name]["greedy"] == ours


def test_model_card_has_hub_metadata_and_says_what_stays_in_simone(exported):
    card = (exported["folders"]["governance"] / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: transformers" in header and "pipeline_tag: text-generation" in header
    assert card.startswith("---\n") and "policy head" in card and "simone" in card
    assert "policy head" not in (exported["folders"]["llama"] / "README.md").read_text()
    config = json.loads((exported["folders"]["gpt2"] / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]


def test_package_manifest_covers_the_hf_folder(exported):
    from simone.inference.package import verify_hf_folder
    from simone.checkpoint import verify_checkpoint

    package_dir = exported["folders"]["package"].parent
    verify_checkpoint(package_dir)  # what simone loads: plain names only
    manifest = verify_hf_folder(package_dir)
    assert "hf/model.safetensors" in manifest["hf_files"] and "hf/tokenizer.json" in manifest["hf_files"]
    with open(package_dir / "hf" / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(Exception, match="hf/config.json"):
        verify_hf_folder(package_dir)


def test_memory_slots_are_refused_in_one_line(template, tmp_path, capsys):
    run = _save_model_run(template, tmp_path / "run", governance=True, policy=False, memory=True)
    out = tmp_path / "hf"
    assert main(["export", "--model", str(run), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "memory" in err
    assert not out.exists() or not any(out.iterdir())


def test_export_refuses_a_folder_holding_other_files(exported, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["export", "--model", str(exported["runs"]["llama"]), "--format", "hf",
                 "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"
