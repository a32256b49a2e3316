"""The language models: `Transformer` (Llama-style, "Enhanced SIM-ONE") and `GPT2` (legacy
"MVLM-GPT2" baseline), both with the interface of `LanguageModel`."""

from __future__ import annotations

from simone.config import ModelConfig, check_levers
from simone.model.attention import KVCache, StreamingKVCache
from simone.model.base import LanguageModel
from simone.model.governance_heads import check_governance_config, set_policy_domains
from simone.model.gpt2 import GPT2
from simone.model.sampling import filter_logits, sample_next_token
from simone.model.transformer import Transformer

ARCHITECTURES = ("llama", "gpt2")


def build_model(cfg: ModelConfig) -> LanguageModel:
    """The model `cfg.arch` names ("llama" or "gpt2"), freshly initialised on the CPU in float32.

    model.governance=true (Llama-style only) adds the governance parts its switches name;
    see simone/model/governance_heads.py; the levers of nanochat's recipe (simone/config.py) are
    checked here too."""
    check_governance_config(cfg)
    check_levers(cfg)
    if cfg.arch == "llama":
        return Transformer(cfg)
    if cfg.arch == "gpt2":
        return GPT2(cfg)
    raise ValueError(f"model.arch={cfg.arch!r}: choose one of {', '.join(ARCHITECTURES)}")


__all__ = [
    "ARCHITECTURES",
    "GPT2",
    "KVCache",
    "LanguageModel",
    "StreamingKVCache",
    "Transformer",
    "build_model",
    "filter_logits",
    "sample_next_token",
    "set_policy_domains",
]
