"""Pushing to the Hub, against tests/fake_hub.py: `mcpft push` (rows), `mcpft push-model` (adapter, merged model)
and `mcpft train --data OWNER/NAME` (rows read back from the Hub), all as subprocesses with HF_ENDPOINT pointing at
the fake and HF_TOKEN=hf_fake. The token must reach the Hub and never land in any file written."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mcpft.cli import train as cli_train
from mcpft.cli.common import common_options
from mcpft.dataset import export_rows
from mcpft.train import merge_adapter
from tests.fake_hub import FakeHub
from tests.test_train import weather_rows, weather_trace

TOKEN = "hf_fake"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hub():
    fake = FakeHub()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def hub_env(hub, tmp_path) -> dict:
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf-home"),
            "MCPFT_HOME": str(tmp_path / "mcpft-home")}


def mcpft(env: dict, *argv: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "mcpft", *argv, "--json"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"mcpft {argv[0]} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def assert_token_never_written(hub: FakeHub, *folders: Path) -> None:
    assert any(r.authorization == f"Bearer {TOKEN}" for r in hub.requests), "the token was sent to the Hub"
    for repo in hub.repos.values():
        for path, data in repo.files.items():
            assert TOKEN.encode() not in data, f"token in uploaded {repo.repo_id}/{path}"
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), f"token in {path}"


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A real `mcpft train` output with before/after scores, as the model card reads them."""
    folder = tmp_path_factory.mktemp("push")
    data = export_rows(weather_rows(), folder / "rows.jsonl")
    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers(dest="verb", required=True), common_options())
    args = parser.parse_args(["train", "--out", str(folder / "adapter"), "--base-model", str(tiny_model_dir),
                              "--data", str(data), "--heldout", str(data), "--max-steps", "2", "--grad-accum", "1",
                              "--max-new-tokens", "4", "--json"])
    args.handler(args)
    return folder / "adapter"


def test_push_model_uploads_the_adapter_and_its_card(hub, hub_env, adapter, tmp_path):
    summary = mcpft(hub_env, "push-model", "--dir", str(adapter), "--repo-id", "me/weather-lora", "--private")
    assert summary["url"].endswith("/me/weather-lora")
    repo = hub.repo("model", "me/weather-lora")
    assert repo.private
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "mcpft_run.json", "README.md"} == set(repo.files)
    assert repo.files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    card = repo.files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "# me/weather-lora" in card and "| lora_r | 16 |" in card and "| max_steps | 2 |" in card
    assert "## Step scores on held-out rows" in card and "| argument_accuracy |" in card
    assert_token_never_written(hub, adapter, tmp_path)


def test_push_model_uploads_a_merged_model(hub, hub_env, adapter, tmp_path):
    merged = merge_adapter(adapter, tmp_path / "merged")
    mcpft(hub_env, "push-model", "--dir", str(merged), "--repo-id", "me/weather-merged")
    repo = hub.repo("model", "me/weather-merged")
    assert not repo.private and {"config.json", "model.safetensors", "chat_template.jinja"} <= set(repo.files)
    card = repo.files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: transformers\n") and "merged to bf16 safetensors" in card
    assert_token_never_written(hub, merged, tmp_path)


def test_push_dataset_rows(hub, hub_env, tmp_path):
    """The data verb `mcpft push` (rows from the store) lands as Parquet plus a dataset card."""
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(weather_trace(second_turn=True)))
    db = tmp_path / "store.db"
    mcpft(hub_env, "import", str(trace), "--db", str(db))
    summary = mcpft(hub_env, "push", "--db", str(db), "--repo-id", "me/weather-rows")
    assert summary["rows"] == 2
    repo = hub.repo("dataset", "me/weather-rows")
    assert "data/train-00000-of-00001.parquet" in repo.files and "- rows: 2" in repo.files["README.md"].decode()
    assert_token_never_written(hub, tmp_path)


def test_train_from_a_hub_dataset_id(hub, hub_env, tiny_model_dir, tmp_path):
    """`--data OWNER/NAME` reads the rows with `datasets.load_dataset` from the (fake) Hub."""
    parquet = export_rows(weather_rows(second_turn=True), tmp_path / "rows.parquet", fmt="parquet")
    hub.add_file("dataset", "me/hub-rows", "data/train-00000-of-00001.parquet", parquet.read_bytes())
    out = tmp_path / "adapter"
    summary = mcpft(hub_env, "train", "--out", str(out), "--base-model", str(tiny_model_dir), "--data", "me/hub-rows",
                    "--max-steps", "1")
    assert summary["steps"] == 1 and summary["rows_used"] == 2
    record = json.loads((out / "mcpft_run.json").read_text())
    assert record["data"]["source"] == {"kind": "hub", "dataset": "me/hub-rows"}
    assert_token_never_written(hub, tmp_path)
