"""Demo-world verbs: `demo serve` (the site), `demo collect` (teacher traces), `demo eval` (task success),
`demo payoff` (collect, train, compare base and fine-tuned on held-out tasks)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from mcpft.cli.common import CliError, emit, open_store, progress


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (0 tasks or steps would make an empty, misleading report)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(verbs, parent):
    demo = verbs.add_parser("demo", help="the demo world: a local website, tasks with checkers, a scripted teacher")
    sub = demo.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("serve", parents=[parent], help="serve the demo website until interrupted")
    p.add_argument("--port", type=int, default=0)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("collect", parents=[parent], help="store teacher traces for N tasks (auto-approved; the train "
                                                         "split in the mix of space.yaml's demo recipe)")
    p.add_argument("--n", type=positive_int, required=True)
    p.add_argument("--split", choices=("train", "heldout"), default="train")
    p.set_defaults(handler=cmd_collect)

    p = sub.add_parser("eval", parents=[parent], help="run a model on the tasks and report task success")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint (default: serve --model here)")
    p.add_argument("--model", help="model name at the endpoint; without --base-url a folder, Hub id, "
                                   "'scripted-teacher', or empty for space.yaml's base_model (offline: SmolLM2)")
    p.add_argument("--adapter", help="without --base-url: evaluate this LoRA adapter on the base --model")
    p.add_argument("--api-key")
    p.add_argument("--split", choices=("train", "heldout"), default="heldout")
    p.add_argument("--limit", type=positive_int, help="only the first K tasks of the split")
    p.add_argument("--max-steps", type=positive_int, default=12)
    p.add_argument("--transcripts", type=Path, help="append each run's messages to this JSONL file")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("payoff", parents=[parent], help="from an empty store: collect teacher traces, train, and "
                                                        "compare base and fine-tuned on held-out tasks")
    p.add_argument("--train-traces", type=positive_int, help="teacher traces to train on (default: space.yaml demo)")
    p.add_argument("--heldout-tasks", type=positive_int,
                   help="held-out tasks, templates in turn (44: the whole split, 13: one each)")
    p.add_argument("--epochs", type=float, help="training epochs (default: space.yaml demo)")
    p.add_argument("--base-model", help="folder or Hub id (default: space.yaml's base_model; offline: SmolLM2)")
    p.add_argument("--out", type=Path, help="new or empty work dir for the store, adapter and transcripts "
                                            "(default: a new folder under the data dir)")
    p.set_defaults(handler=cmd_payoff)


def cmd_serve(args):
    from mcpft.demo.site import serve_site

    with serve_site(port=args.port) as site:
        emit(args, {"base_url": site.base_url}, f"demo site at {site.base_url} (Ctrl-C stops it)")
        sys.stdout.flush()
        try:
            asyncio.run(asyncio.Event().wait())
        except KeyboardInterrupt:
            pass


def _outcome_line(outcome) -> str:
    mark = "ok  " if outcome.success else "ERR " if outcome.endpoint_error else "FAIL"
    return f"{mark} {outcome.task_id:40} steps={outcome.steps} calls={outcome.tool_calls} {outcome.reason[:60]}"


def cmd_collect(args):
    from mcpft.agent.browser import BrowserSetupError
    from mcpft.config import load_settings
    from mcpft.demo.payoff import PayoffError, PayoffRecipe
    from mcpft.demo.world import collect

    try:  # the train split in the demo recipe's mix of templates, as `demo payoff` collects it
        shares = PayoffRecipe.from_settings(load_settings()).template_shares if args.split == "train" else None
    except PayoffError as e:
        raise CliError(str(e)) from None
    store = open_store(args)
    bar = progress(total=args.n, desc=f"collect {args.split}", unit="task")
    try:
        report = asyncio.run(collect(store, args.n, args.split, on_task=lambda o: bar.update(), shares=shares))
    except BrowserSetupError as e:
        raise CliError(str(e)) from None
    finally:
        bar.close()
    totals = report.totals()
    summary = {"traces": [t.trace_id for t in report.tasks], "split": args.split, **totals}
    emit(args, summary, "\n".join([*(_outcome_line(t) for t in report.tasks if not t.success),
                                   f"collected {totals['tasks']} traces ({totals['successes']} solved) "
                                   f"tagged demo, {args.split}"]))
    return 0 if totals["successes"] == totals["tasks"] else 1


@asynccontextmanager
async def _eval_endpoint(args):
    """The endpoint to evaluate: the given URL, the scripted teacher, or a model served here."""
    from mcpft.agent.endpoint import Endpoint
    from mcpft.demo.world import TEACHER, teacher_endpoint

    if args.adapter and (args.base_url or args.model == TEACHER):
        other = "--base-url" if args.base_url else f"--model {TEACHER}"
        raise CliError(f"--adapter cannot be used with {other}: an adapter is served here on a base --model "
                       "(a folder, Hub id, or empty for SmolLM2)")
    if args.base_url:
        if not args.model:
            raise CliError("--model is required with --base-url")
        yield Endpoint(args.base_url, args.model, api_key=args.api_key)
    elif args.model == TEACHER:
        async with teacher_endpoint() as endpoint:
            yield endpoint
    else:
        from mcpft.config import data_dir, default_base_model, load_settings
        from mcpft.models import ModelError
        from mcpft.serve import create_app, load_backends, serve_in_thread

        try:
            backends = load_backends(args.model or default_base_model(load_settings()), args.adapter, data_dir())
        except ModelError as e:
            raise CliError(str(e)) from None
        base_url, stop = serve_in_thread(create_app(backends))
        try:
            yield Endpoint(base_url, list(backends)[-1])  # the adapter's name when there is one
        finally:
            stop()


def cmd_eval(args):
    from mcpft.agent.browser import BrowserSetupError
    from mcpft.agent.endpoint import EndpointError
    from mcpft.demo.tasks import load_tasks
    from mcpft.demo.world import evaluate_tasks

    total = min(args.limit or 10**9, len(load_tasks(args.split)))
    bar = progress(total=total, desc=f"eval {args.split}", unit="task")

    async def run():
        async with _eval_endpoint(args) as endpoint:
            return await evaluate_tasks(endpoint, args.split, args.limit, max_steps=args.max_steps,
                                        on_task=lambda o: bar.update(), transcripts=args.transcripts)

    try:
        report = asyncio.run(run())
    except EndpointError as e:
        raise CliError(f"the endpoint cannot be evaluated: {e}") from None
    except BrowserSetupError as e:
        raise CliError(str(e)) from None
    finally:
        bar.close()
    totals = report.totals()
    rate = "n/a" if totals["success_rate"] is None else f"{totals['success_rate']:.0%}"
    lines = [*(_outcome_line(t) for t in report.tasks),
             f"{report.model}: success {totals['successes']}/{totals['scored_tasks']} ({rate}), "
             f"tool errors {totals['tool_errors']}, unneeded calls {totals['unneeded_calls']}"]
    if totals["endpoint_errors"]:
        lines.append(f"{totals['endpoint_errors']} of {totals['tasks']} tasks got no reply from the endpoint (ERR): "
                     "they are left out of the success rate")
    emit(args, report.to_dict(), "\n".join(lines))
    return 1 if totals["endpoint_errors"] else 0


def cmd_payoff(args):
    import time

    from mcpft.agent.browser import BrowserSetupError
    from mcpft.config import data_dir, default_base_model, load_settings
    from mcpft.demo.payoff import PayoffError, PayoffRecipe, payoff_table, run_payoff
    from mcpft.models import ModelError
    from mcpft.train import TrainError

    settings = load_settings()
    bars = {}

    def on_progress(stage, done, total):
        bar = bars.get(stage) or bars.setdefault(stage, progress(total=total, desc=stage, unit="step"))
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        recipe = PayoffRecipe.from_settings(settings, train_traces=args.train_traces,
                                            heldout_tasks=args.heldout_tasks, epochs=args.epochs)
        out = args.out or data_dir() / "payoff" / time.strftime("%Y%m%d-%H%M%S")
        report = run_payoff(recipe, out, args.base_model or default_base_model(settings), on_progress)
    except (PayoffError, TrainError, ModelError, BrowserSetupError) as e:
        raise CliError(str(e)) from None
    finally:
        for bar in bars.values():
            bar.close()
    emit(args, report.to_dict(), payoff_table(report))

