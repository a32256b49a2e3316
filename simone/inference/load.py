"""Load a trained model from anywhere it can live (the one place a model is built for inference).

A model can be given as a run directory (its best, else latest, checkpoint), a checkpoint
directory (`checkpoints/step_N`), or a packaged `.tar.gz` from `models_for_download/`.
Everything is loaded safely, and checked first: weights through safetensors, metadata as JSON.
A `chat_template.jinja` beside the tokenizer (a run's `tokenizer/`, a package) says the model
chats in simone's template (simone/data/chat_template.py); any other template is refused.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors

from simone.checkpoint import CheckpointError, check_tokenizer, read_config, resolve_checkpoint, verify_checkpoint
from simone.config import Config
from simone.data.chat_template import CHAT_TEMPLATE, CHAT_TEMPLATE_FILE
from simone.data.tokenizer import Tokenizer, load_tokenizer
from simone.devices import pick_device
from simone.errors import SimoneError
from simone.model import LanguageModel, build_model


class ModelLoadError(SimoneError, RuntimeError):
    """The given path does not hold a loadable model (message names the file and problem)."""


@dataclass
class LoadedModel:
    """A loaded model. From a `.tar.gz`, its files lie in a private temporary folder that is
    removed by `close()` (or `with load_model(...) as loaded:`), when the object is garbage
    collected, or at the latest when the interpreter exits."""

    model: LanguageModel
    tokenizer: Tokenizer
    config: Config
    source: Path  # what the user pointed at
    weights: Path  # the model.safetensors actually loaded
    files: dict[str, Path] = field(default_factory=dict)  # artifact name -> path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    unpacked: Path | None = None  # the temporary folder a package was extracted into
    chat_template: str | None = None  # chat_template.jinja beside the tokenizer, if there is one

    def __post_init__(self) -> None:
        self._cleanup = (
            weakref.finalize(self, shutil.rmtree, str(self.unpacked), True) if self.unpacked is not None else None
        )

    def close(self) -> None:
        """Remove the extracted package folder (the model itself stays usable)."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What a package may hold (see simone/inference/package.py); anything else in the archive is skipped.
PACKAGE_FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "training_summary.json",
    "README.md",
    "MANIFEST.json",
    CHAT_TEMPLATE_FILE,
)
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
                    raise ModelLoadError(
                        f"{path}: member {member.name!r} is not a regular file (links and devices are refused)"
                    )
                name = parts[-1]
                # capped even when skipped: skipping a member still decompresses it
                cap = MAX_PACKAGE_WEIGHTS_BYTES if name == "model.safetensors" else MAX_PACKAGE_FILE_BYTES
                if member.size > cap:
                    raise ModelLoadError(
                        f"{path}: member {member.name!r} declares {member.size:,} bytes, "
                        f"more than the {cap:,} a package file may have"
                    )
                total += member.size
                if total > MAX_PACKAGE_BYTES:
                    raise ModelLoadError(f"{path}: members declare more than {MAX_PACKAGE_BYTES:,} bytes in all")
                if name not in PACKAGE_FILES or in_hf:
                    continue  # not ours (or the hf/ copy): not extracted
                if name in written:
                    raise ModelLoadError(f"{path}: member {name!r} appears twice")
                free = shutil.disk_usage(dest).free
                if member.size > free:
                    raise ModelLoadError(
                        f"{path}: member {member.name!r} needs {member.size:,} bytes, {free:,} free under {dest.parent}"
                    )
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
        try:
            ckpt = resolve_checkpoint(path, ("best", "latest"))
        except CheckpointError:
            raise ModelLoadError(
                f"{path}: run directory has no usable checkpoint (checkpoints/best or latest)"
            ) from None
        files = {
            "weights": ckpt / "model.safetensors",
            "config": ckpt / "config.json",
            "tokenizer": path / "tokenizer" / "tokenizer.json",
            "checkpoint": ckpt,
        }
        if not files["config"].exists():
            files["config"] = path / "config.json"
    else:  # a checkpoint dir or an unpacked package
        files = {
            "weights": path / "model.safetensors",
            "config": path / "config.json",
            "tokenizer": path / "tokenizer.json",
            "checkpoint": path,
        }
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
            f"vocab_size is {cfg.model.vocab_size}"
        )
    model = build_model(cfg.model)
    try:
        missing, unexpected = load_safetensors(model, str(files["weights"]), strict=False)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ModelLoadError(f"{files['weights']}: weights do not fit the config ({e})") from e
    if missing or unexpected:
        raise ModelLoadError(
            f"{files['weights']}: weights do not fit the config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    dev = pick_device(device)
    model.to(dev).eval()
    template = files["tokenizer"].parent / CHAT_TEMPLATE_FILE
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=cfg,
        source=path,
        weights=files["weights"],
        files=files,
        device=dev,
        unpacked=unpacked,
        chat_template=_read_chat_template(template) if template.is_file() else None,
    )


def _read_chat_template(path: Path) -> str:
    """The chat template at `path`, which must be simone's own: it is the one `chat_ids` renders."""
    size = path.stat().st_size
    text = path.read_text(encoding="utf-8", errors="replace") if size <= 4 * len(CHAT_TEMPLATE) else ""
    if text.rstrip("\n") != CHAT_TEMPLATE:  # Jinja drops one trailing newline; an editor may add it
        raise ModelLoadError(
            f"{path}: not simone's chat template (simone/data/chat_template.py), which is the only one "
            "simone chats in; restore it, or remove the file to chat in plain text"
        )
    return CHAT_TEMPLATE


def validate_checkpoint(path: Path) -> Config:
    """A checkpoint (or unpacked package) from elsewhere, checked before use (`verify_checkpoint`
    against the model its config describes, built on the `meta` device); returns its Config."""

    def on_meta(cfg: Config) -> torch.nn.Module:
        with torch.device("meta"):
            return build_model(cfg.model)

    verify_checkpoint(path, model_for=on_meta)
    return read_config(path)
