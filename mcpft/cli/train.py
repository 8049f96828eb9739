"""Model verbs: train, merge, average, push-model, eval."""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import threading
import typing
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from mcpft.cli.common import CliError, emit, open_store, progress
from mcpft.config import default_base_model, load_settings
from mcpft.selection import HELDOUT_TAG
from mcpft.train import MERGE_DTYPES, TrainConfig

BASE_MODEL_DEFAULT = ("space.yaml's base_model: its gpu entry with CUDA, else its cpu entry ('smollm2' = the packaged "
                      "SmolLM2)")


def register(verbs, parent):
    p = verbs.add_parser(
        "train", parents=[parent], help="LoRA fine-tune a model on training rows",
        description="TrainConfig's options default to its own values, then to space.yaml's training: block (or "
                    "MCPFT_TRAINING); their flags override both.")
    p.add_argument("--out", required=True, type=Path,
                   help="a new or empty folder for the adapter, tokenizer and mcpft_run.json")
    p.add_argument("--base-model", default=None, help=f"local folder or Hub id (default: {BASE_MODEL_DEFAULT})")
    p.add_argument("--data", default=None,
                   help="'store' (default: the store's included traces), 'store:tag=A,tag=B' (only traces with all "
                        "these tags), an exported dataset path, or a Hub dataset id; store traces tagged "
                        f"{HELDOUT_TAG!r} are never trained on")
    p.add_argument("--tag", action="append", default=[], help="store selection: only traces with this tag (repeatable)")
    p.add_argument("--include-flagged", action="store_true", help="store selection: keep flagged traces")
    p.add_argument("--heldout", type=Path, default=None,
                   help="held-out rows (an export) scored step by step before (base) and after (adapter) training "
                        f"(default, when training from the store: its traces tagged {HELDOUT_TAG!r})")
    p.add_argument("--no-baseline", action="store_true", help="skip scoring the base model on the held-out rows")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generation budget per held-out step")
    _config_options(p.add_argument_group("TrainConfig"))
    p.set_defaults(handler=cmd_train)

    p = verbs.add_parser("merge", parents=[parent], help="merge a LoRA adapter into its base model (16-bit)")
    p.add_argument("--adapter", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", choices=MERGE_DTYPES, default="bf16")
    p.add_argument("--base-model", default=None, help="default: the base the adapter was trained on")
    p.set_defaults(handler=cmd_merge)

    p = verbs.add_parser("average", parents=[parent],
                         help="average LoRA adapters of one base (trainings from other seeds) into one adapter")
    p.add_argument("adapters", nargs="+", type=Path, metavar="ADAPTER", help="two or more adapter folders")
    p.add_argument("--out", required=True, type=Path, help="a new or empty folder for the averaged adapter")
    p.set_defaults(handler=cmd_average)

    p = verbs.add_parser("push-model", parents=[parent], help="upload an adapter or merged model with a model card")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--repo-id", required=True, help="OWNER/NAME")
    p.add_argument("--private", action="store_true")
    p.set_defaults(handler=cmd_push_model)

    p = verbs.add_parser("eval", parents=[parent], help="BFCL-style step scores on held-out rows")
    p.add_argument("--data", required=True, type=Path, help="held-out rows (JSONL, Parquet or a datasets folder)")
    p.add_argument("--model", default=None,
                   help=f"in-process: base model folder or Hub id (default: {BASE_MODEL_DEFAULT}); "
                        "with --base-url: the served model name")
    p.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter on top of --model (in-process)")
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--tokenizer", default=None,
                   help="with --base-url: a local model folder or Hub id whose tokenizer and context length count "
                        "each prompt here, so prompt + --max-new-tokens beyond the context counts as too long "
                        "(default: --model when it is a local model folder, as vLLM names a model served from one)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the endpoint's key (never passed on the command line)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--report", type=Path, default=None, help="write the full JSON report here")
    p.add_argument("--markdown", type=Path, default=None, help="write the Markdown report here")
    p.set_defaults(handler=cmd_eval)


def _config_options(group) -> None:
    """One flag per TrainConfig field, its help from the field; a flag not given leaves no attribute on args."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        shown = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        default = "" if f.default is None else f" (default: {shown})"  # a None default's help says what it means
        help_text = f"{f.metadata['help']}{default}".replace("%", "%%")
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        group.add_argument(f"--{f.name.replace('_', '-')}", *f.metadata.get("aliases", ()), dest=f.name,
                           default=argparse.SUPPRESS, help=help_text, **_parsing(hints[f.name]), **extra)


def _parsing(hint) -> dict:
    """argparse's keywords for a TrainConfig field's type (`X | None`: parsed as X; bools get --no-...)."""
    if typing.get_origin(hint) is tuple:
        return {"type": _names, "metavar": "A,B,..."}
    kinds = [kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None)]
    return {"action": argparse.BooleanOptionalAction} if kinds == [bool] else {"type": kinds[0]}


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _errors():
    from mcpft.evaluate import EvaluationError
    from mcpft.hub import PushError
    from mcpft.models import ModelError
    from mcpft.render import RenderError
    from mcpft.selection import SelectionError
    from mcpft.train import TrainError

    return TrainError, SelectionError, EvaluationError, ModelError, RenderError, PushError, FileNotFoundError


@contextmanager
def _user_errors():
    try:
        yield
    except _errors() as error:
        raise CliError(str(error)) from None


def _quiet_libraries():
    """Keep datasets' and transformers' own bars off stderr: ours is the one to read."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@contextmanager
def _stop_on_interrupt(stop_event: threading.Event):
    """First Ctrl-C: stop after the current step, keeping its adapter. Second: interrupt at once."""
    def handler(signum, frame):
        if stop_event.is_set():
            raise KeyboardInterrupt
        stop_event.set()
        print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _score(rows: list[dict], generator, label: str) -> dict:
    from mcpft.evaluate import evaluate_rows

    with progress(desc=label, unit="step") as bar:
        def on_step(done, total, record):
            bar.total = total
            bar.update(1)

        return evaluate_rows(rows, generator, on_step=on_step)


def cmd_train(args):
    from mcpft.selection import select_rows, store_selection
    from mcpft.train import check_out_dir, config_from_settings, train, training_path

    settings = load_settings()
    with _user_errors():
        check_out_dir(args.out)  # before anything loads or runs
        config = config_from_settings(settings.get("training"),
                                      **{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                                         if hasattr(args, f.name)})
        path, why = training_path(config)
    if path == "unsloth":
        import unsloth  # noqa: F401  (before transformers, which the next line imports, so its patches apply)
    print(f"training path: {path} ({why})", file=sys.stderr)
    _quiet_libraries()
    base_model = args.base_model or default_base_model(settings)
    with _user_errors():
        store = open_store(args) if store_selection(args.data) is not None else None
        rows, source = select_rows(args.data, store, args.tag, args.include_flagged)
        heldout, heldout_source = _heldout_rows(args, store)
        baseline = None if not heldout or args.no_baseline else (
            lambda: _baseline(heldout, base_model, args.max_new_tokens))
        stop_event = threading.Event()
        with progress(desc="train", unit="step") as bar, _stop_on_interrupt(stop_event):
            def on_progress(p):
                bar.total = p.total
                bar.update(p.step - bar.n)
                bar.set_postfix(loss=f"{p.loss:.4f}", tok_s=f"{p.tokens_per_s or 0:.0f}")

            result = train(config, rows, args.out, base_model=base_model, on_progress=on_progress,
                           stop_event=stop_event, source=source, baseline=baseline,
                           record_extra={"cli": {"argv": sys.argv[1:]}, "heldout": heldout_source})
        summary = {**result.summary(), "heldout": heldout_source}
        if heldout and result.adapter_dir:
            # A full fine-tune's output is the model itself; a LoRA run's is an adapter on the base.
            model, adapter = ((str(result.adapter_dir), None) if config.full_finetune
                              else (base_model, result.adapter_dir))
            report = _after(heldout, model, adapter, args.max_new_tokens, result.adapter_dir, result.baseline)
            summary["after"] = report["totals"]
            summary["baseline"] = result.baseline["totals"] if result.baseline else None
    text = (f"{'stopped' if result.stopped else 'trained'} {result.steps}/{result.total_steps} steps on "
            f"{result.rows_used} rows ({len(result.rows_left_out)} left out) via {result.path}: {result.why}\n"
            f"final loss {result.final_loss}; {'model' if config.full_finetune else 'adapter'} in {result.adapter_dir}")
    emit(args, summary, text)


def _heldout_rows(args, store) -> tuple[list[dict] | None, dict | None]:
    """--heldout's rows, else (training from the store) the store's traces tagged heldout; says which on stderr.
    Their steps are checked here, before any model loads."""
    from mcpft.evaluate import steps_from_rows
    from mcpft.selection import read_rows, store_heldout_rows

    if args.heldout:
        rows, source = read_rows(args.heldout), {"kind": "file", "path": str(args.heldout)}
    elif store is not None:
        rows, source = store_heldout_rows(store)
    else:
        return None, None
    if not rows:
        print(f"held-out: none (no included, unflagged store trace is tagged {HELDOUT_TAG!r}; tag some, or pass "
              "--heldout PATH)", file=sys.stderr)
        return None, None
    source = {**source, "rows": len(rows), "steps": len(steps_from_rows(rows))}
    where = source.get("path") or f"{source['traces']} store trace(s) tagged {HELDOUT_TAG!r}, never trained on"
    print(f"held-out: {source['rows']} row(s), {source['steps']} step(s) from {where}", file=sys.stderr)
    return rows, source


def _baseline(heldout: list[dict], base_model: str | None, max_new_tokens: int) -> dict:
    from mcpft.evaluate import local_generator

    generator = local_generator(base_model, max_new_tokens=max_new_tokens)
    try:
        return _score(heldout, generator, "baseline")
    finally:
        del generator
        gc.collect()  # free the base model before training loads it again


def _after(heldout: list[dict], model: str | None, adapter: Path | None, max_new_tokens: int, out_dir: Path,
           baseline: dict | None) -> dict:
    """Score the trained model (`model` with `adapter` on top, if any); the report lands in `out_dir`'s run record."""
    from mcpft.evaluate import compare, local_generator
    from mcpft.train import update_run_record

    report = _score(heldout, local_generator(model, adapter=adapter, max_new_tokens=max_new_tokens), "after")
    results = {"after": report}
    if baseline:
        results["comparison"] = compare(baseline, report)
    update_run_record(out_dir, **results)
    return report


def cmd_merge(args):
    from mcpft.train import merge_adapter

    _quiet_libraries()
    with _user_errors():
        out = merge_adapter(args.adapter, args.out, dtype=args.dtype, base_model=args.base_model)
    emit(args, {"out": str(out), "dtype": args.dtype, "adapter": str(args.adapter)},
         f"merged {args.adapter} into {out} ({args.dtype})")


def cmd_average(args):
    from mcpft.train import average_adapters

    with _user_errors():
        out = average_adapters(args.adapters, args.out)
    emit(args, {"out": str(out), "adapters": [str(a) for a in args.adapters]},
         f"averaged {len(args.adapters)} adapters into {out}")


def cmd_push_model(args):
    from huggingface_hub.errors import HfHubHTTPError

    from mcpft.hub import push_model

    with _user_errors():
        try:
            url = push_model(args.dir, args.repo_id, private=args.private)
        except HfHubHTTPError as error:
            raise CliError(f"the Hub refused the upload: {error}") from None
    emit(args, {"url": url, "repo_id": args.repo_id}, f"pushed {args.dir} to {url}")


def cmd_eval(args):
    from mcpft.evaluate import local_generator, report_markdown, steps_from_rows
    from mcpft.selection import read_rows

    _quiet_libraries()
    with _user_errors():
        rows = read_rows(args.data)
        steps_from_rows(rows)  # checked before a model loads
        if args.base_url:
            generator = _endpoint_generator(args)
        else:
            generator = local_generator(args.model or default_base_model(load_settings()), adapter=args.adapter,
                                        max_new_tokens=args.max_new_tokens)
        report = _score(rows, generator, "eval")
    if args.report:
        args.report.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    markdown = report_markdown(report)
    if args.markdown:
        args.markdown.write_text(markdown, encoding="utf-8")
    summary = {"model": report["model"], "totals": report["totals"],
               "report": str(args.report) if args.report else None,
               "markdown": str(args.markdown) if args.markdown else None}
    emit(args, summary, markdown)


def _endpoint_generator(args):
    """The endpoint's generator; with a local tokenizer (see --tokenizer) prompts are counted against its context."""
    import os

    from mcpft.config import data_dir
    from mcpft.evaluate import EndpointGenerator
    from mcpft.models import load_tokenizer, model_context

    if not args.model:
        raise CliError("--base-url needs --model: the model name the endpoint serves")
    if args.adapter:
        raise CliError("--adapter applies to in-process evaluation; an endpoint serves its own adapters")
    spec = args.tokenizer or (args.model if (Path(args.model) / "config.json").is_file() else None)
    tokenizer = load_tokenizer(spec, data_dir()) if spec else None
    return EndpointGenerator(args.base_url, args.model, api_key=os.environ.get(args.api_key_env),
                             max_new_tokens=args.max_new_tokens, tokenizer=tokenizer,
                             context_length=model_context(spec, data_dir()) if spec else None)
