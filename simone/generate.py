"""Load a trained model from anywhere it can live, and generate text with the KV cache.

A model can be given as a run directory (its best, else latest, checkpoint), a checkpoint
directory (`checkpoints/step_N`), or a packaged `.tar.gz` from `models_for_download/`.
Everything is loaded safely: weights through safetensors, metadata as JSON.
"""

from __future__ import annotations

import json
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from simone.config import Config, from_dict
from simone.errors import SimoneError


class ModelLoadError(SimoneError, RuntimeError):
    """The given path does not hold a loadable model (message names the file and problem)."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # simone.tokenizer.Tokenizer
    config: Config
    source: Path  # what the user pointed at
    weights: Path  # the model.safetensors actually loaded
    files: dict[str, Path] = field(default_factory=dict)  # artifact name -> path
    device: torch.device = torch.device("cpu")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


def _extract_package(path: Path) -> Path:
    """Unpack a .tar.gz into a private temp folder, refusing links and absolute paths."""
    dest = Path(tempfile.mkdtemp(prefix="simone-pkg-"))
    try:
        with tarfile.open(path, "r:gz") as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ModelLoadError(f"{path}: not a readable .tar.gz package ({e})") from e
    # a package holds one top folder
    entries = [p for p in dest.iterdir()]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


def locate_artifacts(path: Path) -> dict[str, Path]:
    """Find weights, config and tokenizer for a run dir, checkpoint dir or package folder."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        path = _extract_package(path)
    if path.is_file():
        raise ModelLoadError(f"{path}: expected a run dir, a checkpoint dir or a .tar.gz package")

    if (path / "checkpoints").is_dir():  # a run directory
        from simone.train.checkpoint import resolve_checkpoint

        ckpt = None
        for which in ("best", "latest"):
            try:
                ckpt = resolve_checkpoint(path, which)
                break
            except Exception:
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
        if not files["tokenizer"].exists():  # checkpoints/step_N inside a run
            files["tokenizer"] = path.parent.parent / "tokenizer" / "tokenizer.json"
        if (path / "training_summary.json").exists():
            files["summary"] = path / "training_summary.json"
    for name in ("weights", "config", "tokenizer"):
        if not files[name].exists():
            raise ModelLoadError(f"{files[name]}: missing ({name}) — is {path} a trained model?")
    return files


def load_model(path: Path, device: str = "auto") -> LoadedModel:
    """Load model + tokenizer + config from a run dir, checkpoint dir or .tar.gz."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_safetensors

    from simone.model import build_model
    from simone.tokenizer import load_tokenizer

    files = locate_artifacts(Path(path))
    try:
        cfg_dict = json.loads(files["config"].read_text(encoding="utf-8"))
        cfg = from_dict(cfg_dict)
    except (json.JSONDecodeError, ValueError) as e:
        raise ModelLoadError(f"{files['config']}: not a valid SIM-ONE config ({e})") from e
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
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, source=Path(path),
                       weights=files["weights"], files=files, device=dev)


@torch.no_grad()
def stream_tokens(loaded: LoadedModel, prompt: str, max_tokens: int = 100, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float | None = 0.95, seed: int = 0):
    """Yield the text of each new token as it is generated (KV cache on)."""
    tok = loaded.tokenizer
    ids = tok.encode(prompt) if prompt else [tok.eod_id]
    max_len = loaded.config.model.max_seq_len
    ids = ids[-(max_len - 1):]  # leave room for at least one new token
    max_tokens = min(max_tokens, max_len - len(ids))
    if max_tokens <= 0:
        return
    idx = torch.tensor([ids], dtype=torch.long, device=loaded.device)
    gen = torch.Generator(device=loaded.device).manual_seed(seed)
    new_ids: list[int] = []
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


def sample_text(loaded: LoadedModel, prompt: str, max_tokens: int = 100, **kw) -> str:
    return prompt + "".join(stream_tokens(loaded, prompt, max_tokens=max_tokens, **kw))


def generate_cli(model_path: Path, prompt: str, max_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, seed: int, stream: bool = True, device: str = "auto") -> int:
    loaded = load_model(model_path, device=device)
    t0 = time.perf_counter()
    n = 0
    out = sys.stdout
    if stream:
        out.write(prompt)
        out.flush()
    pieces = []
    for piece in stream_tokens(loaded, prompt, max_tokens=max_tokens, temperature=temperature,
                               top_k=top_k if top_k and top_k > 0 else None,
                               top_p=top_p if top_p and top_p < 1 else None, seed=seed):
        n += 1
        pieces.append(piece)
        if stream:
            out.write(piece)
            out.flush()
    if not stream:
        out.write(prompt + "".join(pieces))
    out.write("\n")
    dt = time.perf_counter() - t0
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0
