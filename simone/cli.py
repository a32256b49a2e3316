"""The `simone` command line: argument parsing only; every verb calls a library function.

simone run        corpus → curate → tokenizer → shards → train → validate → package
simone curate | tokenizer | prepare | train | validate | package   one stage alone
simone finetune   chat fine-tuning of a trained model (default: a demo set from the embedded corpus)
simone generate   sample from a run dir, checkpoint dir or packaged .tar.gz
simone ablate     governance ablation: every variant on the same data and budget
simone config     print a preset (or a saved config with overrides)
simone doctor     check the machine and the corpus
simone monitor    live dashboard (port 5001);  simone status  the same in the terminal
simone serve      an OpenAI-compatible HTTP API over a trained model (port 8000), chat page at /
simone chat       talk to a trained model in the terminal
simone bench      train | generate | prep: ours against transformers, data-prep time and RAM
simone export     a trained model as a Hugging Face folder (--format hf) or GGUF file (--format gguf)
simone eval       bits per byte of models (simone, hf:DIR, GGUF) on any folder of text
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from simone.config import DEFAULT_PRESET, PRESETS, Config, apply_overrides, load_config, preset
from simone.errors import SimoneError
from simone.rundir import RunDir

# Each cmd_* function imports what it runs (the library, rich) on purpose: `simone --help`
# (or a typo) answers at once, without loading torch and the rest.


class CLIError(Exception):
    """A user error reported as one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one clear line (no usage dump, no traceback)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# The original train_all_models.py flag names, accepted as aliases: alias -> config key.
LEGACY_CONFIG_FLAGS = {
    "--vocab_size": "tokenizer.vocab_size",
    "--hidden_dim": "model.dim",
    "--num_layers": "model.n_layers",
    "--batch_size": "train.batch_size",
    "--gradient_accumulation_steps": "train.grad_accum",
    "--learning_rate": "train.lr",
    "--num_epochs": "train.num_epochs",
    "--patience": "train.patience",
    "--min_epochs": "train.min_epochs",
}


# With any of those flags and no --preset/--config, a run starts from the original recipe
# (the h200 preset: 12 layers x 768, context 1024), as the original script did, not from the
# small default.
LEGACY_PRESET = "h200"
# The original script's --resume_from spellings -> ours.
RESUME_ALIASES = {"best_model": "best", "latest_checkpoint": "latest"}


def uses_legacy_flags(args: argparse.Namespace) -> bool:
    return any(key.startswith("legacy:") and value is not None for key, value in vars(args).items())


def _resume_arg(value: str | None) -> str | None:
    return RESUME_ALIASES.get(value, value) if value is not None else None


def _add_curation_flags(p: argparse.ArgumentParser) -> None:
    """The curation switches of `run`, `curate` and `prepare` (applied to the config by `build_config`)."""
    p.add_argument("--strict", action="store_true", help="leave flagged files out of training")
    p.add_argument("--decontaminate", action="store_true", help="move contaminated validation docs")
    p.add_argument("--no-curate", action="store_true", help="skip dedup/quality/label filtering")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="N processes curate and tokenize the shards, N threads train the tokenizer (default: one per core)",
    )


def _add_config_args(p: argparse.ArgumentParser, with_data: bool = True) -> None:
    p.add_argument("--preset", help=f"named preset ({', '.join(PRESETS)}; default {DEFAULT_PRESET})")
    p.add_argument("--config", help="a saved config JSON (e.g. a run's config.json)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=1e-3 (repeatable)",
    )
    if with_data:
        p.add_argument(
            "--data",
            "--data_dir",
            help="corpus: a folder of DOMAIN/SUBDOMAIN/*.txt and/or .jsonl(.gz|.zst)/.parquet record files, or one file (default: the embedded corpus)",
        )
        p.add_argument(
            "--validation-dir",
            "--validation_dir",
            help="a pre-split validation folder (same layout): its documents are the "
            "validation split, every --data document trains",
        )
        p.add_argument("--text-field", help="the text field of a .jsonl/.parquet record (default: text)")
        p.add_argument("--domain-field", help="the record field naming its domain (default: its folder)")
    p.add_argument("--max-steps", "--max_steps", type=int)
    p.add_argument("--max-minutes", "--max_minutes", type=float)
    for flag, key in LEGACY_CONFIG_FLAGS.items():
        p.add_argument(flag, dest=f"legacy:{key}", help=f"alias of --set {key}=…")


# the --force of `run` and `train`
_RUN_FORCE_HELP = "start over in a run dir that holds checkpoints (its earlier run moves to RUN/replaced-*)"


def _add_init_from(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--init-from",
        metavar="PACKAGE_OR_RUN",
        help="continued pretraining: start from this model's weights and tokenizer (a .tar.gz package, "
        "run dir or checkpoint), with its config, a fresh optimizer and schedule, and train.lr 0.3 x its own",
    )


def build_config(args: argparse.Namespace, run_dir: Path | None = None) -> Config:
    """Preset (or --config, or the run's own config.json, or --init-from's parent's) → legacy flags
    → --set → plain flags."""
    init_from = getattr(args, "init_from", None)
    if args.config:
        cfg = load_config(args.config)
        if args.preset or init_from:
            raise CLIError(f"give either --config or {'--preset' if args.preset else '--init-from'}, not both")
    elif run_dir is not None and RunDir(run_dir).config.exists() and not args.preset:
        cfg = load_config(RunDir(run_dir).config)
    elif init_from:  # a continued run starts from its parent's config (simone/workflows/continued.py)
        from simone.workflows.continued import parent_config, read_parent

        cfg = parent_config(read_parent(init_from))
        if args.preset and args.preset != cfg.preset:
            raise CLIError(
                f"--preset {args.preset}: a continued run takes its parent's config (preset {cfg.preset}); "
                "drop --preset (change settings with --set)"
            )
    else:
        cfg = preset(args.preset or (LEGACY_PRESET if uses_legacy_flags(args) else DEFAULT_PRESET))
    for key, value in vars(args).items():
        if key.startswith("legacy:") and value is not None:
            apply_overrides(cfg, [f"{key[len('legacy:') :]}={value}"])
    apply_overrides(cfg, args.overrides)
    if getattr(args, "data", None):
        cfg.data.data_dir = str(Path(args.data).expanduser().resolve())
    if getattr(args, "validation_dir", None):
        cfg.data.validation_dir = str(Path(args.validation_dir).expanduser().resolve())
    if getattr(args, "text_field", None):
        cfg.data.text_field = args.text_field
    if getattr(args, "domain_field", None):
        cfg.data.domain_field = args.domain_field
    if getattr(args, "max_steps", None) is not None:
        cfg.train.max_steps = args.max_steps
    if getattr(args, "max_minutes", None) is not None:
        cfg.train.max_minutes = args.max_minutes
    if getattr(args, "strict", False):
        cfg.curate.strict = True
    if getattr(args, "decontaminate", False):
        cfg.curate.decontaminate = True
    if getattr(args, "no_curate", False):
        cfg.curate.enabled = False
    if getattr(args, "workers", None) is not None:
        if args.workers < 1:
            raise CLIError(f"--workers {args.workers}: give at least 1")
        cfg.curate.workers = args.workers
        # the tokenizer trainer's Rust thread pool reads this when it first starts (later in this process)
        os.environ.setdefault("RAYON_NUM_THREADS", str(args.workers))
    return cfg


def _default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


# ----------------------------------------------------------------------------- verbs


def _implied_legacy_preset(args: argparse.Namespace, cfg: Config) -> bool:
    """True when the legacy flags chose the preset (not --preset, --config or a saved run)."""
    return not args.preset and not args.config and uses_legacy_flags(args) and cfg.preset == LEGACY_PRESET


def _say(line: str) -> None:
    """A library's progress line, as the console shows it."""
    print(f"[simone] {line}", flush=True)


def _show(report: object) -> None:
    """A library's report as it is: text printed plain, a rich table or group through rich."""
    if isinstance(report, str):
        print(report, flush=True)
    else:
        from rich.console import Console

        Console().print(report)


def cmd_run(args: argparse.Namespace) -> int:
    from simone.workflows.pipeline import MODEL_CHOICES, check_device, run_models, run_pipeline

    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir()
    resume = _resume_arg(args.resume)
    if args.init_from and (resume or args.models or args.budget_minutes is not None):
        given = "--resume" if resume else "--models" if args.models else "--budget-minutes"
        raise CLIError(
            f"--init-from with {given}: a continued run is one new model of its parent's shape "
            "(resume one with --resume alone: its config.json names its parent)"
        )
    cfg = build_config(args, run_dir if resume else None)
    legacy = _implied_legacy_preset(args, cfg)
    if legacy:
        _say(f"legacy flags without --preset: starting from the original recipe, preset {LEGACY_PRESET}")
    # a CUDA preset chosen by the legacy flags runs on whatever device there is; one named
    # with --preset on a machine without CUDA is an error before any work
    check_device(cfg, fall_back_to_cpu=legacy, say=_say)
    if args.budget_minutes is not None and not resume:  # a resumed run keeps its saved shape
        _apply_budget_minutes(cfg, args.budget_minutes)
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_CHOICES]
    if args.models and (unknown or not models):
        raise CLIError(
            f"--models: unknown model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MODEL_CHOICES)}"
        )
    run = functools.partial(run_models, models=models) if models else run_pipeline
    result = run(
        cfg,
        run_dir,
        resume=resume,
        monitor=args.monitor,
        monitor_port=args.port,
        package_dir=Path(args.package_dir),
        eval_data=Path(args.eval_data) if args.eval_data else None,
        force=args.force,
        say=_say,
        show=_show,
    )
    return 0 if result.ok else 1


def _apply_budget_minutes(cfg: Config, minutes: float) -> None:
    """--budget-minutes: measure this machine on the preset's model, then pick the shape and
    batch for the budget (simone/train/budget.py) and cap training at `minutes`."""
    from simone.train.budget import apply_budget, probe_tokens_per_s, shape_for_budget
    from simone.workflows.pipeline import estimated_train_tokens

    if minutes <= 0:
        raise CLIError(f"--budget-minutes: must be > 0 (got {minutes:g})")
    tokens_per_s, flops_per_token = probe_tokens_per_s(cfg)
    shape = shape_for_budget(
        minutes,
        tokens_per_s,
        flops_per_token,
        cfg.tokenizer.vocab_size,
        corpus_tokens=estimated_train_tokens(cfg),
        base=cfg.model,
    )
    apply_budget(cfg, minutes, shape)
    _say(
        f"--budget-minutes {minutes:g}: probe {tokens_per_s:,.0f} tokens/s on the preset's model; "
        f"shape {shape.describe()}"
    )


def cmd_curate(args: argparse.Namespace) -> int:
    from simone.workflows.pipeline import stage_curate

    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir()
    cfg = build_config(args, run_dir)
    stage_curate(cfg, run_dir, say=_say, show=_show)
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from simone.workflows.pipeline import stage_tokenizer

    run_dir = Path(args.run_dir)
    stage_tokenizer(build_config(args, run_dir), run_dir, say=_say)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from simone.workflows.pipeline import stage_prepare

    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir()
    stage_prepare(build_config(args, run_dir), run_dir, say=_say, show=_show)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from simone.workflows.pipeline import check_device, stage_train

    run_dir = Path(args.run_dir)
    cfg = build_config(args, run_dir)
    if args.parallel is not None:
        cfg.train.parallel = args.parallel
    check_device(cfg)  # before the run lock creates the run dir
    result = stage_train(cfg, run_dir, resume=_resume_arg(args.resume), force=args.force, say=_say, show=_show)
    return 0 if result is not None else 1


def cmd_finetune(args: argparse.Namespace) -> int:
    from simone.workflows.finetune import finetune

    resume = _resume_arg(args.resume)
    if args.model is None and resume is None:
        raise CLIError("finetune: give --model PACKAGE (or --out RUN --resume latest to continue a fine-tune)")
    result = finetune(
        Path(args.model) if args.model else None,
        Path(args.out) if args.out else _default_run_dir(),
        data=Path(args.data) if args.data else None,
        overrides=args.overrides,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        skip_bad=args.skip_bad,
        eval_items=args.eval_items,
        resume=resume,
        force=args.force,
        package_dir=Path(args.package_dir),
        say=_say,
        show=_show,
    )
    return 0 if result.ok else 1


def cmd_validate(args: argparse.Namespace) -> int:
    from simone.inference.validation_report import format_report, validate

    report = validate(
        Path(args.model),
        out_dir=Path(args.out) if args.out else None,
        data_dir=Path(args.data_dir) if args.data_dir else None,
    )
    for part in format_report(report):
        _show(part)
    return 0 if report["ok"] else 1


def cmd_package(args: argparse.Namespace) -> int:
    from simone.inference.package import package_run

    path = package_run(
        RunDir(Path(args.run_dir)), Path(args.out), say=lambda line: print(f"[simone] {line}", file=sys.stderr)
    )
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from simone.inference.generate import Generation

    generation = Generation(
        model_path=Path(args.model),
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
        domain=args.domain,
        policy_guidance=args.policy_guidance,
        guidance_top_k=args.guidance_top_k,
        trace=Path(args.trace) if args.trace else None,
        trace_html=Path(args.trace_html) if args.trace_html else None,
        stream_past_context=args.stream_past_context,
    )
    if args.no_stream:
        print(args.prompt + "".join(generation))
    else:  # token by token
        print(args.prompt, end="", flush=True)
        for piece in generation:
            print(piece, end="", flush=True)
        print()
    for line in generation.summary():
        print(line, file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        from simone.inference.gguf_file import export_gguf

        print(export_gguf(Path(args.model), Path(args.out), dtype=args.dtype or "f32", force=args.force))
        return 0
    if args.dtype:
        raise CLIError("--dtype applies to --format gguf only (the hf folder is float32)")
    from simone.inference.hf_folder import export_hf

    print(export_hf(Path(args.model), Path(args.out), force=args.force))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    json_path = Path(args.json) if args.json else None
    if args.suite or args.pairs:
        return _eval_suite(args, json_path)
    if args.lm_eval_tasks:
        raise CLIError("--lm-eval-tasks writes the consistency suite: give --suite FILE (and/or --pairs FILE)")
    if not args.data:
        raise CLIError("give --data DIR (a folder of .txt to score), or --suite FILE / --pairs FILE")
    from simone.inference.text_bpb import evaluate_and_save, format_table

    print(format_table(evaluate_and_save(args.model, Path(args.data), json_path, device=args.device)))
    if json_path is not None:
        print(f"[json: {json_path}]", file=sys.stderr)
    return 0


def _eval_suite(args: argparse.Namespace, json_path: Path | None) -> int:
    from simone.inference.consistency import (
        SuiteSettings,
        evaluate_suite,
        format_suite_markdown,
        suite_items,
        write_lm_eval_tasks,
    )
    from simone.inference.text_bpb import refuse_symlinked_json
    from simone.rundir import atomic_write_json

    refuse_symlinked_json(json_path)
    items, where = suite_items(
        Path(args.suite) if args.suite else None,
        Path(args.data) if args.data else None,
        Path(args.pairs) if args.pairs else None,
        SuiteSettings.sized(args.suite_items),
    )
    print(f"[simone] {where}", file=sys.stderr)
    if args.lm_eval_tasks:
        names = write_lm_eval_tasks(items, Path(args.lm_eval_tasks))
        print(
            f"[simone] lm-evaluation-harness tasks in {args.lm_eval_tasks}: lm_eval --model hf --model_args "
            f"pretrained=EXPORTED_HF_FOLDER --include_path {args.lm_eval_tasks} --tasks {names[-1]}",
            file=sys.stderr,
        )
    result = evaluate_suite(
        args.model, items, device=args.device, say=lambda line: print(f"[simone] {line}", file=sys.stderr)
    )
    print(format_suite_markdown(result))
    if json_path is not None:
        atomic_write_json(json_path, result)
        print(f"[json: {json_path}]", file=sys.stderr)
    return 1 if any("error" in m for m in result["models"]) else 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from simone.workflows.ablate import VARIANTS, AblationSettings, run_ablation

    cfg = build_config(args)
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    else:  # data variants alone compare data (each against `curated`); else every model variant
        variants = [] if args.data_variants else list(VARIANTS)
    overrides: dict[str, list[str]] = {}
    for item in args.variant_overrides:  # NAME:section.key=value
        name, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise CLIError(f"--vset {item!r}: expected VARIANT:section.key=value")
        overrides.setdefault(name.strip(), []).append(override.strip())
    variants += [name for name in overrides if "@" in name and name not in variants]  # sweep points join
    settings = AblationSettings(
        budget_minutes=args.budget_minutes,
        variants=variants,
        max_steps=args.max_steps,
        seeds=args.seeds,
        tokens_per_variant=args.tokens_per_variant,
        samples_per_domain=args.samples_per_domain,
        sample_tokens=args.sample_tokens,
        guidance_weight=args.guidance_weight,
        heldout_batches=args.heldout_batches,
        overrides=overrides,
        resume=args.resume,
        data_variants=args.data_variants,
        suite=args.suite,
        suite_items=args.suite_items,
    )
    try:
        run_ablation(cfg, Path(args.out), settings, say=lambda line: print(f"[ablate] {line}", flush=True), show=_show)
    except ValueError as e:
        raise CLIError(str(e)) from e
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    print(cfg.to_json())
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from rich.console import Console

    from simone.workflows.doctor import print_report, run_checks

    checks = run_checks(Path(args.data) if args.data else None, Path(args.run_dir) if args.run_dir else None)
    return print_report(checks, Console())


def cmd_monitor(args: argparse.Namespace) -> int:
    from simone.monitor import run_monitor

    run_monitor(
        runs_root=Path(args.runs) if args.runs else None,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        host=args.host,
        port=args.port,
        token=args.token,
        say=lambda line: print(line, flush=True),
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from simone.inference.serve import ServeLimits, run_server

    limits = {
        k: getattr(args, k)
        for k in ("max_queue", "max_request_tokens", "max_body_bytes")
        if getattr(args, k) is not None
    }
    run_server(
        Path(args.model),
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("SIMONE_API_KEY") or None,
        device=args.device,
        limits=ServeLimits(**limits),
        say=lambda line: print(line, flush=True),
    )
    return 0


# what a terminal would obey in a reply (escape sequences, carriage returns) is shown as U+FFFD
_CONTROL_CHARS = {c: "\ufffd" for c in [*range(32), *range(127, 160)] if chr(c) not in "\n\t"}


def cmd_chat(args: argparse.Namespace) -> int:
    from simone.inference.chat_session import ChatSession
    from simone.inference.load import load_model
    from simone.inference.openai_api import chat_format

    with contextlib.suppress(ImportError):  # line editing for input(), where the platform has it
        import readline  # noqa: F401

    loaded = load_model(Path(args.model), device=args.device)
    session = ChatSession(
        loaded, args.system, args.temperature, args.max_tokens, args.seed, say=lambda line: print(f"({line})")
    )
    print(
        f"simone chat: {loaded.source} ({chat_format(loaded)} chat, {loaded.device}). "
        "/reset forgets the conversation; Ctrl-C stops a reply; Ctrl-D or Ctrl-C here ends."
    )
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text.strip() == "/reset":
            session.reset()
            print("(conversation forgotten)")
        elif text.strip():
            pieces = session.reply(text)
            try:
                for piece in pieces:
                    print(piece.translate(_CONTROL_CHARS), end="", flush=True)
            except KeyboardInterrupt:
                print(" [stopped]", end="")
            finally:
                pieces.close()  # the reply so far joins the history
            print()


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from simone.monitor.terminal import status_report

    code, lines = status_report(Path(args.run) if args.run else None, runs_root=Path(args.runs))
    Console(highlight=False).print(*lines, sep="\n")
    return code


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from simone.workflows import bench

    common = {"preset": args.preset or DEFAULT_PRESET, "threads": args.threads, "json_path": args.json}
    if args.kind != "prep" and args.corpus:
        raise CLIError(f"simone bench {args.kind}: --corpus is for `prep` only")
    try:
        if args.kind == "prep":
            if not args.corpus:
                raise CLIError("simone bench prep: give --corpus DIR (e.g. ../shared/corpus)")
            result = bench.bench_prep(Path(args.corpus), **common)
        else:
            run = bench.bench_train if args.kind == "train" else bench.bench_generate
            result = run(
                repeats=args.repeats,
                device=args.device,
                dtypes=args.dtype or None,
                compile=not args.no_compile,
                say=lambda line: print(line, flush=True),
                **common,
            )
    except bench.BenchError as e:
        raise CLIError(str(e)) from e
    console = Console(width=max(150, shutil.get_terminal_size().columns))  # the tables are wide
    for table in bench.tables(result):
        console.print(table)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="simone", description="SIM-ONE MVLM: curate, train, validate and package a small language model."
    )
    from simone import __version__

    parser.add_argument("--version", action="version", version=f"simone {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def verb(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=fn)
        return p

    p = verb("run", cmd_run, "run every stage: corpus to packaged, validated model")
    _add_config_args(p)
    _add_init_from(p)
    p.add_argument("--run-dir", "--output_dir", help="default: runs/<timestamp>")
    p.add_argument("--resume", "--resume_from", help="latest | best (or best_model) | checkpoint path")
    p.add_argument("--force", action="store_true", help=_RUN_FORCE_HELP)
    p.add_argument(
        "--models",
        metavar="llama,gpt2",
        help="train several architectures on the same data, tokenizer and budget into "
        "RUN/runs/NAME, validate and package each, and write RUN/comparison.{md,json}",
    )
    p.add_argument("--package-dir", default="models_for_download", help="where the .tar.gz goes")
    p.add_argument("--monitor", action="store_true", help="serve the live dashboard beside training")
    p.add_argument("--port", type=int, default=5001, help="dashboard port (with --monitor)")
    _add_curation_flags(p)
    p.add_argument(
        "--budget-minutes",
        type=float,
        metavar="M",
        help="pick depth, width, context and batch for M minutes of training on this machine "
        "(a short throughput probe first) and cap training at M minutes",
    )
    p.add_argument(
        "--eval-data",
        metavar="DIR",
        help="at the end, bits per byte of the packaged model on this folder of text "
        "(written to RUN/validation/eval.json)",
    )

    p = verb("curate", cmd_curate, "clean, deduplicate, flag and report a corpus")
    _add_config_args(p)
    p.add_argument("--run-dir")
    _add_curation_flags(p)

    p = verb("tokenizer", cmd_tokenizer, "train the BPE tokenizer on a curated run dir")
    _add_config_args(p, with_data=False)
    p.add_argument("--run-dir", required=True)

    p = verb("prepare", cmd_prepare, "curate + tokenizer + token shards (everything before training)")
    _add_config_args(p)
    p.add_argument("--run-dir")
    _add_curation_flags(p)

    p = verb(
        "train",
        cmd_train,
        "train a run dir, preparing its data first if needed (under torchrun: data-parallel on every process)",
    )
    _add_config_args(p)
    _add_init_from(p)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--resume", "--resume_from")
    p.add_argument("--force", action="store_true", help=_RUN_FORCE_HELP)
    p.add_argument(
        "--parallel",
        choices=["ddp", "fsdp"],
        help="under torchrun: ddp (a replica per process, default) or fsdp (FSDP2: sharded "
        "parameters, gradients and optimizer state, for models that do not fit one GPU)",
    )

    p = verb("finetune", cmd_finetune, "chat fine-tuning: train a model on conversations, loss on its replies only")
    p.add_argument("--model", help="the package, run dir or checkpoint to fine-tune")
    p.add_argument(
        "--data",
        metavar="CHATS.jsonl",
        help='conversations, a line each: {"messages": [{"role", "content"}, ...]} or {"prompt", "completion"} '
        "(default: a demo set built from the embedded corpus)",
    )
    p.add_argument("--out", metavar="RUN", help="the run dir (default: runs/<timestamp>)")
    p.add_argument("--skip-bad", action="store_true", help="leave malformed lines out (counted) instead of stopping")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--eval-items", type=int, default=200, help="held-out replies measured (default 200)")
    p.add_argument("--resume", help="latest | best | checkpoint path (of the run in --out)")
    p.add_argument("--force", action="store_true", help="start over in a run dir that holds checkpoints")
    p.add_argument("--package-dir", default="models_for_download", help="where the .tar.gz goes")

    p = verb("validate", cmd_validate, "write validation/report.{json,md}; non-zero exit when a check fails")
    p.add_argument("--model", required=True, help="run dir, checkpoint dir or .tar.gz")
    p.add_argument("--out", help="report folder (default: RUN/validation or next to the package)")
    p.add_argument("--data-dir", help="a run's data/ folder with val.bin (default: the run's own)")

    p = verb("package", cmd_package, "pack a trained run into models_for_download/NAME.tar.gz")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", default="models_for_download")

    p = verb("generate", cmd_generate, "generate text from a trained model")
    p.add_argument("--model", required=True, help="run dir, checkpoint dir or .tar.gz")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-tokens", "--max_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end, not token by token")
    p.add_argument("--domain", help="steer toward a domain: start from its <|domain:NAME|> token")
    p.add_argument(
        "--policy-guidance",
        type=float,
        default=0.0,
        metavar="W",
        help="rerank the top candidates by W x log p_policy(--domain) (governance models)",
    )
    p.add_argument("--guidance-top-k", type=int, default=8, help="candidates reranked by --policy-guidance")
    p.add_argument(
        "--trace",
        metavar="FILE.jsonl",
        help="write one JSON object per generated token (probability, entropy, sources, policy)",
    )
    p.add_argument(
        "--trace-html",
        metavar="FILE.html",
        help="the trace as an HTML page (tokens coloured by probability, sources on hover)",
    )
    p.add_argument(
        "--stream-past-context",
        action="store_true",
        help="keep generating past the context window (streaming KV cache, Llama-style models)",
    )

    p = verb(
        "export",
        cmd_export,
        "write a trained model as a folder that transformers opens "
        "(AutoModelForCausalLM / AutoTokenizer.from_pretrained) "
        "or as one GGUF file that llama.cpp runs",
    )
    p.add_argument("--model", required=True, help="run dir, checkpoint dir or .tar.gz")
    p.add_argument(
        "--format",
        choices=["hf", "gguf"],
        required=True,
        help="hf: a Hugging Face folder; gguf: one .gguf file for llama.cpp",
    )
    p.add_argument(
        "--dtype",
        choices=["f32", "f16", "bf16", "q8_0"],
        help="gguf only: the type of the weight matrices, default f32 (norms stay f32)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR|FILE",
        help="the folder (hf) or FILE.gguf (gguf) to write; never the model itself",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing FILE.gguf, or write the hf files into a folder that is not empty",
    )

    p = verb("eval", cmd_eval, "bits per byte of one or more models on a folder of text, overall and per domain")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="MODEL",
        help="run dir, checkpoint dir, .tar.gz, hf:DIR or FILE.gguf (repeatable)",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="DOMAIN/SUB/*.txt or a flat folder of *.txt; with --suite, where a new suite's held-out "
        "documents come from: a run dir (its validation split), a documents.jsonl or a folder",
    )
    p.add_argument(
        "--suite",
        metavar="FILE.jsonl",
        help="score the consistency suite in FILE (built there once from --data's held-out documents "
        "if it does not exist): bpb per domain, minimal pairs, cloze, generation health",
    )
    p.add_argument(
        "--pairs",
        metavar="FILE.jsonl",
        help="your own minimal pairs (fields good, bad; optional domain, kind), scored as the suite's",
    )
    p.add_argument(
        "--suite-items",
        type=int,
        default=100,
        metavar="N",
        help="when building a suite: items per domain and task (minimal pairs: per kind; prompts: N/5)",
    )
    p.add_argument(
        "--lm-eval-tasks",
        metavar="DIR",
        help="also write the suite as an lm-evaluation-harness task folder (offline, local files)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the result here")
    p.add_argument("--device", default="auto")

    p = verb(
        "ablate",
        cmd_ablate,
        "train GPT-2, plain, governance and ablated variants on the same budget; write ablation.{json,md,svg}",
    )
    _add_config_args(p)
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=30.0,
        help="total training time to share between the variants (sets the common step count)",
    )
    p.add_argument("--out", required=True, help="folder for the shared data, the runs and the report")
    p.add_argument("--variants", help="comma-separated subset (default: all)")
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="runs per variant (seed K: train.seed + K, for the initial weights and the data order)",
    )
    p.add_argument(
        "--tokens-per-variant",
        type=int,
        help="training tokens per run, the same for every variant (instead of --budget-minutes)",
    )
    p.add_argument("--samples-per-domain", type=int, default=50)
    p.add_argument("--sample-tokens", type=int, default=128)
    p.add_argument("--guidance-weight", type=float, default=1.0)
    p.add_argument(
        "--heldout-batches",
        type=int,
        help="held-out batches per domain (default: every window of the held-out documents)",
    )
    p.add_argument(
        "--vset",
        dest="variant_overrides",
        action="append",
        default=[],
        metavar="VARIANT:KEY=VALUE",
        help="override a config field for one variant; a sweep point BASE@TAG "
        "(e.g. full@mem16:model.n_memory_slots=16) joins --variants (repeatable)",
    )
    p.add_argument(
        "--data-variant",
        dest="data_variants",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="train the config's own model on other data too, against `curated` (the base corpus): "
        "SPEC is raw, strict, contradict:P[:KINDS], mix:DIR:P or a corpus folder (repeatable)",
    )
    p.add_argument(
        "--suite",
        action=argparse.BooleanOptionalAction,
        help="score every run on the consistency suite built from the held-out documents (default: with data variants)",
    )
    p.add_argument(
        "--suite-items",
        type=int,
        default=100,
        metavar="N",
        help="suite items per domain and task (minimal pairs: per kind; prompts: N/5); default 100",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs this --out already finished with the same config, budget, data and judge "
        "(continue a stopped ablation, or add seeds or variants to it)",
    )

    p = verb("config", cmd_config, "print a preset or a saved config, with overrides applied")
    _add_config_args(p)

    p = verb("doctor", cmd_doctor, "check Python, PyTorch, device, disk, memory and the corpus")
    p.add_argument("--data", "--data_dir")
    p.add_argument("--run-dir")

    p = verb("monitor", cmd_monitor, "serve the live training dashboard")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--runs", help="folder of run directories (default: runs/)")
    g.add_argument("--run-dir", help="one run directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--token", help="required when binding off loopback (generated if absent)")

    p = verb(
        "serve",
        cmd_serve,
        "serve a trained model over an OpenAI-compatible HTTP API "
        "(/v1/completions, /v1/chat/completions, /v1/models, /health) and a chat page at /",
    )
    p.add_argument("--model", required=True, help="run dir, checkpoint dir or .tar.gz")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        help="clients must send it as a Bearer token; required off loopback (default: $SIMONE_API_KEY, "
        "better: a key on the command line is visible to other local users in `ps`)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--max-queue", type=int, help="requests that may wait behind the running one; more get 429 (default 16)"
    )
    p.add_argument(
        "--max-request-tokens",
        type=int,
        help="one request's prompts × n × (prompt + max_tokens) tokens at most (default 16384)",
    )
    p.add_argument("--max-body-bytes", type=int, help="largest request body; larger gets 413 (default 1048576)")

    p = verb("chat", cmd_chat, "talk to a trained model in the terminal (its reply streams as it is written)")
    p.add_argument("--model", required=True, help="run dir, checkpoint dir or .tar.gz")
    p.add_argument("--system", metavar="TEXT", help="a system message that opens the conversation")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply (default 256)")
    p.add_argument("--seed", type=int, help="repeatable replies (default: a fresh seed)")
    p.add_argument("--device", default="auto")

    p = verb(
        "bench",
        cmd_bench,
        "benchmark: training and generation against transformers, or data preparation (time and peak RAM)",
    )
    p.add_argument("kind", choices=["train", "generate", "prep"])
    p.add_argument("--preset", help=f"model shape and training settings (default {DEFAULT_PRESET})")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    p.add_argument("--corpus", metavar="DIR", help="corpus folder (prep)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (median shown)")
    p.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    p.add_argument("--device", help="cpu | cuda (default: the preset's, auto)")
    p.add_argument(
        "--dtype",
        action="append",
        choices=["float32", "bfloat16", "float16"],
        help="rows to time (repeatable; default float32+bfloat16 on CPU, bfloat16 on GPU)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")

    p = verb("status", cmd_status, "print a run's state, progress, losses and ETA")
    p.add_argument("run", nargs="?")
    p.add_argument("--runs", default="runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except (CLIError, SimoneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
