"""Model verbs: train, merge, push-model, eval."""

from __future__ import annotations

import gc
import json
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from mcpft.cli.common import CliError, emit, open_store, progress
from mcpft.train import BACKENDS, MERGE_DTYPES, TrainConfig


def register(verbs, parent):
    p = verbs.add_parser("train", parents=[parent], help="LoRA fine-tune a model on training rows")
    p.add_argument("--out", required=True, type=Path, help="folder for the adapter, tokenizer and mcpft_run.json")
    p.add_argument("--base-model", default=None, help="local folder or Hub id (default: the packaged SmolLM2)")
    p.add_argument("--data", default=None,
                   help="'store' (default: the store's included traces), an exported dataset path, or a Hub dataset id")
    p.add_argument("--tag", action="append", default=[], help="store selection: only traces with this tag (repeatable)")
    p.add_argument("--include-flagged", action="store_true", help="store selection: keep flagged traces")
    p.add_argument("--heldout", type=Path, default=None,
                   help="held-out rows (an export) scored step by step before (base) and after (adapter) training")
    p.add_argument("--no-baseline", action="store_true", help="skip scoring the base model on --heldout")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generation budget per held-out step")
    defaults = TrainConfig()
    for flag, name, kind in (("--max-steps", "max_steps", int), ("--lr", "learning_rate", float),
                             ("--epochs", "epochs", float), ("--lora-r", "lora_r", int),
                             ("--lora-alpha", "lora_alpha", int), ("--grad-accum", "gradient_accumulation_steps", int),
                             ("--max-length", "max_length", int), ("--seed", "seed", int),
                             ("--eval-fraction", "eval_fraction", float)):
        p.add_argument(flag, dest=name, type=kind, default=getattr(defaults, name),
                       help=f"default: {getattr(defaults, name)}")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: Unsloth on CUDA when installed")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA (Unsloth path only)")
    p.set_defaults(handler=cmd_train)

    p = verbs.add_parser("merge", parents=[parent], help="merge a LoRA adapter into its base model (16-bit)")
    p.add_argument("--adapter", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", choices=MERGE_DTYPES, default="bf16")
    p.add_argument("--base-model", default=None, help="default: the base the adapter was trained on")
    p.set_defaults(handler=cmd_merge)

    p = verbs.add_parser("push-model", parents=[parent], help="upload an adapter or merged model with a model card")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--repo-id", required=True, help="OWNER/NAME")
    p.add_argument("--private", action="store_true")
    p.set_defaults(handler=cmd_push_model)

    p = verbs.add_parser("eval", parents=[parent], help="BFCL-style step scores on held-out rows")
    p.add_argument("--data", required=True, type=Path, help="held-out rows (JSONL, Parquet or a datasets folder)")
    p.add_argument("--model", default=None,
                   help="in-process: base model folder or Hub id (default: packaged SmolLM2); "
                        "with --base-url: the served model name")
    p.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter on top of --model (in-process)")
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the endpoint's key (never passed on the command line)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--report", type=Path, default=None, help="write the full JSON report here")
    p.add_argument("--markdown", type=Path, default=None, help="write the Markdown report here")
    p.set_defaults(handler=cmd_eval)


def _errors():
    from mcpft.evaluate import EvaluationError
    from mcpft.hub import PushError
    from mcpft.models import ModelError
    from mcpft.render import RenderError
    from mcpft.train import TrainError

    return TrainError, EvaluationError, ModelError, RenderError, PushError, FileNotFoundError


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
    from mcpft.dataset import load_rows
    from mcpft.train import choose_path, select_rows, train

    with _user_errors():
        path, why = choose_path(args.backend)
    if path == "unsloth":
        import unsloth  # noqa: F401  (before transformers, which the next line imports, so its patches apply)
    print(f"training path: {path} ({why})", file=sys.stderr)
    _quiet_libraries()
    config_fields = {name: getattr(args, name) for name in (
        "max_steps", "learning_rate", "epochs", "lora_r", "lora_alpha", "gradient_accumulation_steps", "max_length",
        "seed", "eval_fraction", "backend", "load_in_4bit")}
    with _user_errors():
        config = TrainConfig(**config_fields)
        store = open_store(args) if args.data in (None, "", "store") else None
        rows, source = select_rows(args.data, store, args.tag, args.include_flagged)
        heldout = load_rows(args.heldout) if args.heldout else None
        extra = {"cli": {"argv": sys.argv[1:]}}
        if heldout and not args.no_baseline:
            extra["baseline"] = _baseline(heldout, args)
        stop_event = threading.Event()
        with progress(desc="train", unit="step") as bar, _stop_on_interrupt(stop_event):
            def on_progress(p):
                bar.total = p.total
                bar.update(p.step - bar.n)
                bar.set_postfix(loss=f"{p.loss:.4f}", tok_s=f"{p.tokens_per_s or 0:.0f}")

            result = train(config, rows, args.out, base_model=args.base_model, on_progress=on_progress,
                           stop_event=stop_event, source=source, record_extra=extra)
        summary = result.summary()
        if heldout and result.adapter_dir:
            summary["after"] = _after(heldout, args, result.adapter_dir, extra.get("baseline"))["totals"]
            summary["baseline"] = extra["baseline"]["totals"] if "baseline" in extra else None
    text = (f"{'stopped' if result.stopped else 'trained'} {result.steps}/{result.total_steps} steps on "
            f"{result.rows_used} rows ({len(result.rows_left_out)} left out) via {result.path}: {result.why}\n"
            f"final loss {result.final_loss}; adapter in {result.adapter_dir}")
    emit(args, summary, text)


def _baseline(heldout: list[dict], args) -> dict:
    from mcpft.evaluate import local_generator

    generator = local_generator(args.base_model, max_new_tokens=args.max_new_tokens)
    try:
        return _score(heldout, generator, "baseline")
    finally:
        del generator
        gc.collect()  # free the base model before training loads it again


def _after(heldout: list[dict], args, adapter_dir: Path, baseline: dict | None) -> dict:
    from mcpft.evaluate import compare, local_generator
    from mcpft.train import update_run_record

    report = _score(heldout, local_generator(args.base_model, adapter=adapter_dir,
                                             max_new_tokens=args.max_new_tokens), "after")
    fields = {"after": report}
    if baseline:
        fields["comparison"] = compare(baseline, report)
    update_run_record(adapter_dir, **fields)
    return report


def cmd_merge(args):
    from mcpft.train import merge_adapter

    _quiet_libraries()
    with _user_errors():
        out = merge_adapter(args.adapter, args.out, dtype=args.dtype, base_model=args.base_model)
    emit(args, {"out": str(out), "dtype": args.dtype, "adapter": str(args.adapter)},
         f"merged {args.adapter} into {out} ({args.dtype})")


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
    import os

    from mcpft.dataset import load_rows
    from mcpft.evaluate import EndpointGenerator, local_generator, report_markdown

    _quiet_libraries()
    with _user_errors():
        rows = load_rows(args.data)
        if args.base_url:
            if not args.model:
                raise CliError("--base-url needs --model: the model name the endpoint serves")
            if args.adapter:
                raise CliError("--adapter applies to in-process evaluation; an endpoint serves its own adapters")
            generator = EndpointGenerator(args.base_url, args.model, api_key=os.environ.get(args.api_key_env),
                                          max_new_tokens=args.max_new_tokens)
        else:
            generator = local_generator(args.model, adapter=args.adapter, max_new_tokens=args.max_new_tokens)
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
