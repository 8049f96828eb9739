"""Training on the tiny random Qwen3 (CPU, TRL + PEFT): loss, mask, adapter round trip, merge, stop, errors, CLI."""

from __future__ import annotations

import argparse
import json
import shutil
import threading

import pytest
import torch

from mcpft.cli import main as cli_main
from mcpft.cli import train as cli_train
from mcpft.cli.common import common_options
from mcpft.dataset import export_rows, rows_from_traces
from mcpft.evaluate import evaluate_rows, local_generator
from mcpft.render import render
from mcpft.trace import normalize_trace
from mcpft.selection import SelectionError, select_rows
from mcpft.train import (
    CPU_CHECKPOINT_ABOVE, CPU_MAX_LENGTH, RUN_RECORD, TrainConfig, TrainError, average_adapters, choose_path,
    load_adapter_model, merge_adapter, prepare_training, resolve_precision, train, training_plan,
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# Enough steps at this rate for the tiny model to reproduce the row greedily (measured: 40 steps reach it).
MEMORISE = dict(max_steps=40, learning_rate=1e-2, gradient_accumulation_steps=1)
# Every weight at this learning rate learns the two rows less steadily than LoRA: 40 steps left one wrong in bf16
# (a CPU with native BF16) and not in fp32; 80 learn both in either precision, whatever the seed.
MEMORISE_FULL = dict(MEMORISE, max_steps=80)


def weather_trace(city: str = "Paris", answer: str = "It is sunny.", second_turn: bool = False) -> dict:
    """A raw trace: a user asks, the assistant calls the tool, reads the result and answers (optionally twice)."""
    messages = [
        {"role": "system", "content": "You are a weather assistant."},
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "assistant", "content": answer},
    ]
    if second_turn:
        messages += [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
    return {"model": "teacher", "messages": messages, "tools": [WEATHER_TOOL]}


def weather_rows(**kwargs) -> list[dict]:
    return rows_from_traces([normalize_trace(weather_trace(**kwargs))])


def adapter_logits(model, tokenizer, row) -> torch.Tensor:
    ids = torch.tensor([render(tokenizer, row).input_ids])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One memorising run, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("trained") / "adapter"
    rows = weather_rows()
    seen = []
    result = train(TrainConfig(**MEMORISE), rows, out, base_model=str(tiny_model_dir), on_progress=seen.append)
    return result, rows, seen


def test_loss_falls_and_the_run_is_recorded(trained):
    result, rows, seen = trained
    record = json.loads((result.out_dir / RUN_RECORD).read_text())
    losses = [entry["loss"] for entry in record["losses"]]
    assert len(losses) == result.steps == 40
    assert losses[-1] < losses[0] - 1.0
    assert record["status"] == "finished" and record["path"] == "trl+peft"
    assert record["config"]["learning_rate"] == 1e-2 and record["config"]["optim"] == "adamw_torch"
    assert record["config"]["max_length"] == CPU_MAX_LENGTH  # the CPU default, below the tiny model's 131072 context
    assert record["config"]["gradient_checkpointing"] is False  # short rows on CPU: nothing to recompute
    assert record["data"]["rows_used"] == len(rows) and record["data"]["rows_left_out"] == []
    assert list(result.out_dir.glob("runs/*/events.out.tfevents.*")), "TensorBoard logs are written under runs/"
    assert [p.step for p in seen] == list(range(1, 41)) and all(p.total == 40 for p in seen)
    assert seen[-1].eta_s == 0 and seen[-1].tokens_per_s > 0


def test_adapter_reloads_with_its_training(trained, tiny_model_dir):
    """The saved adapter, loaded again, answers every step of its training row exactly; the base does not."""
    result, rows, _ = trained
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    report = evaluate_rows(rows, local_generator(str(tiny_model_dir), adapter=result.adapter_dir, max_new_tokens=40))
    assert report["totals"]["pass_rate"] == 1.0
    assert [s["output"]["text"] for s in report["steps"]] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "It is sunny."]
    base = evaluate_rows(rows, local_generator(str(tiny_model_dir), max_new_tokens=10))
    assert base["totals"]["pass_rate"] == 0.0


def test_full_finetune_trains_a_whole_model_used_as_the_model(tiny_model_dir, tmp_path, capsys):
    """Every weight trains (no PEFT): the output is a model folder, scored after training as the model itself;
    given as an adapter it is named for what it is."""
    data = export_rows(weather_rows(), tmp_path / "rows.jsonl")
    out = tmp_path / "full"
    _run_verb(["train", "--out", str(out), "--base-model", str(tiny_model_dir), "--data", str(data), "--heldout",
               str(data), "--full-finetune", "--max-steps", str(MEMORISE_FULL["max_steps"]), "--lr",
               str(MEMORISE_FULL["learning_rate"]), "--grad-accum", "1", "--max-new-tokens", "40", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == "trl" and summary["baseline"]["pass_rate"] == 0.0 and summary["after"]["pass_rate"] == 1.0
    assert json.loads((out / RUN_RECORD).read_text())["config"]["full_finetune"] is True
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    with pytest.raises(TrainError, match="whole model"):
        merge_adapter(out, tmp_path / "merged")
    with pytest.raises(TrainError, match="full_finetune"):
        TrainConfig(full_finetune=True, backend="unsloth")


def test_lora_in_the_last_layers_only(tiny_model_dir, tmp_path):
    """lora_layers=N puts LoRA layers in the model's last N decoder layers only; the plan prices the shorter
    backward pass; N past the model's depth, or with full fine-tuning, is refused before anything loads."""
    from safetensors import safe_open

    rows = weather_rows()
    result = train(TrainConfig(lora_layers=1, **MEMORISE), rows, tmp_path / "top", base_model=str(tiny_model_dir))
    with safe_open(result.adapter_dir / "adapter_model.safetensors", "pt") as weights:
        layers = {key.split("layers.")[1].split(".")[0] for key in weights.keys()}
    assert layers == {"1"}  # the tiny model has layers 0 and 1
    losses = [entry["loss"] for entry in json.loads((result.out_dir / RUN_RECORD).read_text())["losses"]]
    assert losses[-1] < losses[0] - 1.0
    long_rows = weather_rows(answer="Rain all day, " * 300)  # ~1k tokens: an estimate of seconds, not 0
    plans = [training_plan(TrainConfig(lora_layers=n, epochs=4), long_rows, base_model=str(tiny_model_dir),
                           data_dir=tmp_path)["speed"]["seconds"] for n in (None, 1)]
    assert 0 < plans[1] < plans[0]
    with pytest.raises(TrainError, match="lora_layers 3: .* has only 2 decoder layers"):
        train(TrainConfig(lora_layers=3), rows, tmp_path / "deep", base_model=str(tiny_model_dir))
    assert not (tmp_path / "deep").exists()
    with pytest.raises(TrainError, match="lora_layers"):
        TrainConfig(full_finetune=True, lora_layers=1)
    with pytest.raises(TrainError, match="lora_layers must be at least 1"):
        TrainConfig(lora_layers=0)


def test_merged_model_matches_the_adapter(trained, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcpft.chat_template import renders_tools

    result, rows, _ = trained
    model, tokenizer = load_adapter_model(result.adapter_dir)
    expected = adapter_logits(model, tokenizer, rows[0])

    merged_dir = merge_adapter(result.adapter_dir, tmp_path / "merged32", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert renders_tools(merged_tokenizer), "the merged model keeps a chat template that renders tools"
    assert torch.allclose(adapter_logits(merged, merged_tokenizer, rows[0]), expected, atol=1e-4)

    bf16_dir = merge_adapter(result.adapter_dir, tmp_path / "merged16")
    with safe_open(bf16_dir / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert json.loads((bf16_dir / RUN_RECORD).read_text())["merged"]["dtype"] == "bf16"


def test_averaged_adapter_changes_the_weights_by_the_mean_of_the_adapters(trained, tiny_model_dir, tmp_path,
                                                                          capsys):
    """`mcpft average`: one adapter whose merged weights are the mean of each adapter's merged weights."""
    from safetensors.torch import load_file

    result, rows, _ = trained
    other = train(TrainConfig(**dict(MEMORISE, max_steps=10), seed=7, lora_r=8, lora_alpha=32), weather_rows(),
                  tmp_path / "seed-7", base_model=str(tiny_model_dir)).adapter_dir
    assert cli_main(["average", str(result.adapter_dir), str(other), "--out", str(tmp_path / "mean"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "mean")
    config = json.loads((tmp_path / "mean" / "adapter_config.json").read_text())
    assert config["r"] == 16 + 8 and config["lora_alpha"] == 24  # the ranks stack: the mean is exact
    record = json.loads((tmp_path / "mean" / RUN_RECORD).read_text())
    assert record["config"]["learning_rate"] == MEMORISE["learning_rate"]  # what both members trained with
    assert "seed" not in record["config"] and "lora_r" not in record["config"]  # where they differ, nothing

    merged = [load_file(merge_adapter(folder, tmp_path / f"merged-{i}", dtype="fp32") / "model.safetensors")
              for i, folder in enumerate((result.adapter_dir, other, tmp_path / "mean"))]
    changed = [name for name in merged[0] if not torch.equal(merged[0][name], merged[1][name])]
    assert changed  # the two trainings differ, so the mean is a third set of weights
    for name in merged[0]:
        assert torch.allclose(merged[2][name], (merged[0][name] + merged[1][name]) / 2, atol=1e-6), name
    model, tokenizer = load_adapter_model(tmp_path / "mean")  # it loads as any adapter, on its recorded base
    assert adapter_logits(model, tokenizer, rows[0]).isfinite().all()


def test_averaging_refuses_what_it_cannot_average(trained, tmp_path):
    result, _, _ = trained
    with pytest.raises(TrainError, match="at least two adapters"):
        average_adapters([result.adapter_dir], tmp_path / "one")
    with pytest.raises(TrainError, match="no such folder"):
        average_adapters([result.adapter_dir, tmp_path / "missing"], tmp_path / "two")
    with pytest.raises(TrainError, match="not empty|already"):
        average_adapters([result.adapter_dir, result.adapter_dir], result.adapter_dir)
    other_base = tmp_path / "other-base"
    shutil.copytree(result.adapter_dir, other_base)
    record = json.loads((other_base / RUN_RECORD).read_text())
    (other_base / RUN_RECORD).write_text(json.dumps({**record, "base_model": "/elsewhere/model"}))
    with pytest.raises(TrainError, match="different base models"):
        average_adapters([result.adapter_dir, other_base], tmp_path / "three")
    assert not (tmp_path / "three").exists()  # nothing half-written


def test_trained_mask_is_render_mask(tiny_model_dir, tmp_path, store):
    """The labels TRL trains on are exactly render's train_mask, for every row (earlier turns untrained)."""
    from mcpft.ingest import import_file

    path = tmp_path / "trace.json"
    path.write_text(json.dumps(weather_trace(second_turn=True)))
    import_file(store, path)
    rows, _ = select_rows(None, store)
    assert len(rows) == 2  # one row per user turn
    prepared = prepare_training(TrainConfig(max_steps=1), rows, tmp_path / "out", base_model=str(tiny_model_dir))
    expected = {tuple(r.input_ids): r.train_mask for r in (render(prepared.tokenizer, row) for row in rows)}
    batches = list(prepared.trainer.get_train_dataloader())
    assert len(batches) == 2
    for batch in batches:
        assert batch["input_ids"].shape[0] == 1  # batch size 1: no padding
        ids = tuple(batch["input_ids"][0].tolist())
        trained_mask = (batch["labels"][0] != -100).int().tolist()
        assert trained_mask == expected[ids]
        assert 0 < sum(trained_mask) < len(trained_mask)


def test_no_shuffle_trains_the_rows_in_the_order_given(tiny_model_dir, tmp_path):
    rows = [row for city in ("Paris", "Oslo", "Rome", "Lima", "Kyiv", "Doha") for row in weather_rows(city=city)]
    orders = {}
    for shuffle in (False, True):
        prepared = prepare_training(TrainConfig(shuffle=shuffle, max_steps=1), rows, tmp_path / f"shuffle-{shuffle}",
                                    base_model=str(tiny_model_dir))
        orders[shuffle] = [batch["input_ids"][0].tolist() for batch in prepared.trainer.get_train_dataloader()]
    given = [render(prepared.tokenizer, row).input_ids for row in rows]
    assert orders[False] == given
    assert orders[True] != given and sorted(orders[True]) == sorted(given)


def test_loss_at_trained_positions_equals_the_full_logits_loss(tiny_model_dir, tmp_path):
    """Logits at the trained positions only give the model's own loss and the same gradients, mean or summed."""
    from mcpft.train import trained_positions_loss

    rows = weather_rows(second_turn=True)
    prepared = prepare_training(TrainConfig(max_steps=1), rows, tmp_path / "out", base_model=str(tiny_model_dir))
    model = prepared.trainer.model
    batch = next(iter(prepared.trainer.get_train_dataloader()))
    trained = int((batch["labels"][0, 1:] != -100).sum())
    for items in (None, torch.tensor(trained * 3)):
        model.zero_grad()
        outputs, loss = trained_positions_loss(model, batch, items)
        loss.backward()
        ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert outputs.logits.shape[1] == trained  # nothing computed where nothing is trained
        model.zero_grad()
        extra = {} if items is None else {"num_items_in_batch": items}
        reference = model(**batch, **extra).loss
        reference.backward()
        assert torch.allclose(loss, reference, atol=1e-5)
        assert all(torch.allclose(ours[n], p.grad, atol=1e-6) for n, p in model.named_parameters() if p.requires_grad)


def test_stop_keeps_the_last_finished_step(tiny_model_dir, tmp_path):
    """Stopping after step 2 of 6 saves the same adapter as a 2-step run (constant LR: same updates)."""
    from safetensors.torch import load_file

    rows = weather_rows()
    config = dict(learning_rate=1e-2, gradient_accumulation_steps=1, lr_scheduler_type="constant")
    stop = threading.Event()

    def stop_at_two(progress):
        if progress.step == 2:
            stop.set()

    stopped = train(TrainConfig(max_steps=6, **config), rows, tmp_path / "stopped", base_model=str(tiny_model_dir),
                    on_progress=stop_at_two, stop_event=stop)
    assert stopped.stopped and stopped.steps == 2 and stopped.total_steps == 6
    assert json.loads((tmp_path / "stopped" / RUN_RECORD).read_text())["status"] == "stopped"
    two = train(TrainConfig(max_steps=2, **config), rows, tmp_path / "two", base_model=str(tiny_model_dir))
    a = load_file(stopped.adapter_dir / "adapter_model.safetensors")
    b = load_file(two.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_path_without_cuda_is_trl_peft(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, why = choose_path()
    assert path == "trl+peft" and "no CUDA" in why
    with pytest.raises(TrainError, match="needs a CUDA device"):
        choose_path("unsloth")


def test_empty_and_flagged_selections_are_refused(store, tmp_path, tiny_model_dir):
    with pytest.raises(SelectionError, match="0 trace"):
        select_rows(None, store)
    broken = weather_trace()
    del broken["messages"][2]["tool_calls"]  # a tool result answering no call: the validator flags it
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    from mcpft.ingest import import_file

    import_file(store, path)
    with pytest.raises(SelectionError, match="1 flagged.*left out unless you ask to include them"):
        select_rows(None, store)
    assert select_rows(None, store, include_flagged=True)[0]
    with pytest.raises(TrainError, match="no training rows"):
        train(TrainConfig(), [], tmp_path / "out", base_model=str(tiny_model_dir))


def test_rows_over_max_length_are_left_out_never_cut(tiny_model_dir, tmp_path):
    rows = weather_rows() + weather_rows(city="Lyon", answer="Rain all day, " * 60)
    rows[1]["id"] = "long"
    prepared = prepare_training(TrainConfig(max_steps=1, max_length=400), rows, tmp_path / "out",
                                base_model=str(tiny_model_dir))
    assert [item["id"] for item in prepared.rows.left_out] == ["long"]
    assert "max_length 400" in prepared.rows.left_out[0]["reason"] and prepared.rows.left_out[0]["n_tokens"] > 400
    assert len(prepared.rows.train) == 1
    with pytest.raises(TrainError, match="all 1 row.*longer than max_length 100"):
        prepare_training(TrainConfig(max_length=100), rows[1:], tmp_path / "out2", base_model=str(tiny_model_dir))


def test_the_plan_counts_what_would_train_before_anything_loads(tiny_model_dir, tmp_path):
    rows = weather_rows() + weather_rows(city="Lyon", answer="Rain all day, " * 60)
    rows[1]["id"] = "long"
    plan = training_plan(TrainConfig(max_length=400, epochs=3, gradient_accumulation_steps=1), rows,
                         base_model=str(tiny_model_dir), data_dir=tmp_path)
    assert (plan["rows"], plan["rows_used"], plan["steps"]) == (2, 1, 3)
    assert [item["id"] for item in plan["rows_left_out"]] == ["long"]
    assert 0 < plan["trained_tokens"] < plan["tokens"] <= 400
    assert plan["speed"]["seconds"] >= 0  # this machine has no CUDA: a CPU estimate
    assert not (tmp_path / "out").exists()  # nothing written: only a plan


def test_no_reasoning_trains_the_calls_and_answers_without_the_thinking(tiny_model_dir, tmp_path):
    raw = weather_trace()
    raw["messages"][2]["reasoning_content"] = "The user wants the weather, so I call the tool for the city. " * 3
    raw["messages"][4]["reasoning_content"] = "The tool says it is sunny."
    rows = rows_from_traces([normalize_trace(raw)])
    bare = rows_from_traces([normalize_trace(weather_trace())])
    thinking, plain = (training_plan(TrainConfig(reasoning=keep), rows, base_model=str(tiny_model_dir),
                                     data_dir=tmp_path) for keep in (True, False))
    reference = training_plan(TrainConfig(), bare, base_model=str(tiny_model_dir), data_dir=tmp_path)
    assert thinking["trained_tokens"] > plain["trained_tokens"]
    assert (plain["tokens"], plain["trained_tokens"]) == (reference["tokens"], reference["trained_tokens"])


def test_the_estimate_uses_this_machines_measured_speed_once_a_run_measured_it(tiny_model_dir, tmp_path):
    """Before any run here the plan prices a run from the reference rates; a finished run records its own rate for
    this machine, model and precision, and the next plan uses it (carried to the new rows' length and shape)."""
    from mcpft.models import model_name
    from mcpft.train_speed import SPEED_FILE, machine, record_speed, reference_rate

    rows = weather_rows(answer="Rain all day, " * 300)
    plan = training_plan(TrainConfig(epochs=4), rows, base_model=str(tiny_model_dir), data_dir=tmp_path)
    assert plan["speed"]["source"] == "reference" and plan["speed"]["seconds"] > 0
    (tmp_path / SPEED_FILE).write_text("{not json")  # a damaged file costs only the local figure
    assert training_plan(TrainConfig(), rows, base_model=str(tiny_model_dir),
                         data_dir=tmp_path)["speed"]["source"] == "reference"

    train(TrainConfig(max_steps=3, gradient_accumulation_steps=1), rows, tmp_path / "run",
          base_model=str(tiny_model_dir), data_dir=tmp_path)
    speeds = json.loads((tmp_path / SPEED_FILE).read_text())
    precision = resolve_precision(TrainConfig(), on_cuda=False)  # bf16 on a CPU with native BF16, else fp32
    measured = speeds[machine()][f"{model_name(str(tiny_model_dir))} · {precision}"]
    assert measured["run"] == str(tmp_path / "run") and measured["tokens_per_s"] > 0
    assert measured["mean_row"] == plan["tokens"]

    after = training_plan(TrainConfig(epochs=4), rows, base_model=str(tiny_model_dir), data_dir=tmp_path)
    assert after["speed"]["source"] == "this machine"
    assert after["speed"]["tokens_per_s"] == pytest.approx(measured["tokens_per_s"], rel=0.01)
    assert after["speed"]["seconds"] == round(4 * plan["tokens"] / measured["tokens_per_s"])
    shorter = training_plan(TrainConfig(epochs=4), weather_rows(), base_model=str(tiny_model_dir), data_dir=tmp_path)
    mean_row = shorter["tokens"] / shorter["rows_used"]  # shorter rows train faster per token, as the reference says
    assert shorter["speed"]["tokens_per_s"] == pytest.approx(
        measured["tokens_per_s"] * reference_rate(precision, mean_row) / reference_rate(precision, plan["tokens"]),
        rel=0.01)
    top = training_plan(TrainConfig(epochs=4, lora_layers=1), rows, base_model=str(tiny_model_dir), data_dir=tmp_path)
    assert top["speed"]["tokens_per_s"] > after["speed"]["tokens_per_s"]  # a shorter backward pass
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    record_speed(not_a_folder, "m", precision, 100.0, 1000, 1.0, "run")  # cannot be written: the run is not failed


def test_long_rows_on_cpu_recompute_activations_by_default(tiny_model_dir, tmp_path):
    """On CPU only the rows over CPU_CHECKPOINT_ABOVE tokens recompute; an explicit choice holds for every row."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    rows = weather_rows() + weather_rows(city="Rome", answer="Sunny and warm, " * 650)
    prepared = prepare_training(TrainConfig(max_steps=1), rows, tmp_path / "long", base_model=str(tiny_model_dir))
    assert prepared.rows.summary()["longest"] > CPU_CHECKPOINT_ABOVE
    config = prepared.record["config"]
    assert config["gradient_checkpointing"] is True and config["recompute_rows_over"] == CPU_CHECKPOINT_ABOVE
    trainer = prepared.trainer
    layers = [m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers
    recomputed = {}
    for batch in trainer.get_train_dataloader():
        trainer.compute_loss(trainer.model, batch)
        recomputed[batch["input_ids"].shape[1] > CPU_CHECKPOINT_ABOVE] = {m.gradient_checkpointing for m in layers}
    assert recomputed == {True: {True}, False: {False}}
    for chosen in (True, False):
        explicit = prepare_training(TrainConfig(max_steps=1, gradient_checkpointing=chosen), rows,
                                    tmp_path / f"explicit-{chosen}", base_model=str(tiny_model_dir))
        assert explicit.record["config"]["gradient_checkpointing"] is chosen  # an explicit choice is kept
        assert explicit.record["config"]["recompute_rows_over"] is None


def test_missing_adapter_is_named(tmp_path):
    with pytest.raises(TrainError, match="no such folder"):
        load_adapter_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="not a PEFT adapter"):
        merge_adapter(tmp_path / "empty", tmp_path / "merged")


def test_rows_from_a_dataset_folder_as_the_hub_lays_it_out(tmp_path):
    """`datasets.load_dataset` on the layout `push_to_hub` writes (data/train-*.parquet); the Hub id itself is
    exercised against the fake Hub in test_push."""
    from mcpft.selection import hub_rows

    rows = weather_rows(second_turn=True)
    export_rows(rows, tmp_path / "repo" / "data" / "train-00000-of-00001.parquet", fmt="parquet")
    loaded = hub_rows(str(tmp_path / "repo"))
    assert [r["messages"] for r in loaded] == [r["messages"] for r in rows]


def _run_verb(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers(dest="verb", required=True), common_options())
    args = parser.parse_args(argv)
    args.handler(args)


def test_cli_train_scores_before_and_after(tiny_model_dir, tmp_path, capsys):
    rows = weather_rows()
    data = export_rows(rows, tmp_path / "rows.jsonl")
    out = tmp_path / "out"
    _run_verb(["train", "--out", str(out), "--base-model", str(tiny_model_dir), "--data", str(data),
               "--heldout", str(data), "--max-steps", "2", "--grad-accum", "1", "--max-new-tokens", "8", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["path"] == "trl+peft" and summary["rows_used"] == 1
    assert summary["adapter_dir"] == str(out) and summary["baseline"]["steps"] == summary["after"]["steps"] == 2
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["data"]["source"] == {"kind": "file", "path": str(data)}
    assert len(record["baseline"]["steps"]) == 2 and len(record["comparison"]["steps"]) == 2


def test_cli_train_reports_bad_data(tmp_path):
    from mcpft.cli.common import CliError

    with pytest.raises(CliError, match="no such file or folder, and not a Hub dataset id"):
        _run_verb(["train", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "missing.jsonl")])


def test_eval_split_holds_out_whole_traces(tiny_model_dir, tmp_path):
    rows = weather_rows() + weather_rows(city="Lyon") + weather_rows(city="Nice", second_turn=True)
    for i, row in enumerate(rows):
        row["trace_id"] = ["paris", "lyon", "nice", "nice"][i]
    result = train(TrainConfig(max_steps=1, eval_fraction=0.34), rows, tmp_path / "out", base_model=str(tiny_model_dir))
    record = json.loads((tmp_path / "out" / RUN_RECORD).read_text())
    assert record["data"]["eval_rows"] + record["data"]["rows_used"] == 4 and record["data"]["eval_rows"] in (1, 2)
    assert isinstance(result.eval_loss, float) and result.eval_loss > 0


def test_a_model_without_chatml_tokens_is_refused(tiny_model_dir, tmp_path):
    """No template that renders tools and no <|im_end|> token: ours cannot be given to it either."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "plain"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "weather": 1, "paris": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(folder)
    with pytest.raises(TrainError, match="cannot render tool calls.*no <\\|im_end\\|> token"):
        prepare_training(TrainConfig(max_steps=1), weather_rows(), tmp_path / "out", base_model=str(folder))


# -- outputs, bad input, held-out sets, settings, memory -------------------------------------------------------------


def test_a_used_output_folder_is_refused_before_anything_loads(tmp_path, tiny_model_dir):
    from mcpft.cli.common import CliError
    from mcpft.train import check_out_dir

    (tmp_path / "file").write_text("x")
    old_run = tmp_path / "old-run"
    old_run.mkdir()
    (old_run / RUN_RECORD).write_text("{}")
    (old_run / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(TrainError, match="is a file: choose a new folder"):
        check_out_dir(tmp_path / "file")
    with pytest.raises(TrainError, match=r"already holds a previous run \(adapter_model.safetensors, mcpft_run.json\)"
                                         ": choose a new folder or remove it"):
        train(TrainConfig(max_steps=1), weather_rows(), old_run, base_model=str(tiny_model_dir))
    assert sorted(p.name for p in old_run.iterdir()) == ["adapter_model.safetensors", RUN_RECORD]  # untouched
    # The CLI checks it first: a base model that does not exist is never reached.
    with pytest.raises(CliError, match="is a file"):
        _run_verb(["train", "--out", str(tmp_path / "file"), "--base-model", str(tmp_path / "no-model")])
    assert check_out_dir(tmp_path / "new") == tmp_path / "new" and not (tmp_path / "new").exists()


def test_broken_files_and_rows_are_named(tmp_path, tiny_model_dir):
    from mcpft.cli.common import CliError

    good = export_rows(weather_rows(), tmp_path / "good.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(good.read_text() + "\n{\"id\": \"x\", \"messages\": [\n")
    not_rows = tmp_path / "not-rows.jsonl"
    not_rows.write_text(json.dumps({"id": "r1", "messages": "x"}) + "\n")
    base = ["train", "--out", str(tmp_path / "out"), "--base-model", str(tiny_model_dir)]
    with pytest.raises(CliError, match=r"broken.jsonl: line 3 is not valid JSON \(Expecting value at column 26\)"):
        _run_verb([*base, "--data", str(broken)])
    with pytest.raises(CliError, match="broken.jsonl: line 3 is not valid JSON"):
        _run_verb([*base, "--data", str(good), "--heldout", str(broken)])
    with pytest.raises(CliError, match=r"not-rows.jsonl: row 1 \(id 'r1'\): 'messages' must be a non-empty list of "
                                       r"message objects, got str 'x'"):
        _run_verb([*base, "--data", str(not_rows)])
    corrupt = export_rows(weather_rows(), tmp_path / "rows.parquet")
    corrupt.write_bytes(corrupt.read_bytes()[:-40])  # a copy cut short: Parquet's footer is lost
    with pytest.raises(CliError, match=r"rows.parquet: not a readable Parquet export \(.*footer"):
        _run_verb([*base, "--data", str(corrupt)])
    no_messages = tmp_path / "no-messages.parquet"
    import datasets

    datasets.Dataset.from_dict({"id": ["r1"], "text": ["hello"]}).to_parquet(str(no_messages))
    with pytest.raises(CliError, match=r"no-messages.parquet: row 1 \(id 'r1'\): 'messages'"):
        _run_verb([*base, "--data", str(no_messages)])
    not_a_dataset = tmp_path / "empty-folder"
    not_a_dataset.mkdir()
    with pytest.raises(CliError, match=r"empty-folder: .*neither a `Dataset` directory"):
        _run_verb([*base, "--data", str(not_a_dataset)])
    with pytest.raises(CliError, match=r"store:label=x.*store:tag=A,tag=B \(got 'label=x'\)"):
        _run_verb([*base, "--data", "store:label=x", "--db", str(tmp_path / "db.sqlite")])
    assert not (tmp_path / "out").exists()


def test_the_baseline_runs_after_the_data_checks_and_before_the_model_loads(tiny_model_dir, tmp_path):
    calls = []
    too_long = weather_rows(answer="Rain all day, " * 60)
    with pytest.raises(TrainError, match="all 1 row.*longer than max_length 100"):
        train(TrainConfig(max_length=100), too_long, tmp_path / "failed", base_model=str(tiny_model_dir),
              baseline=lambda: calls.append("baseline"))
    assert calls == []  # no baseline wasted on a run that fails on its data

    out = tmp_path / "out"

    def baseline():
        calls.append(sorted(p.name for p in out.iterdir()) if out.exists() else "nothing written")
        return {"totals": {"steps": 0}}

    result = train(TrainConfig(max_steps=1), weather_rows(), out, base_model=str(tiny_model_dir), baseline=baseline)
    assert calls == ["nothing written"] and result.baseline == {"totals": {"steps": 0}}
    assert json.loads((out / RUN_RECORD).read_text())["baseline"] == {"totals": {"steps": 0}}


def test_cli_trains_on_the_store_minus_its_heldout_traces_with_the_settings(store, tmp_path, tiny_model_dir,
                                                                             monkeypatch, capsys):
    """No --heldout: the store's traces tagged heldout are the held-out set (never trained on); the base model and
    TrainConfig defaults come from space.yaml (here its environment overrides), flags override those."""
    from mcpft.ingest import import_file

    for city, tags in (("Paris", ("weather",)), ("Lyon", ("weather", "heldout")), ("Nice", ("other",))):
        path = tmp_path / f"{city}.json"
        path.write_text(json.dumps(weather_trace(city=city)))
        import_file(store, path, tags=tags)
    monkeypatch.setenv("MCPFT_BASE_MODEL", json.dumps({"cpu": str(tiny_model_dir), "gpu": str(tiny_model_dir)}))
    monkeypatch.setenv("MCPFT_TRAINING", json.dumps({"lora_r": 4, "num_train_epochs": 2, "lora_alpha": 8}))
    out = tmp_path / "run"
    _run_verb(["train", "--out", str(out), "--db", str(tmp_path / "mcpft.db"), "--data", "store:tag=weather",
               "--max-steps", "1", "--lora-r", "2", "--grad-accum", "1", "--target-modules", "q_proj,v_proj",
               "--lora-dropout", "0.1", "--lr-scheduler-type", "constant", "--warmup-steps", "0", "--weight-decay",
               "0.01", "--optim", "adamw_torch", "--batch-size", "1", "--no-gradient-checkpointing",
               "--max-new-tokens", "4", "--json"])
    summary = json.loads(capsys.readouterr().out)
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["base_model"] == str(tiny_model_dir)
    config = record["config"]
    assert (config["lora_r"], config["lora_alpha"], config["epochs"]) == (2, 8, 2)  # flag, settings, settings
    assert (config["target_modules"], config["lora_dropout"], config["lr_scheduler_type"]) == (
        ["q_proj", "v_proj"], 0.1, "constant")
    assert (config["weight_decay"], config["optim"], config["gradient_checkpointing"]) == (0.01, "adamw_torch", False)
    assert set(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == {"q_proj", "v_proj"}
    assert record["data"]["source"]["traces"] == 1 and record["data"]["source"]["heldout_traces_left_out"] == 1
    assert record["data"]["rows_used"] == 1  # Paris only: Lyon is held out, Nice lacks the tag
    heldout = {"kind": "store", "tag": "heldout", "traces": 1, "rows": 1, "steps": 2}
    assert record["heldout"] == summary["heldout"] == heldout
    assert summary["baseline"]["steps"] == summary["after"]["steps"] == 2
    assert [s["prompt"] for s in record["baseline"]["steps"]] == ["Weather in Lyon?"] * 2


def _raise(error: BaseException):
    raise error


@pytest.mark.parametrize("make_error, what", [
    (lambda: torch.empty(2**62, dtype=torch.uint8), "the RAM"),  # PyTorch's CPU allocator
    (lambda: bytearray(2**62), "the RAM"),  # Python's MemoryError
    (lambda: _raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")), "the GPU's memory"),
])
def test_running_out_of_memory_while_training_says_what_to_lower(make_error, what, tiny_model_dir, tmp_path):
    """The error comes from inside trainer.train() (from the progress callback, which it calls every step)."""
    from mcpft.models import OutOfMemory

    out = tmp_path / "out"
    with pytest.raises(OutOfMemory) as raised:
        train(TrainConfig(max_steps=2, gradient_accumulation_steps=1), weather_rows(), out,
              base_model=str(tiny_model_dir), on_progress=lambda p: make_error())
    message = str(raised.value)
    assert message.startswith(f"{what} ran out while training. To fit: lower max_length (now {CPU_MAX_LENGTH}; the longest "
                              "kept row has ")
    assert ("keep batch_size at 1 (now 1) and raise gradient_accumulation_steps (now 1) instead; turn "
            "gradient_checkpointing on; set load_in_4bit (Unsloth path, CUDA) for 4-bit base weights.") in message
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["status"] == "failed" and "ran out while training" in record["error"]
