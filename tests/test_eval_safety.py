"""`simone eval` on models it should not trust with memory or code: a big vocabulary's logits
stay within a fixed budget (with the same bits), and a Hugging Face folder that brings its own
Python code is refused in one line, never run and never asked about."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from simone.cli import main
from simone.inference.text_bpb import TorchScorer, scoring_window, summed_log_prob

VOCAB = 20_000
WINDOW = 64
WINDOW_BYTES = 4 * WINDOW * VOCAB  # the float32 logits of one window: 5.1 MB


class LargestTensor(TorchFunctionMode):
    """Records the bytes of the largest tensor any torch call returns while it is active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.bytes = max(self.bytes, out.numel() * out.element_size())
        return out


def bigram_logits(x: torch.Tensor) -> torch.Tensor:
    """A fake model over VOCAB ids: [B, T] -> [B, T, VOCAB], each position's logits a fixed
    function of its token (so a window gives the same logits whatever batch it runs in)."""
    freq = torch.linspace(0.001, 3.0, VOCAB)
    return torch.sin(x.unsqueeze(-1).float() * freq)


def scorer(budget: int, batch_size: int = 8) -> TorchScorer:
    return TorchScorer("big-vocab", "test", bigram_logits, lambda text: [ord(c) % VOCAB for c in text],
                       start_id=0, context=WINDOW, device=torch.device("cpu"), vocab_size=VOCAB,
                       batch_size=batch_size, logits_budget_bytes=budget)


def unchunked_nll_bits(ids: list[int], context: int) -> float:
    """The reference: each window's full log-softmax at once, one window at a time."""
    from simone.inference.text_bpb import sliding_windows

    total = 0.0
    for start, end, n_scored in sliding_windows(len(ids), context):
        x, y = torch.tensor([ids[start : end - 1]]), torch.tensor(ids[start + 1 : end])
        logp = bigram_logits(x)[0].log_softmax(-1)[torch.arange(len(y)), y]
        total -= logp[-n_scored:].double().sum().item()
    return total / math.log(2)


TEXT = "In the beginning God created the heaven and the earth. " * 30  # ~1700 ids: 50-odd windows


def test_logits_held_at_once_stay_within_the_budget_and_the_bits_are_unchanged():
    budget = 3 * WINDOW_BYTES + 1000  # room for 3 windows a pass, where batch_size asks for 8
    budgeted, unbudgeted = scorer(budget), scorer(1 << 40)
    ids = budgeted.document_ids(TEXT)
    assert budgeted.context == unbudgeted.context == WINDOW  # one window fits: it is not shortened
    with LargestTensor() as seen:
        bits = budgeted.nll_bits(ids)
    assert 2 * WINDOW_BYTES < seen.bytes <= budget
    with LargestTensor() as seen_unbudgeted:
        assert unbudgeted.nll_bits(ids) == pytest.approx(bits, rel=1e-12)
    assert seen_unbudgeted.bytes >= 8 * WINDOW_BYTES  # what the budget saves: all 8 windows at once
    assert bits == pytest.approx(unchunked_nll_bits(ids, WINDOW), rel=1e-12)


def test_a_window_too_big_for_the_budget_is_shortened_to_fit():
    budget = WINDOW_BYTES // 2  # not even one window of 64 fits: windows of 32
    short = scorer(budget)
    assert short.context == WINDOW // 2 == scoring_window(WINDOW, VOCAB, budget)
    ids = short.document_ids(TEXT)
    with LargestTensor() as seen:
        bits = short.nll_bits(ids)
    assert seen.bytes <= budget
    assert bits == pytest.approx(unchunked_nll_bits(ids, WINDOW // 2), rel=1e-12)


def test_the_log_softmax_in_chunks_equals_one_over_all_positions(monkeypatch):
    monkeypatch.setattr("simone.inference.text_bpb.LOSS_CHUNK_BYTES", 4 * VOCAB * 7)  # 7 positions a chunk
    logits = bigram_logits(torch.arange(50).unsqueeze(0))[0]
    targets = torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(0))
    whole = logits.log_softmax(-1)[torch.arange(50), targets].double().sum()
    with LargestTensor() as seen:
        chunked = summed_log_prob(logits, targets)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-12)
    assert seen.bytes <= 4 * VOCAB * 7


def test_a_folder_with_its_own_code_is_refused_without_running_or_asking(tmp_path, monkeypatch, capsys):
    """transformers would ask "run the custom code? [y/N]" on a terminal (and run it on "y")."""
    from transformers import dynamic_module_utils

    ran = tmp_path / "custom code ran"
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "simone_custom_test", "architectures": ["CustomModel"],
        "auto_map": {"AutoConfig": "custom_code.CustomConfig", "AutoModelForCausalLM": "custom_code.CustomModel"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CustomTokenizer", "auto_map": {"AutoTokenizer": ["custom_code.CustomTokenizer", None]}}))
    (folder / "custom_code.py").write_text(f"from pathlib import Path\nPath({str(ran)!r}).write_text('yes')\n")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("Some text to score.\n")
    asked = []
    monkeypatch.setattr("builtins.input", lambda *prompt: asked.append(prompt) or "y")
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # if it were run

    assert main(["eval", "--model", f"hf:{folder}", "--data", str(tmp_path / "text"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(folder) in err and "never runs a model folder's code" in err
    assert not asked and not ran.exists()
