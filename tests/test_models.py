"""Model resolution: local folders, a Hugging Face cache used offline, and the packaged SmolLM2 converted for real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mcpft.chat_template import hermes_template, renders_tools
from mcpft.config import default_base_model
from mcpft.models import (
    ModelError, OutOfMemory, explain_out_of_memory, load_model, load_tokenizer, model_context, model_name,
    resolve_model,
)

# SmolLM2's kind of template: plain ChatML that drops tools.
PLAIN_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def hub_cache(root: Path, repo_id: str, model_dir: Path, revision: str = "0123456789abcdef") -> Path:
    """A Hugging Face cache holding `model_dir` as `repo_id` (the layout huggingface_hub writes)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def tiny_variant(tiny_model_dir: Path, folder: Path, config: dict | None = None,
                 generation: dict | None = None) -> Path:
    """A copy of the tiny model with some config.json / generation_config.json values changed."""
    shutil.copytree(tiny_model_dir, folder)
    for name, changes in (("config.json", config), ("generation_config.json", generation)):
        path = folder / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **(changes or {})}))
    return folder


def test_local_folder_resolves_to_itself(tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_model_dir), tmp_path) == tiny_model_dir
    assert model_name(str(tiny_model_dir)) == tiny_model_dir.name


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(str(tmp_path), tmp_path)


def test_unknown_spec_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no such folder, and not a Hugging Face Hub id"):
        resolve_model("no/such/thing/here", tmp_path)


def test_hub_id_resolves_from_the_offline_cache(tiny_model_dir, tmp_path, monkeypatch):
    snapshot = hub_cache(tmp_path / "hub", "tiny-org/tiny-qwen3", tiny_model_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("tiny-org/tiny-qwen3", tmp_path) == snapshot
    assert model_name("tiny-org/tiny-qwen3") == "tiny-org/tiny-qwen3"
    model, tokenizer = load_model("tiny-org/tiny-qwen3", tmp_path)
    assert model.config.model_type == "qwen3" and model.dtype.is_floating_point
    assert renders_tools(tokenizer)


def test_hub_id_missing_from_the_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match="'acme/missing' is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        resolve_model("acme/missing", tmp_path)


def test_tokenizer_gets_our_template_when_its_own_drops_tools(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "plain-chatml")
    (folder / "chat_template.jinja").write_text(PLAIN_CHATML)
    tokenizer = load_tokenizer(str(folder), tmp_path)
    assert tokenizer.chat_template == hermes_template()


def test_context_length_is_read_from_the_config(tiny_model_dir, tmp_path):
    assert model_context(str(tiny_model_dir), tmp_path) == 131072
    small = tiny_variant(tiny_model_dir, tmp_path / "small", config={"max_position_embeddings": 300})
    assert model_context(str(small), tmp_path) == 300


def test_default_base_model_follows_the_settings(monkeypatch):
    settings = {"base_model": {"cpu": "smollm2", "gpu": "Qwen/Qwen3-0.6B"}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_base_model(settings) == "smollm2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_base_model(settings) == "Qwen/Qwen3-0.6B"
    assert default_base_model({"base_model": "org/one"}) == "org/one" and default_base_model({}) is None


def _raised(action) -> BaseException:
    try:
        action()
    except BaseException as error:
        return error
    raise AssertionError("nothing was raised")


@pytest.mark.parametrize("make_error, what", [
    (lambda: _raised(lambda: torch.empty(2**62, dtype=torch.uint8)), "the RAM"),  # CPU allocator: a RuntimeError
    (lambda: _raised(lambda: bytearray(2**62)), "the RAM"),  # Python's MemoryError
    # The type the CUDA allocator raises, made here: there is no GPU to fill.
    (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "the GPU's memory"),
])
def test_out_of_memory_errors_become_one_clear_message(make_error, what):
    error = make_error()
    with pytest.raises(OutOfMemory) as raised:
        with explain_out_of_memory("testing", "Lower max_length (now 4096)."):
            raise error
    assert str(raised.value) == f"{what} ran out while testing. Lower max_length (now 4096)."
    assert raised.value.__cause__ is error


def test_other_errors_pass_through_unchanged():
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError) as raised:
        with explain_out_of_memory("testing", "advice"):
            raise error
    assert raised.value is error


@pytest.mark.slow
def test_packaged_smollm2_is_converted_once_to_safetensors(tmp_path, capfd):
    folder = resolve_model(None, tmp_path)
    assert capfd.readouterr().out == ""  # stdout belongs to the CLI's --json; progress went to stderr
    assert folder == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert [p.name for p in folder.parent.iterdir()] == ["SmolLM2-135M-Instruct"]  # no staging folder left
    assert (folder / "model.safetensors").stat().st_size > 400_000_000  # fp32, de-quantized
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"

    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2", tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written  # the second use loads, never reconverts

    model, tokenizer = load_model(None, tmp_path)
    assert tokenizer.chat_template == hermes_template()  # SmolLM2's own template drops tools
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, prompt["input_ids"].shape[1]:])
