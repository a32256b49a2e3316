"""Typed configuration: dataclasses, named presets and command-line overrides.

A `Config` is a tree of small dataclasses, one per stage. Presets are functions that
return a fully filled `Config`; `--set section.field=value` and `--config FILE` edit it.
The resolved config is written to `config.json` at the start of every run, so a run can
always be reproduced from its own directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from simone.errors import SimoneError
from simone.rundir import atomic_write_text


class ConfigError(SimoneError, ValueError):
    """A config key or value that does not fit the schema."""


@dataclass
class DataConfig:
    data_dir: str | None = None  # None: the embedded default corpus
    # a pre-split validation folder (same DOMAIN/SUB/*.txt layout): its documents are the
    # validation split and every data_dir document trains (None: split data_dir by document)
    validation_dir: str | None = None
    text_field: str = "text"  # the field of a record file's record (.jsonl, .parquet) that holds its text
    # the record field naming its domain (None: the domain comes from the folder, as for .txt)
    domain_field: str | None = None
    # share of documents (not tokens) held out, per domain; in a domain with one document,
    # the share of that document's words held out as its validation slice
    val_fraction: float = 0.1
    split_seed: int = 1234
    min_val_docs_per_domain: int = 1
    # a held-out slice has at least this many words, and its document keeps as many to train
    # on; a single-document domain shorter than twice this fails curation
    min_val_words: int = 200
    # share of training documents that start with their `<|domain:NAME|>` control token
    # (decided per document by a hash of its id, so rebuilding gives the same shards)
    control_token_prob: float = 0.0
    # share of training windows whose first input token is replaced by the control token of
    # their domain (data/loader.py): the token is then seen thousands of times, not once a book
    control_window_prob: float = 0.0
    # a package carries up to 128 KiB of held-out text (validation.jsonl), on which a run continued
    # from it measures forgetting; false keeps a private corpus's text out of packages
    package_validation_text: bool = True


@dataclass
class CurateConfig:
    enabled: bool = True  # False: read and clean only, no dedup/quality/label filtering
    strict: bool = False  # drop `flagged` files from training too
    decontaminate: bool = False  # move validation docs sharing 13-grams with training docs
    workers: int = 0  # worker processes of curation and of tokenizing the shards (0: one per core)
    minhash_perms: int = 112
    near_dup_threshold: float = 0.8
    shingle_words: int = 5
    contamination_ngram: int = 13
    min_words: int = 50  # below: too_short
    quality_window_words: int = 2000
    # per-domain relaxation of the quality thresholds, e.g. {"biblical_classical": 0.5}
    domain_relax: dict[str, float] = field(default_factory=dict)
    contamination_threshold: float = 0.1  # share of a val doc's 13-grams also in training
    containment_threshold: float = 0.8  # share of a doc's 13-grams inside a longer doc: a copy
    repeated_passage_words: int = 1000  # flag a document repeating a passage this long
    max_file_bytes: int = 64 * 1024 * 1024  # a bigger file is quarantined (too_large), never read
    max_file_seconds: float = 300.0  # CPU seconds to process one file before it is given up (timed_out)


@dataclass
class TokenizerConfig:
    vocab_size: int = 32000
    min_frequency: int = 2
    eod_token: str = "<|endoftext|>"


@dataclass
class ModelConfig:
    arch: str = "llama"  # "llama" (Enhanced SIM-ONE) or "gpt2" (legacy MVLM-GPT2 baseline)
    vocab_size: int = 32000  # overwritten by the trained tokenizer's size
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: = n_heads (no grouped-query attention)
    ffn_hidden: int | None = None  # None: SwiGLU rule 8/3*dim rounded up to `multiple_of`
    multiple_of: int = 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    # governance (policy / memory / trace heads); off until switched on
    governance: bool = False
    policy: bool = True
    memory: bool = True
    trace: bool = True
    n_domains: int = 0  # policy classes = the tokenizer's domain control tokens (set at training)
    policy_layer: int = -1  # block whose output feeds the policy head (-1: the last)
    policy_loss_weight: float = 0.1  # content alignment: policy cross-entropy vs. the domain
    coherence_weight: float = 0.05  # coherence: policy agreement with a later position (JS)
    coherence_distance: int = 16  # tokens between the two positions compared
    n_memory_slots: int = 8  # learned persistent key/value slots per layer
    trace_layers: str = "-1"  # comma-separated block indices averaged for the trace (-1: last)
    # levers of nanochat's recipe (issue 28), the Llama-style model only; off until measured
    mlp: str = "swiglu"  # or "relu2": down(relu(up(x))^2), two matrices of width ffn_hidden or 4*dim
    qk_norm: bool = False  # queries and keys RMS-normalised per head (no weights) before attention
    value_embeddings: int = 0  # token tables mixed into the values of that many layers (every other, from the last)
    zero_init_proj: bool = False  # the blocks' output projections (attention wo, MLP w2) start at zero
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)


def architecture_levers(m: ModelConfig) -> list[str]:
    """'model.KEY=VALUE' of each lever on in `m` that changes what the model computes, not only its
    init: what the Llama architecture of Hugging Face and llama.cpp cannot hold ([]: none)."""
    on = {"mlp": m.mlp != "swiglu", "qk_norm": m.qk_norm, "value_embeddings": m.value_embeddings > 0}
    on["logit_softcap"] = m.logit_softcap is not None
    return [f"model.{key}={str(getattr(m, key)).lower()}" for key, is_on in on.items() if is_on]


def value_embedding_layers(m: ModelConfig) -> list[int]:
    """The blocks whose attention values get a value-embedding table: every other block counted
    back from the last (as nanochat places them), `m.value_embeddings` of them."""
    return sorted(range(m.n_layers - 1, -1, -2)[: m.value_embeddings])


def check_levers(m: ModelConfig) -> None:
    """ConfigError naming the field when a lever's value is out of range or on a GPT-2 baseline."""
    if m.mlp not in ("swiglu", "relu2"):
        raise ConfigError(f"model.mlp={m.mlp!r}: choose swiglu or relu2")
    most = (m.n_layers + 1) // 2
    if not 0 <= m.value_embeddings <= most:
        raise ConfigError(f"model.value_embeddings={m.value_embeddings}: 0..{most} (every other layer of {m.n_layers})")
    cap = m.logit_softcap
    if cap is not None and not (math.isfinite(cap) and cap > 0):
        raise ConfigError(f"model.logit_softcap={cap}: must be a positive number (or none)")
    levers = architecture_levers(m) + (["model.zero_init_proj=true"] if m.zero_init_proj else [])
    if m.arch != "llama" and levers:
        raise ConfigError(f"{', '.join(levers)}: the Llama-style model only (model.arch=llama)")


def analytic_param_count(m: ModelConfig) -> int:
    """The parameter count `m` describes, worked out from the shapes alone (no model built).

    `simone validate` compares it with the loaded model's count: a model that does not match
    its own config (a layer missing or doubled, an untied head counted twice) fails there.
    A tied embedding/output matrix counts once. Governance parts count only on the
    Llama-style model (the GPT-2 baseline has none); the policy head needs `n_domains`.
    """
    d, v = m.dim, m.vocab_size
    n_kv = m.n_kv_heads or m.n_heads
    head_dim = d // m.n_heads
    qkv_out = (m.n_heads + 2 * n_kv) * head_dim
    out_head = 0 if m.tie_embeddings else v * d
    if m.arch == "gpt2":
        hidden = m.ffn_hidden or 4 * d
        block = (
            2 * 2 * d  # two LayerNorms, weight and bias
            + d * qkv_out
            + qkv_out
            + m.n_heads * head_dim * d
            + d  # attention, with biases
            + d * hidden
            + hidden
            + hidden * d
            + d
        )  # GELU MLP, with biases
        return v * d + m.max_seq_len * d + m.n_layers * block + 2 * d + out_head
    if m.mlp == "relu2":  # two matrices, 4 * dim wide by default
        mlp = 2 * d * (m.ffn_hidden or 4 * d)
    elif m.ffn_hidden is not None:
        mlp = 3 * d * m.ffn_hidden
    else:  # SwiGLU: 8/3 * dim rounded up to multiple_of (model.layers.swiglu_hidden_dim)
        mlp = 3 * d * m.multiple_of * ((int(8 * d / 3) + m.multiple_of - 1) // m.multiple_of)
    block = 2 * d + d * qkv_out + m.n_heads * head_dim * d + mlp
    # each value-embedding table [vocab, kv width] and its gate [n_kv, min(32, dim)] (model/attention.py)
    value_embeddings = m.value_embeddings * (v * n_kv * head_dim + n_kv * min(32, d))
    if m.governance and m.memory and m.n_memory_slots > 0:
        block += 2 * m.n_memory_slots * n_kv * head_dim  # memory keys and values
    policy = d + d * m.n_domains + m.n_domains if m.governance and m.policy else 0  # norm + linear
    return v * d + m.n_layers * block + d + out_head + policy + value_embeddings


@dataclass
class TrainConfig:
    batch_size: int = 12  # sequences per micro-batch per process
    grad_accum: int = 4  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    num_epochs: int = 7  # at most
    min_epochs: int = 6  # at least, before early stopping may trigger
    patience: int = 2  # evaluations without improvement after min_epochs
    max_steps: int | None = None  # hard cap on optimizer steps
    max_minutes: float | None = None  # wall-clock cap on the training stage
    # a cap the planned steps do not fit: warmup-stable-decay, this share of the run decaying
    decay_fraction: float = 0.2
    eval_every: int = 500  # steps; evaluation also runs at every epoch end
    eval_batches: int = 20  # per domain
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 0  # steps; 0: only at epoch ends
    sample_tokens: int = 64
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    fused_adamw: bool = True  # used where the device supports it
    # "adamw", or "muon": torch.optim.Muon for the blocks' matrices, AdamW for the rest (train/optim.py)
    optimizer: str = "adamw"
    # Muon's learning rate = this x the schedule's (AdamW's): 4 and 10 beat 1 at equal steps on the
    # tiny preset (val bpb 0.21 / 0.24 against 0.47 at lr 1e-2, AdamW 0.28; 80 steps of the tests' data)
    muon_lr_scale: float = 4.0
    # the token embedding's (and tied output head's) learning rate = this x the schedule's
    embed_lr_scale: float = 1.0
    head_lr_scale: float = 1.0  # an untied output head's learning rate = this x the schedule's
    # Muon's per-shape learning rate: x sqrt(max(1, rows/cols)) (nanochat's; its lr is then about
    # 2x smaller than AdamW-matched) instead of 0.2 x sqrt(max(rows, cols)), AdamW's update size
    muon_shape_scaling: bool = False
    # "cosine" (over the planned steps), or "wsd": warmup-stable-decay over them too, the last
    # decay_fraction of the steps decaying to min_lr_ratio (a time cap plans it by time either way)
    lr_schedule: str = "cosine"
    doc_aligned: bool = False  # training windows start at document starts (data/loader.py)
    activation_checkpointing: bool = False
    # under torchrun: "ddp" (a full replica per process) or "fsdp" (FSDP2: parameters, gradients
    # and optimizer state sharded over the processes, for models that do not fit one GPU)
    parallel: str = "ddp"
    system_stats_every_s: float = 5.0
    # continued pretraining (workflows/continued.py): the package or checkpoint whose weights and
    # tokenizer the run starts from, and its lineage {name, sha256, of, path, parent} (None: from scratch)
    init_from: str | None = None
    parent: dict[str, Any] | None = None
    max_bad_steps: int = 3  # consecutive non-finite steps before rollback
    max_rollbacks: int = 2  # rollbacks before the run fails
    rollback_lr_factor: float = 0.5


@dataclass
class ValidateConfig:
    """Bounds `simone validate` checks a trained model against (per preset; a failure names
    the figure and the bound). Generation speed is batch-1 sampling with the KV cache; peak
    memory is measured over the validation itself (host RSS; on CUDA also GPU memory)."""

    min_generation_tokens_per_s_cpu: float = 5.0
    min_generation_tokens_per_s_cuda: float = 50.0
    max_peak_rss_mb: float = 8192.0
    max_peak_gpu_mb: float = 16384.0


@dataclass
class Config:
    preset: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# ----------------------------------------------------------------------------- presets


def _tiny() -> Config:
    """Seconds on a CPU: tests and smoke checks."""
    c = Config(preset="tiny")
    c.tokenizer.vocab_size = 512
    c.model = ModelConfig(dim=64, n_layers=2, n_heads=4, max_seq_len=64, vocab_size=512)
    c.train = TrainConfig(
        batch_size=8,
        grad_accum=1,
        lr=3e-3,
        warmup_steps=10,
        num_epochs=2,
        min_epochs=1,
        patience=2,
        eval_every=50,
        eval_batches=4,
        log_every=5,
        checkpoint_every=50,
        sample_tokens=16,
        max_minutes=2.0,
        dtype="float32",  # exact comparisons in tests
    )
    # ~0.1M parameters: thousands of tokens/s and a few hundred MB (most of it PyTorch itself)
    c.validate = ValidateConfig(min_generation_tokens_per_s_cpu=20.0, max_peak_rss_mb=4096.0)
    return c


def _cpu() -> Config:
    """The default: a few minutes on 2 CPU cores; the shape that learned the most per minute.

    Measured on held-out text at 10 minutes on a 2-core AMD EPYC (bench/bench_quality.py; the
    README's quality-per-minute tables): 2 layers x 128 at context 128 and batch 16 reached
    1.836 bits per byte where the former 4 x 256 at context 256 (4.3M parameters, 1.9M tokens
    seen: too big for the time) reached 1.991; more, smaller steps beat fewer, bigger ones; Muon
    and a higher learning rate did not pay at this size. An untied output head with twice the
    learning rate (nanochat's lever) won over 3 seeds: -0.020 bits per byte at 10 minutes,
    interval [-0.028, -0.012] (docs/experiments/quality_per_minute.md). `make run` asks
    `--budget-minutes` for the shape instead, which picks this one on such a machine and a
    bigger one on a faster machine.
    """
    c = Config(preset="cpu")
    c.data.control_token_prob = 0.5  # half the training docs open with <|domain:NAME|>: --domain steers
    c.tokenizer.vocab_size = 4096
    c.model = ModelConfig(dim=128, n_layers=2, n_heads=2, max_seq_len=128, vocab_size=4096, tie_embeddings=False)
    c.train = TrainConfig(
        head_lr_scale=2.0,  # the untied head's learning rate: twice the schedule's
        # ~12-14k tokens/s on 2 idle cores (compiled, float32): up to four epochs of the default
        # corpus (2.45M tokens each; repeating data up to ~4 times costs little) would take ~11
        # minutes, so the 9-minute cap plans the schedule by time (train/schedule.py) and it
        # still ends at its floor. Evaluations and checkpoints every 1000 steps (a couple of
        # minutes): at every 200 they took ~8% of a 10-minute run.
        batch_size=16,
        grad_accum=1,
        lr=2e-3,
        warmup_steps=50,
        num_epochs=4,
        min_epochs=1,
        patience=2,
        eval_every=1000,
        eval_batches=8,
        log_every=10,
        checkpoint_every=1000,
        max_minutes=9.0,
        compile=True,
    )
    # ~1M parameters: thousands of tokens/s of generation on 2 cores; well under 1 GB besides PyTorch
    c.validate = ValidateConfig(min_generation_tokens_per_s_cpu=20.0, max_peak_rss_mb=4096.0)
    return c


def _h200() -> Config:
    """The original design's full single-GPU run (~110M parameters with the 32k vocabulary,
    embeddings tied): the governance model
    (policy head, memory slots, trace; the combined loss), as the original flagship was.
    `--set model.governance=false` gives the plain model."""
    c = Config(preset="h200")
    c.data.control_token_prob = 0.5
    c.tokenizer.vocab_size = 32000
    c.model = ModelConfig(dim=768, n_layers=12, n_heads=12, max_seq_len=1024, vocab_size=32000, governance=True)
    c.train = TrainConfig(
        batch_size=12,
        grad_accum=4,
        lr=3e-4,
        num_epochs=7,
        min_epochs=6,
        patience=2,
        warmup_steps=500,
        eval_every=1000,
        checkpoint_every=1000,
        device="cuda",
        dtype="bfloat16",
        compile=True,
    )
    # On the GPU: batch-1 decoding of 125M parameters is launch-bound at hundreds of tokens/s;
    # validation holds the weights and one evaluation batch (12 x 1024 tokens) of logits.
    # On a CPU (`--set train.device=cpu`): tens of tokens/s on 2 cores.
    c.validate = ValidateConfig(
        min_generation_tokens_per_s_cuda=50.0,
        min_generation_tokens_per_s_cpu=2.0,
        max_peak_rss_mb=16384.0,
        max_peak_gpu_mb=16384.0,
    )
    return c


def _h100() -> Config:
    c = _h200()
    c.preset = "h100"
    return c


def _h200_350m() -> Config:
    """A ~350M-parameter Llama-style model for one H200 (or H100): the benchmark's GPU shape."""
    c = _h200()
    c.preset = "h200-350m"
    c.model = ModelConfig(dim=1024, n_layers=24, n_heads=16, max_seq_len=1024, vocab_size=32000)
    c.train.batch_size = 16
    c.train.grad_accum = 4
    return c


def _gpt2_baseline(base: Callable[[], Config]) -> Callable[[], Config]:
    def preset() -> Config:
        c = base()
        c.preset = f"{c.preset}-gpt2"
        c.model.arch = "gpt2"
        return c

    return preset


PRESETS: dict[str, Callable[[], Config]] = {
    "tiny": _tiny,
    "cpu": _cpu,
    "h100": _h100,
    "h200": _h200,
    "h200-350m": _h200_350m,
    "tiny-gpt2": _gpt2_baseline(_tiny),
    "cpu-gpt2": _gpt2_baseline(_cpu),
}
DEFAULT_PRESET = "cpu"


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------- overrides


def _base_type(type_hint: Any) -> tuple[type, bool]:
    """(the underlying type, whether None is allowed) of a field's annotation."""
    args = typing.get_args(type_hint)
    if args:  # X | None, or dict[str, float]
        if type(None) in args:
            inner = next(a for a in args if a is not type(None))
            return (typing.get_origin(inner) or inner), True
        return typing.get_origin(type_hint) or type_hint, False
    return type_hint, False


def _coerce(value: Any, type_hint: Any, key: str) -> Any:
    """Turn a command-line string (or a JSON value) into the field's declared type."""
    base, optional = _base_type(type_hint)
    if value is None or (isinstance(value, str) and optional and value.lower() in ("none", "null")):
        if not optional:
            raise ConfigError(f"{key}: may not be empty (expected {base.__name__})")
        return None
    if isinstance(value, str) and base is not str:
        if base is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        try:
            value = json.loads(value) if base is dict else base(value)
        except ValueError as e:
            raise ConfigError(f"{key}: cannot read {value!r} as {base.__name__}") from e
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {base.__name__}, got {value!r}")
    return value


# fields that are shares, checked where they are set (an override, a config file) so a bad one
# fails before curation, not at the stage that reads it
SHARE_FIELDS = {"data.control_token_prob", "data.control_window_prob"}


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set `section.field` (e.g. `train.lr`) on `cfg`, checking the key and the type."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] == "preset":
        cfg.preset = str(value)
        return
    if len(parts) != 2:
        raise ConfigError(f"config key {key!r} must look like section.field (e.g. train.lr)")
    section_name, field_name = parts
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        sections = [f.name for f in dataclasses.fields(cfg) if f.name != "preset"]
        raise ConfigError(f"unknown config section {section_name!r}; sections: {', '.join(sections)}")
    hints = get_type_hints(type(section))
    if field_name not in hints:
        names = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"unknown config key {key!r}; {section_name} has: {names}")
    value = _coerce(value, hints[field_name], key)
    if key in SHARE_FIELDS and value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{key}={value}: out of range (a share: expected 0..1)")
    setattr(section, field_name, value)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `key=value` strings in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must be key=value (e.g. train.lr=1e-3)")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value.strip())
    return cfg


def from_dict(d: dict[str, Any]) -> Config:
    """Build a Config from a (possibly partial) dict, e.g. a saved config.json.

    Starts from the dict's preset (or the default one) and sets every key given, so an
    older config missing new fields still loads; unknown keys are an error.
    """
    cfg = preset(d.get("preset", DEFAULT_PRESET)) if d.get("preset") in PRESETS else Config()
    if "preset" in d:
        cfg.preset = d["preset"]
    for section_name, section_values in d.items():
        if section_name == "preset":
            continue
        if not isinstance(section_values, dict):
            raise ConfigError(f"config section {section_name!r} must be an object")
        for field_name, value in section_values.items():
            set_value(cfg, f"{section_name}.{field_name}", value)
    check_model_ranges(cfg.model)
    return cfg


# Generous bounds: far above any model this project trains, far below what would exhaust a
# machine before a shape check ran (a downloaded config is read before anything is built).
MODEL_INT_RANGES = {
    "vocab_size": (1, 1 << 24),
    "dim": (1, 1 << 16),
    "n_layers": (1, 1024),
    "n_heads": (1, 1024),
    "n_kv_heads": (1, 1024),
    "ffn_hidden": (1, 1 << 20),
    "multiple_of": (1, 1 << 16),
    "max_seq_len": (1, 1 << 20),
    "n_domains": (0, 4096),
    "coherence_distance": (0, 1 << 20),
    "n_memory_slots": (0, 4096),
}


def check_model_ranges(m: ModelConfig) -> None:
    """Raise ConfigError naming the field when a model size is out of range or inconsistent."""
    for name, (low, high) in MODEL_INT_RANGES.items():
        value = getattr(m, name)
        if value is not None and not low <= value <= high:
            raise ConfigError(f"model.{name}={value}: out of range (expected {low}..{high})")
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim}: not divisible by model.n_heads={m.n_heads}")
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads}: not divisible by model.n_kv_heads={m.n_kv_heads}")
    if not -m.n_layers <= m.policy_layer < m.n_layers:
        raise ConfigError(f"model.policy_layer={m.policy_layer}: not a block index of {m.n_layers} layers")
    for name, low_f, high_f in (("rope_theta", 0.0, 1e12), ("norm_eps", 0.0, 1.0)):
        value_f = getattr(m, name)
        if not (math.isfinite(value_f) and low_f < value_f < high_f):
            raise ConfigError(f"model.{name}={value_f}: out of range (expected between {low_f:g} and {high_f:g})")
    if not (math.isfinite(m.dropout) and 0.0 <= m.dropout < 1.0):
        raise ConfigError(f"model.dropout={m.dropout}: out of range (expected 0 <= dropout < 1)")
    check_levers(m)


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: config file not found") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: a config file must hold a JSON object")
    try:
        return from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(Path(path), cfg.to_json() + "\n")
