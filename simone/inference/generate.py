"""Load a trained model from anywhere it can live, and generate text with the KV cache.

A model can be given as a run directory (its best, else latest, checkpoint), a checkpoint
directory (`checkpoints/step_N`), or a packaged `.tar.gz` from `models_for_download/`.
Everything is loaded safely: weights through safetensors, metadata as JSON.
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
import tempfile
import time
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from simone.config import Config
from simone.devices import pick_device
from simone.errors import SimoneError


class ModelLoadError(SimoneError, RuntimeError):
    """The given path does not hold a loadable model (message names the file and problem)."""


@dataclass
class LoadedModel:
    """A loaded model. From a `.tar.gz`, its files lie in a private temporary folder that is
    removed by `close()` (or `with load_model(...) as loaded:`), when the object is garbage
    collected, or at the latest when the interpreter exits."""

    model: torch.nn.Module
    tokenizer: object  # simone.data.tokenizer.Tokenizer
    config: Config
    source: Path  # what the user pointed at
    weights: Path  # the model.safetensors actually loaded
    files: dict[str, Path] = field(default_factory=dict)  # artifact name -> path
    device: torch.device = torch.device("cpu")
    unpacked: Path | None = None  # the temporary folder a package was extracted into

    def __post_init__(self) -> None:
        self._cleanup = (weakref.finalize(self, shutil.rmtree, str(self.unpacked), True)
                         if self.unpacked is not None else None)

    def close(self) -> None:
        """Remove the extracted package folder (the model itself stays usable)."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> "LoadedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What a package may hold (see simone/inference/package.py); anything else in the archive is skipped.
PACKAGE_FILES = ("model.safetensors", "config.json", "tokenizer.json", "training_summary.json",
                 "README.md", "MANIFEST.json")
MAX_PACKAGE_MEMBERS = 64
MAX_PACKAGE_FILE_BYTES = 256 << 20  # each file but the weights
MAX_PACKAGE_WEIGHTS_BYTES = 256 << 30
HF_FOLDER = "hf"  # the package's Hugging Face copy (`simone export --format hf`): capped, not extracted
# the weights twice (ours and the hf/ copy), and every other file
MAX_PACKAGE_BYTES = 2 * MAX_PACKAGE_WEIGHTS_BYTES + MAX_PACKAGE_FILE_BYTES * 2 * len(PACKAGE_FILES)


def is_package(path: Path) -> bool:
    return Path(path).name.endswith((".tar.gz", ".tgz")) and Path(path).is_file()


def _extract_package(path: Path) -> Path:
    """Extract a package's expected regular files into a new `simone-pkg-*` temporary folder
    and return it (the caller removes it). Links, devices, absolute or `..` paths, nested
    folders, duplicates, too many members or sizes over the caps (or over the free space) are
    refused with ModelLoadError before anything of that member is written."""
    dest = Path(tempfile.mkdtemp(prefix="simone-pkg-"))
    try:
        _extract_members(path, dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _extract_members(path: Path, dest: Path) -> None:
    top: str | None = None
    written: set[str] = set()
    total = 0
    try:
        with tarfile.open(path, "r:gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_PACKAGE_MEMBERS:
                    raise ModelLoadError(f"{path}: more than {MAX_PACKAGE_MEMBERS} members; not a SIM-ONE package")
                parts = PurePosixPath(member.name).parts
                in_hf = len(parts) >= 2 and parts[1] == HF_FOLDER  # NAME/hf or NAME/hf/FILE
                if member.name.startswith("/") or ".." in parts or not parts or len(parts) > (3 if in_hf else 2):
                    raise ModelLoadError(f"{path}: member {member.name!r} has an unsafe or unexpected path")
                if len(parts) >= 2 or member.isdir():  # the one top folder a package may have
                    if top is None:
                        top = parts[0]
                    if parts[0] != top or (member.isdir() and len(parts) != 1 and parts[1:] != (HF_FOLDER,)):
                        raise ModelLoadError(f"{path}: member {member.name!r} is outside the package folder {top!r}")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise ModelLoadError(f"{path}: member {member.name!r} is not a regular file "
                                         f"(links and devices are refused)")
                name = parts[-1]
                # capped even when skipped: skipping a member still decompresses it
                cap = MAX_PACKAGE_WEIGHTS_BYTES if name == "model.safetensors" else MAX_PACKAGE_FILE_BYTES
                if member.size > cap:
                    raise ModelLoadError(f"{path}: member {member.name!r} declares {member.size:,} bytes, "
                                         f"more than the {cap:,} a package file may have")
                total += member.size
                if total > MAX_PACKAGE_BYTES:
                    raise ModelLoadError(f"{path}: members declare more than {MAX_PACKAGE_BYTES:,} bytes in all")
                if name not in PACKAGE_FILES or in_hf:
                    continue  # not ours (or the hf/ copy): not extracted
                if name in written:
                    raise ModelLoadError(f"{path}: member {name!r} appears twice")
                free = shutil.disk_usage(dest).free
                if member.size > free:
                    raise ModelLoadError(f"{path}: member {member.name!r} needs {member.size:,} bytes, "
                                         f"{free:,} free under {dest.parent}")
                source = tar.extractfile(member)
                if source is None:  # checked above to be a regular file; never None then
                    raise ModelLoadError(f"{path}: member {member.name!r} cannot be read")
                with source, open(dest / name, "xb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                written.add(name)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ModelLoadError(f"{path}: not a readable .tar.gz package ({e})") from e


def locate_artifacts(path: Path, in_package: bool = False) -> dict[str, Path]:
    """Find weights, config and tokenizer for a run dir, checkpoint dir or unpacked package
    (`in_package`: everything must be inside `path`, nothing is looked for beside it)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_file():
        raise ModelLoadError(f"{path}: expected a run dir, a checkpoint dir or a .tar.gz package")

    if not in_package and (path / "checkpoints").is_dir():  # a run directory
        from simone.checkpoint import CheckpointError, resolve_checkpoint

        ckpt = None
        for which in ("best", "latest"):
            try:
                ckpt = resolve_checkpoint(path, which)
                break
            except CheckpointError:  # none of that kind (or none verifies): try the next
                continue
        if ckpt is None:
            raise ModelLoadError(f"{path}: run directory has no usable checkpoint (checkpoints/best or latest)")
        files = {"weights": ckpt / "model.safetensors", "config": ckpt / "config.json",
                 "tokenizer": path / "tokenizer" / "tokenizer.json", "checkpoint": ckpt}
        if not files["config"].exists():
            files["config"] = path / "config.json"
    else:  # a checkpoint dir or an unpacked package
        files = {"weights": path / "model.safetensors", "config": path / "config.json",
                 "tokenizer": path / "tokenizer.json", "checkpoint": path}
        # checkpoints/step_N inside a run: the run's tokenizer (never for a package)
        if not in_package and not files["tokenizer"].exists() and path.parent.name == "checkpoints":
            files["tokenizer"] = path.parent.parent / "tokenizer" / "tokenizer.json"
        if (path / "training_summary.json").exists():
            files["summary"] = path / "training_summary.json"
    for name in ("weights", "config", "tokenizer"):
        if not files[name].exists():
            raise ModelLoadError(f"{files[name]}: missing ({name}) — is {path} a trained model?")
    return files


def load_model(path: Path, device: str = "auto") -> LoadedModel:
    """Load model + tokenizer + config from a run dir, checkpoint dir or .tar.gz (extracted
    into a temporary folder that `LoadedModel.close()` removes)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    unpacked = _extract_package(path) if is_package(path) else None
    try:
        return _load(path, unpacked, device)
    except BaseException:
        if unpacked is not None:
            shutil.rmtree(unpacked, ignore_errors=True)
        raise


def _load(path: Path, unpacked: Path | None, device: str) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_safetensors

    from simone.model import build_model
    from simone.data.tokenizer import load_tokenizer
    from simone.checkpoint import CheckpointError, check_tokenizer

    files = locate_artifacts(unpacked or path, in_package=unpacked is not None)
    # from elsewhere, so check before use: manifest hashes, config schema, tensor shapes
    cfg = validate_checkpoint(files["checkpoint"])
    try:
        check_tokenizer(files["checkpoint"], files["tokenizer"])
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from e
    tokenizer = load_tokenizer(files["tokenizer"])
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ModelLoadError(
            f"{files['tokenizer']}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {cfg.model.vocab_size}")
    model = build_model(cfg.model)
    try:
        missing, unexpected = load_safetensors(model, str(files["weights"]), strict=False)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ModelLoadError(f"{files['weights']}: weights do not fit the config ({e})") from e
    if missing or unexpected:
        raise ModelLoadError(f"{files['weights']}: weights do not fit the config "
                             f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    dev = pick_device(device)
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, source=path,
                       weights=files["weights"], files=files, device=dev, unpacked=unpacked)


@dataclass
class GovernanceOptions:
    """What `simone generate` asks of the governance features (all off by default).

    domain: start from `<|domain:NAME|>` (steering by the control token the model saw in
    training); policy_guidance W > 0: also rerank the top `guidance_top_k` candidates by
    W · log p_policy(domain | text + candidate); trace: collect one record per token
    (`trace_records`); stream: allow more tokens than the context holds (streaming cache).
    """

    domain: str | None = None
    policy_guidance: float = 0.0
    guidance_top_k: int = 8
    trace: bool = False
    stream: bool = False

    @property
    def active(self) -> bool:
        return bool(self.domain or self.policy_guidance > 0 or self.trace or self.stream)


def prompt_ids(loaded: LoadedModel, prompt: str, domain: str | None = None) -> list[int]:
    """Token ids to start from: `[eod, <|domain:NAME|>] + prompt` with a domain (a document
    start, as in training), else the prompt (or `[eod]` for an empty one)."""
    tok = loaded.tokenizer
    ids = tok.encode(prompt) if prompt else []
    if domain is not None:
        try:
            control = tok.domain_token_id(domain)
        except KeyError as e:
            raise ModelLoadError(f"{loaded.files.get('tokenizer', 'tokenizer')}: {e.args[0]}") from None
        return [tok.eod_id, control] + ids
    return ids or [tok.eod_id]


@torch.no_grad()
def governed_tokens(loaded: LoadedModel, prompt: str, max_tokens: int, options: GovernanceOptions,
                    temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.95,
                    seed: int = 0, trace_records: list[dict] | None = None, last_policy: dict | None = None,
                    token_ids: list[int] | None = None):
    """Like `stream_tokens`, through `governed_generate` (streaming cache, steering, trace).

    With `options.trace`, appends to `trace_records` one dict per generated token:
    {token, text, prob, entropy, top_sources: [[position, token_text, weight], ...],
    memory, policy: {domain: p}} (positions index `prompt_ids(...)` + generated tokens).
    `last_policy` (a dict) receives the policy head's domain distribution of the whole text;
    `token_ids` (a list) each generated token id (pieces of text are not tokens).
    """
    from simone.inference.governed import governed_generate

    tok, cfg = loaded.tokenizer, loaded.config.model
    if cfg.arch != "llama":
        raise ModelLoadError(f"{loaded.source}: governance features need a Llama-style model "
                             f"(this one is {cfg.arch})")
    ids = prompt_ids(loaded, prompt, options.domain)
    guidance_domain = None
    if options.policy_guidance > 0:
        if options.domain is None:
            raise ValueError("--policy-guidance needs --domain NAME (the domain to steer toward)")
        guidance_domain = tok.domains.index(options.domain)
    domains = tok.domains
    gen = torch.Generator(device=loaded.device).manual_seed(seed)
    all_ids = list(ids)
    new_ids: list[int] = token_ids if token_ids is not None else []
    emitted = ""
    for step in governed_generate(loaded.model, ids, max_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, generator=gen, eos_id=tok.eod_id,
                                  guidance_domain=guidance_domain, guidance_weight=options.policy_guidance,
                                  guidance_top_k=options.guidance_top_k, trace=options.trace):
        if step.token == tok.eod_id:
            break
        all_ids.append(step.token)
        if last_policy is not None and step.policy is not None:
            last_policy.update(zip(domains, step.policy))
        if trace_records is not None:
            record = {"token": step.token, "text": tok.decode([step.token]), "prob": round(step.prob, 6),
                      "entropy": round(step.entropy, 6),
                      "top_sources": [[p, tok.decode([all_ids[p]]), round(w, 6)] for p, w in step.sources or []],
                      "policy": {} if step.policy is None else
                      {d: round(p, 6) for d, p in zip(domains, step.policy)}}
            if step.memory_weight is not None:
                record["memory"] = round(step.memory_weight, 6)
            trace_records.append(record)
        new_ids.append(step.token)
        text = tok.decode(new_ids)
        if not text.endswith("\ufffd"):
            yield text[len(emitted):]
            emitted = text


@torch.no_grad()
def stream_tokens(loaded: LoadedModel, prompt: str, max_tokens: int = 100, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float | None = 0.95, seed: int = 0,
                  governance: GovernanceOptions | None = None, trace_records: list[dict] | None = None,
                  last_policy: dict | None = None, token_ids: list[int] | None = None):
    """Yield the text of each new token as it is generated (KV cache on).

    With `governance` options that ask for something, generation goes through
    `governed_tokens` (see there); otherwise it is the plain cached generation, limited to
    the context. `token_ids` (a list) receives each generated token id: a yielded piece of
    text may hold several tokens, or none yet (a character split across tokens).
    """
    if governance is not None and governance.active:
        yield from governed_tokens(loaded, prompt, max_tokens, governance, temperature, top_k, top_p, seed,
                                   trace_records, last_policy, token_ids)
        return
    tok = loaded.tokenizer
    ids = tok.encode(prompt) if prompt else [tok.eod_id]
    max_len = loaded.config.model.max_seq_len
    ids = ids[-(max_len - 1):]  # leave room for at least one new token
    max_tokens = min(max_tokens, max_len - len(ids))
    if max_tokens <= 0:
        return
    idx = torch.tensor([ids], dtype=torch.long, device=loaded.device)
    gen = torch.Generator(device=loaded.device).manual_seed(seed)
    new_ids: list[int] = token_ids if token_ids is not None else []
    emitted = ""
    for token in loaded.model.generate(idx, max_new_tokens=max_tokens, temperature=temperature,
                                       top_k=top_k, top_p=top_p, generator=gen, use_cache=True,
                                       eos_id=tok.eod_id):
        t = int(token.view(-1)[0])
        if t == tok.eod_id:
            break
        new_ids.append(t)
        # decode the whole continuation so multi-byte characters split across tokens come out whole
        text = tok.decode(new_ids)
        if not text.endswith("\ufffd"):
            yield text[len(emitted):]
            emitted = text


@torch.no_grad()
def sample_with_domain(loaded: LoadedModel, options: GovernanceOptions, prompt: str = "", max_tokens: int = 48,
                       temperature: float = 0.8, top_k: int | None = 50, seed: int = 0) -> str:
    """The continuation (without the prompt) generated from `<|domain:NAME|>` + prompt.

    Llama-style models go through `governed_tokens` (policy guidance possible); the GPT-2
    baseline, which has no governance, through its own cached `generate` from the same ids.
    """
    if loaded.config.model.arch == "llama":
        return "".join(governed_tokens(loaded, prompt, max_tokens, options, temperature, top_k, None, seed))
    tok = loaded.tokenizer
    ids = prompt_ids(loaded, prompt, options.domain)
    max_len = loaded.config.model.max_seq_len
    ids = ids[-(max_len - 1):]
    idx = torch.tensor([ids], dtype=torch.long, device=loaded.device)
    gen = torch.Generator(device=loaded.device).manual_seed(seed)
    new = []
    for token in loaded.model.generate(idx, min(max_tokens, max_len - len(ids)), temperature=temperature,
                                       top_k=top_k, generator=gen, eos_id=tok.eod_id):
        t = int(token.view(-1)[0])
        if t == tok.eod_id:
            break
        new.append(t)
    return tok.decode(new)


def sample_text(loaded: LoadedModel, prompt: str, max_tokens: int = 100, **kw) -> str:
    return prompt + "".join(stream_tokens(loaded, prompt, max_tokens=max_tokens, **kw))


def generate_cli(model_path: Path, prompt: str, max_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, seed: int, stream: bool = True, device: str = "auto",
                 domain: str | None = None, policy_guidance: float = 0.0, guidance_top_k: int = 8,
                 trace: Path | None = None, trace_html: Path | None = None,
                 stream_past_context: bool = False) -> int:
    loaded = load_model(model_path, device=device)
    options = GovernanceOptions(domain=domain, policy_guidance=policy_guidance, guidance_top_k=guidance_top_k,
                                trace=trace is not None or trace_html is not None, stream=stream_past_context)
    records: list[dict] | None = [] if options.trace else None
    policy: dict[str, float] = {}
    t0 = time.perf_counter()
    token_ids: list[int] = []
    out = sys.stdout
    if stream:
        out.write(prompt)
        out.flush()
    pieces = []
    for piece in stream_tokens(loaded, prompt, max_tokens=max_tokens, temperature=temperature,
                               top_k=top_k if top_k and top_k > 0 else None,
                               top_p=top_p if top_p and top_p < 1 else None, seed=seed,
                               governance=options, trace_records=records, last_policy=policy,
                               token_ids=token_ids):
        pieces.append(piece)
        if stream:
            out.write(piece)
            out.flush()
    if not stream:
        out.write(prompt + "".join(pieces))
    out.write("\n")
    dt = time.perf_counter() - t0
    n = len(token_ids)
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    if policy:  # the policy head's reading of the whole text
        ranked = sorted(policy.items(), key=lambda kv: -kv[1])
        print("[policy: " + ", ".join(f"{d} {p:.2f}" for d, p in ranked) + "]", file=sys.stderr)
    if records is not None:
        write_trace(loaded, prompt, domain, records, trace, trace_html)
    loaded.close()
    return 0


def write_trace(loaded: LoadedModel, prompt: str, domain: str | None, records: list[dict],
                jsonl_path: Path | None, html_path: Path | None) -> None:
    """Write the trace records as JSONL (one object per generated token) and/or HTML."""
    if jsonl_path is not None:
        jsonl_path = Path(jsonl_path)
        jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        with open(jsonl_path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"[trace: {jsonl_path}]", file=sys.stderr)
    if html_path is not None:
        from simone.inference.trace_html import write_trace_html

        tok = loaded.tokenizer
        prompt_tokens = [tok.decode([i]) for i in prompt_ids(loaded, prompt, domain)]
        write_trace_html(Path(html_path), prompt_tokens, records, title=f"SIM-ONE trace: {loaded.source}")
        print(f"[trace html: {html_path}]", file=sys.stderr)


def validate_checkpoint(path: str | Path) -> Config:
    """Check a checkpoint (or an unpacked package holding the same files) before using it:
    the manifest (when present), config.json against the Config schema, and every tensor's
    name and shape against the model that config describes. Returns the Config; raises
    CheckpointError / CheckpointMismatchError naming the file and the problem.

    The model is built on the `meta` device, so this allocates no weights.
    """
    from safetensors import SafetensorError

    from simone.checkpoint import CONFIG, MANIFEST, WEIGHTS, CheckpointError, check_state_fits, verify_checkpoint
    from simone.config import ConfigError, from_dict
    from simone.model import build_model

    path = Path(path)
    if (path / MANIFEST).exists():
        verify_checkpoint(path)
    try:
        cfg = from_dict(json.loads((path / CONFIG).read_text(encoding="utf-8")))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path / CONFIG}: missing") from e
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{path / CONFIG}: not a valid SIM-ONE config ({e})") from e
    try:
        from safetensors import safe_open

        with safe_open(str(path / WEIGHTS), "pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError as e:
        raise CheckpointError(f"{path / WEIGHTS}: missing") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / WEIGHTS}: not a readable safetensors file ({e})") from e
    for alias, target in json.loads(meta.get("aliases", "{}") or "{}").items():
        if target in shapes:
            shapes[alias] = shapes[target]
    with torch.device("meta"):
        model = build_model(cfg.model)
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    if model.output.weight is model.tok_embeddings.weight:  # tied: one stored name is enough
        for a, b in (("output.weight", "tok_embeddings.weight"), ("tok_embeddings.weight", "output.weight")):
            if a not in fake and b in fake:
                fake[a] = fake[b]
    check_state_fits(model, fake, str(path / WEIGHTS))
    return cfg
