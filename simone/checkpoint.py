"""Checkpoints: atomic, verified, never pickled weights.

A checkpoint is a directory `RUN/checkpoints/step_000500/` holding

    model.safetensors  the weights (safetensors; tied tensors stored once, aliases in metadata)
    state.pt           optimizer, step, data position, RNG states, early stopping... saved with
                       torch.save but holding only tensors and plain containers, so it loads
                       with `torch.load(weights_only=True)` (no arbitrary unpickling)
    config.json        the run's resolved Config
    MANIFEST.json      {schema, step, created, tokenizer_sha256, files: {name: {sha256, size}}};
                       written last; names are plain file names in this directory

How a save stays atomic: every file is written into a hidden temporary directory and fsynced,
the manifest goes in last, the directory is renamed into place and re-verified, and only then
do the `latest`/`best` pointer files (one line naming a step directory) switch, each by an
atomic rename. Older checkpoints are deleted only after the new one has been verified; a
re-saved step is verified before its old copy is renamed aside as `.old-*` and the old copy is
removed only once the new one verifies in place. A process killed at any moment therefore
leaves either the old pointer to an intact checkpoint or the new pointer to an intact
checkpoint (possibly as its `.old-*` copy, which loading falls back to); the next save removes
half-written temporaries and puts such a copy back in place.

Loading verifies the manifest (sizes and sha256s). A truncated or corrupted checkpoint is
reported by name and `resolve_checkpoint` falls back to the newest older one that verifies.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from simone.config import Config, ConfigError, from_dict
from simone.errors import SimoneError
from simone.faults import Faults

# The listing is the run directory's (torch-free, so the monitor reads checkpoints the same way).
from simone.rundir import atomic_write_text, checkpoint_step, fsync_dir, list_checkpoints, read_pointer, sha256_file

MANIFEST = "MANIFEST.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
CONFIG = "config.json"
POINTERS = ("latest", "best")
MANIFEST_SCHEMA = 1
_WRITE_CHUNK = 8 << 20


class CheckpointError(SimoneError, RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupted or malformed."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose tensors do not fit the model its config describes."""


class CheckpointSaveError(SimoneError, RuntimeError):
    """A save that failed (e.g. disk full); the previous checkpoints are untouched."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------- safe state


def to_safe(obj: Any) -> Any:
    """Convert `obj` to what `torch.load(weights_only=True)` accepts: tensors, numbers,
    strings, None and lists/tuples/dicts of those (numpy arrays become tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj.detach()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_safe(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint state (not a plain value)")


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def estimate_checkpoint_bytes(model_state: dict[str, torch.Tensor], train_state: Any = None) -> int:
    """Roughly how many bytes a checkpoint of these states takes on disk (no copies made)."""
    return _tensor_bytes(_dedupe_tied(model_state, to_cpu=False)[0]) + _tensor_bytes(train_state) + (1 << 20)


def check_free_space(directory: Path, needed_bytes: int) -> tuple[bool, int]:
    """(enough, free_bytes) for writing `needed_bytes` under `directory`."""
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return free >= needed_bytes, free


# ----------------------------------------------------------------------------- weights


def _dedupe_tied(state: dict[str, torch.Tensor], to_cpu: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory (tied embeddings) once; return (tensors, aliases)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in state.items():
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.to("cpu").contiguous() if to_cpu else t
    return tensors, aliases


def weights_bytes(model_state: dict[str, torch.Tensor]) -> bytes:
    tensors, aliases = _dedupe_tied(model_state)
    return safetensors_save(tensors, metadata={"aliases": json.dumps(aliases), "format": "pt"})


def weights_from_bytes(data: bytes, source: str) -> dict[str, torch.Tensor]:
    try:
        tensors = safetensors_load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        meta = header.get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: not a readable safetensors file ({e})") from e
    aliases = json.loads(meta.get("aliases", "{}") or "{}")
    for alias, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{source}: tied tensor {alias} points to missing {target}")
        tensors[alias] = tensors[target]
    return tensors


# ----------------------------------------------------------------------------- save


def _write_file(path: Path, data: bytes, on_partial: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write `data` to `path`, fsync it, return its manifest entry."""
    with open(path, "wb") as f:
        view = memoryview(data)
        for offset in range(0, len(view), _WRITE_CHUNK):
            f.write(view[offset : offset + _WRITE_CHUNK])
            if on_partial is not None:
                on_partial()  # fault injection: fail after part of the file is on disk
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config_dict: dict[str, Any],
    *,
    best: bool = False,
    keep: int = 3,
    faults: Faults | None = None,
    log: Callable[[str], None] | None = None,
    tokenizer: Path | None = None,
) -> Path:
    """Write checkpoint `step` under `ckpt_root` atomically; switch `latest` (and `best`).

    Keeps the newest `keep` checkpoints plus the best one. `tokenizer` (the run's
    tokenizer.json) has its sha256 recorded in the manifest as `tokenizer_sha256`, so a
    checkpoint is never decoded with another tokenizer. Raises `CheckpointSaveError` if the
    save fails for lack of space or any other OS error; in that case nothing that existed
    before (checkpoints, pointers) has changed.
    """
    faults = faults or Faults()
    log = log or (lambda msg: None)
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}-{time.time_ns()}"
    old: Path | None = None
    _recover_leftovers(ckpt_root, log)
    try:
        weights = weights_bytes(model_state)
        state_buf = io.BytesIO()
        torch.save(to_safe(train_state), state_buf)
        state = state_buf.getvalue()
        config = (json.dumps(config_dict, indent=2) + "\n").encode("utf-8")
        needed = len(weights) + len(state) + len(config) + (1 << 20)
        enough, free = check_free_space(ckpt_root, needed)
        if not enough:
            raise OSError(errno.ENOSPC, f"needs {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free")

        tmp.mkdir()
        files: dict[str, Any] = {}
        files[WEIGHTS] = _write_file(tmp / WEIGHTS, weights, on_partial=lambda: faults.check_save(step))
        faults.slow_save()
        files[STATE] = _write_file(tmp / STATE, state)
        faults.slow_save()
        files[CONFIG] = _write_file(tmp / CONFIG, config)
        manifest = {"schema": MANIFEST_SCHEMA, "step": step, "created": time.time(), "files": files}
        if tokenizer is not None and Path(tokenizer).is_file():  # (a bare test run may have none)
            manifest["tokenizer_sha256"] = sha256_file(tokenizer)
        _write_file(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        fsync_dir(tmp)
        faults.slow_save()
        verify_checkpoint(tmp)  # what is on disk, before anything old is touched

        if final.exists():  # re-saving a step (after a resume or rollback): swap it out
            # Until the new copy is verified in place, the old one stays on disk as .old-*;
            # a crash between the renames leaves it for resolve_checkpoint and the next save.
            old = ckpt_root / f".old-{name}-{os.getpid()}-{time.time_ns()}"
            os.replace(final, old)
            faults.between_renames(step)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
        verify_checkpoint(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, CheckpointError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not _intact(final):  # put the verified old copy back
            shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise CheckpointSaveError(
                f"{final}: checkpoint not saved, disk full ({e.strerror}); "
                f"the previous checkpoint is intact; free space under {ckpt_root} and resume"
            ) from e
        raise CheckpointSaveError(f"{final}: checkpoint not saved ({e}); the previous checkpoint is intact") from e

    atomic_write_text(ckpt_root / "latest", name + "\n")
    if best:
        atomic_write_text(ckpt_root / "best", name + "\n")
    _prune(ckpt_root, keep, log)
    return final


def _leftover_copies(ckpt_root: Path, name: str) -> list[Path]:
    """`.old-NAME-*` copies of step directory `name` left by an interrupted re-save, newest first."""
    prefix = f".old-{name}-"
    try:
        found = [p for p in Path(ckpt_root).iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.name.rsplit("-", 1)[-1], reverse=True)


def _intact(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


def _recover_leftovers(ckpt_root: Path, log: Callable[[str], None]) -> None:
    """Clean up after killed saves (one live process per run dir, so nothing here is in use):
    half-written `.tmp-*` directories go; an `.old-*` copy goes back into place when its step
    directory is missing or damaged and the copy verifies, and is removed otherwise."""
    for p in sorted(ckpt_root.iterdir()):
        if p.name.startswith(".tmp-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        m = re.match(r"^\.old-(step_\d+)-", p.name)
        if m is None or not p.is_dir():
            continue
        final = ckpt_root / m.group(1)
        if not _intact(final) and _intact(p):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(p, final)
            fsync_dir(ckpt_root)
            log(f"restored {final.name} from {p.name}, left by an interrupted save")
        else:
            shutil.rmtree(p, ignore_errors=True)


def _prune(ckpt_root: Path, keep: int, log: Callable[[str], None]) -> None:
    protected = {read_pointer(ckpt_root, p) for p in POINTERS}
    dirs = list_checkpoints(ckpt_root)
    for old in dirs[: max(0, len(dirs) - max(1, keep))]:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)
            log(f"removed old checkpoint {old.name}")


# ----------------------------------------------------------------------------- load


def verify_checkpoint(path: Path, model_for: Callable[[Config], torch.nn.Module] | None = None) -> dict[str, Any]:
    """Check every file against MANIFEST.json; return the manifest or raise CheckpointError.
    With `model_for` (Config → the model it describes, e.g. on the meta device) also config.json
    against the schema and every tensor's name and shape against that model
    (CheckpointMismatchError); a folder without a manifest then passes on those alone ({})."""
    path = Path(path)
    manifest = _verify_manifest(path) if model_for is None or (path / MANIFEST).exists() else {}
    if model_for is not None:
        model = model_for(read_config(path))
        check_state_fits(model, _stored_tensors(path, model), str(path / WEIGHTS))
    return manifest


def _verify_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete or not a checkpoint)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST}: corrupted ({e})") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise CheckpointError(f"{path / MANIFEST}: malformed (no file list with {WEIGHTS})")
    for name, entry in files.items():
        # only plain names of regular files inside this directory: never "/dev/zero" or "../x"
        if not _plain_name(name):
            raise CheckpointError(f"{path / MANIFEST}: malformed (file name {name!r} is not a plain file name)")
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path / MANIFEST}: malformed (entry for {name} is not an object)")
        f = path / name
        try:
            st = os.lstat(f)
        except FileNotFoundError as e:
            raise CheckpointError(f"{f}: missing") from e
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{f}: not a regular file")
        size = st.st_size
        expected = entry.get("size", entry.get("bytes"))  # packages write "bytes"
        if size != expected:
            raise CheckpointError(f"{f}: truncated or altered ({size} bytes, manifest says {expected})")
        if sha256_file(f) != entry.get("sha256"):
            raise CheckpointError(f"{f}: corrupted (sha256 does not match the manifest)")
    return manifest


def read_config(path: Path) -> Config:
    """A checkpoint's config.json as a Config; CheckpointError if missing or invalid."""
    path = Path(path)
    try:
        return from_dict(json.loads((path / CONFIG).read_text(encoding="utf-8")))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path / CONFIG}: missing") from e
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{path / CONFIG}: not a valid SIM-ONE config ({e})") from e


def _stored_tensors(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.safetensors' tensors as empty meta tensors of their shapes (from the header), also
    under their aliases and under every name of a tensor that `model` ties."""
    try:
        with safe_open(str(path / WEIGHTS), "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}") or "{}")
            stored = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118  # safe_open is not iterable
    except FileNotFoundError as e:
        raise CheckpointError(f"{path / WEIGHTS}: missing") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / WEIGHTS}: not a readable safetensors file ({e})") from e
    stored.update({alias: stored[target] for alias, target in aliases.items() if target in stored})
    names: dict[int, list[str]] = {}  # tied: one stored name is enough
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    for tied in names.values():
        stored.update({n: stored[m] for m in tied if m in stored for n in tied if n not in stored})
    return stored


def _plain_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def check_tokenizer(ckpt: Path, tokenizer: Path) -> None:
    """Raise CheckpointError if `ckpt`'s manifest records another tokenizer than `tokenizer`.

    Checkpoints written before the manifest recorded `tokenizer_sha256` are not checked.
    """
    try:
        manifest = json.loads((Path(ckpt) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # verify_checkpoint reports a missing or broken manifest
    recorded = manifest.get("tokenizer_sha256") if isinstance(manifest, dict) else None
    if not isinstance(recorded, str):
        return
    actual = sha256_file(tokenizer)
    if actual != recorded:
        raise CheckpointError(
            f"{Path(ckpt) / MANIFEST}: trained with tokenizer sha256 {recorded[:16]}…, but {tokenizer} "
            f"has sha256 {actual[:16]}… (the tokenizer was retrained or replaced; this checkpoint "
            f"would decode wrongly)"
        )


def load_checkpoint(
    path: str | Path, *, verify: bool = True, load_train_state: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Load a checkpoint directory: (model_state, train_state, config_dict).

    Verifies the manifest first (unless `verify=False`), reads the weights with safetensors,
    the training state with `torch.load(weights_only=True)`, and checks that config.json is a
    valid Config. Raises CheckpointError naming the file and the problem.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if verify:
        verify_checkpoint(path)
    model_state = weights_from_bytes((path / WEIGHTS).read_bytes(), str(path / WEIGHTS))
    train_state: dict[str, Any] = {}
    if load_train_state and (path / STATE).exists():
        try:
            train_state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path / STATE}: cannot be loaded safely ({e})") from e
    read_config(path)  # a valid Config, or CheckpointError
    return model_state, train_state, json.loads((path / CONFIG).read_text(encoding="utf-8"))


def check_state_fits(model: torch.nn.Module, model_state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointMismatchError if `model_state` does not have `model`'s names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model_state.items()}
    problems = []
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    for name in sorted(set(expected) & set(got)):
        if expected[name] != got[name]:
            problems.append(f"{name} has shape {list(got[name])} but the config expects {list(expected[name])}")
    if problems:
        raise CheckpointMismatchError(
            f"{source}: weights do not fit the model described by the config (was it made with "
            f"other model settings?): "
            + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        )


def _few(names: Iterable[str]) -> str:
    names = list(names)
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


def resolve_checkpoint(
    run_dir_or_ckpt: str | Path,
    which: str | tuple[str, ...] = "latest",
    on_problem: Callable[[str], None] | None = None,
) -> Path:
    """The verified checkpoint directory to use.

    `run_dir_or_ckpt` is a run directory, its `checkpoints/` folder, or one checkpoint
    directory (returned as is once verified). `which` is "latest" or "best", or several tried
    in order (("best", "latest"): the best, else the latest). If the pointed-to checkpoint
    fails verification, the problem is reported through `on_problem` (default: a warning) and
    the newest older checkpoint that verifies is used instead.
    """
    if not isinstance(which, str):
        report = on_problem or (lambda msg: warnings.warn(msg, stacklevel=4))  # our caller's line
        for kind in which[:-1]:
            try:
                return resolve_checkpoint(run_dir_or_ckpt, kind, report)
            except CheckpointError:  # none of that kind (or none verifies): try the next
                continue
        return resolve_checkpoint(run_dir_or_ckpt, which[-1], report)
    if which not in POINTERS:
        raise ValueError(f"which must be one of {POINTERS}, not {which!r}")
    report = on_problem or (lambda msg: warnings.warn(msg, stacklevel=3))
    path = Path(run_dir_or_ckpt)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if (path / MANIFEST).exists() or (path / WEIGHTS).exists():  # one checkpoint directory
        verify_checkpoint(path)
        return path
    ckpt_root = path / "checkpoints" if (path / "checkpoints").is_dir() else path  # a run dir, or its checkpoints
    dirs = list_checkpoints(ckpt_root)
    pointed = read_pointer(ckpt_root, which)
    if not dirs and (pointed is None or not _leftover_copies(ckpt_root, pointed)):
        raise CheckpointError(f"{ckpt_root}: no checkpoints")
    candidates: list[Path] = []
    if pointed is not None and ((ckpt_root / pointed).is_dir() or _leftover_copies(ckpt_root, pointed)):
        candidates.append(ckpt_root / pointed)
        start = checkpoint_step(ckpt_root / pointed)
        candidates += [p for p in reversed(dirs) if (checkpoint_step(p) or 0) < (start or 0)]
    else:
        if pointed is not None:
            report(f"{ckpt_root / which}: points to missing {pointed}; using the newest checkpoint")
        candidates = list(reversed(dirs))
    for cand in candidates:
        try:
            verify_checkpoint(cand)
            return cand
        except CheckpointError as e:
            # a re-save of this step interrupted between its renames leaves the old copy
            for old in _leftover_copies(ckpt_root, cand.name):
                if _intact(old):
                    report(f"{e}; using {old.name}, the copy left by an interrupted save")
                    return old
            report(f"{e}; skipping checkpoint {cand.name}")
    raise CheckpointError(f"{ckpt_root}: no checkpoint passes verification")
