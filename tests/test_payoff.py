"""`mcpft demo payoff` end to end at a tiny scale: the real teacher collects in the real browser into a new store,
a tiny model trains on its traces, and base and fine-tuned run a held-out task in the real browser.
The full scale (SmolLM2, all 44 held-out tasks) is bench/uplift_demo.py."""

import json

import pytest

from mcpft.cli import main
from mcpft.config import load_settings
from mcpft.demo.payoff import PayoffError, PayoffRecipe
from mcpft.store import Store


def test_payoff_from_an_empty_store_to_a_before_after(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "payoff"
    argv = ["demo", "payoff", "--train-traces", "2", "--heldout-tasks", "1", "--epochs", "1",
            "--base-model", str(tiny_model_dir), "--out", str(out), "--json"]
    assert main(argv) in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert report["train_traces"] == 2 and report["heldout_tasks"] == 1
    assert report["base_success"] in (0.0, 1.0) and report["tuned_success"] in (0.0, 1.0)
    assert set(report["seconds"]) == {"collect", "train", "base", "tuned", "total"}
    assert report["seconds"]["total"] >= sum(report["seconds"][s] for s in ("collect", "train", "base", "tuned")) - 1
    assert report["train"]["rows"] >= 2 and report["train"]["steps"] >= 1
    assert report["train"]["precision"] in ("bf16", "fp32")  # by the CPU: figures from different hosts differ
    (task,) = report["tasks"]
    assert task["prompt"] and task["expected"] and {"success", "answer", "reason"} <= set(task["base"])
    assert set(task["tuned"]) == set(task["base"])
    with Store(out / "demo.db") as store:
        assert len(store.traces(tags=["demo", "train"])) == 2
    assert (out / "adapter" / "adapter_config.json").is_file()
    run = json.loads((out / "adapter" / "mcpft_run.json").read_text())
    assert run["config"]["reasoning"] is PayoffRecipe.from_settings(load_settings()).train_reasoning
    assert (out / "transcripts-base.jsonl").is_file() and (out / "transcripts-tuned.jsonl").is_file()

    assert main(argv) == 2  # the work dir now holds a run: a payoff starts from an empty store
    assert f"work dir {out} is not empty" in capsys.readouterr().err


def test_the_recipe_comes_from_space_yaml_and_is_checked():
    recipe = PayoffRecipe.from_settings({"demo": {"train_traces": 7, "epochs": 3}}, heldout_tasks=2, epochs=None)
    assert (recipe.train_traces, recipe.epochs, recipe.heldout_tasks) == (7, 3, 2)
    with pytest.raises(PayoffError, match="unknown demo setting"):
        PayoffRecipe.from_settings({"demo": {"train_trace": 7}})
    with pytest.raises(PayoffError, match="train_traces must be a whole number of at least 1, got 0"):
        PayoffRecipe.from_settings({}, train_traces=0)
    with pytest.raises(PayoffError, match="lora_layers must be a whole number of at least 1 .*, got 0"):
        PayoffRecipe.from_settings({"demo": {"lora_layers": 0}})
    assert PayoffRecipe.from_settings({"demo": {"lora_layers": 15}}).lora_layers == 15
    with pytest.raises(PayoffError, match="train_reasoning must be true or false, got 'no'"):
        PayoffRecipe.from_settings({"demo": {"train_reasoning": "no"}})
    assert PayoffRecipe.from_settings({"demo": {"template_shares": {"contact_form": 0.5}}}).template_shares == \
        {"contact_form": 0.5}
    with pytest.raises(PayoffError, match="template share: no template 'compare_price' in the split"):
        PayoffRecipe.from_settings({"demo": {"template_shares": {"compare_price": 0.2}}})  # a held-out template
    with pytest.raises(PayoffError, match="share of 'contact_form' must be a fraction between 0 and 1, got 2"):
        PayoffRecipe.from_settings({"demo": {"template_shares": {"contact_form": 2}}})
