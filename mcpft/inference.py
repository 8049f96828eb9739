"""Fast local generation: one KV cache per model state, reused across requests that share a prefix.

Every agent step re-sends the whole conversation, and every step of a held-out trace extends the one before it. So
the engine keeps, per model state (the base weights, or the base with its LoRA adapter), the KV cache of the last
sequence it saw and prefills only what a new prompt adds past the longest common prefix, as vLLM's prefix caching
does. A trace then costs one prefill of its longest prompt (plus at most one 256-token chunk a step, see
`Engine._prefill`) and the generated tokens.

Decoding with transformers' `generate` spends most of a token on framework work, not arithmetic (docs/benchmarks.md,
"Where decode time goes"). For the Llama family (Llama, Mistral, Qwen2, Qwen3: one architecture with small options)
the engine runs its own forward pass over the model's own tensors: fused QKV and gate/up projections, a cache laid out
for grouped-query attention, logits for the last position only. A LoRA adapter is folded into a second copy of the
weights (W + BA·scale, exactly what PEFT computes), so a base and its adapter never share a cache. Any other
architecture goes through the model's own forward with a cropped `DynamicCache`: slower, still with prefix reuse.

On a CPU with native BF16 (AVX512-BF16 or AMX) weights and cache are bf16, which halves the bytes every decoded token
reads; elsewhere on a CPU they stay fp32 (emulated bf16 is slower than fp32). A GPU uses the model's own dtype. On
every CPU, decoding reads quantized copies of the weights: int8 rows (`_Int8Rows`: a quarter of fp32's bytes, half
of bf16's), or 4-bit groups where the weights already sit on such a grid (`_Int4Groups`: the packaged SmolLM2 comes
from a 4-bit GGUF). Attention in bf16 on an AVX512-BF16 CPU runs mcpft's own kernel (`mcpft.cpu_attention`: 3-7x
PyTorch's there); elsewhere PyTorch's, and from INT8_ATTENTION_FROM positions on decoding reads an int8 copy of the
cache (`_Int8Cache`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mcpft import cpu_attention
from mcpft.models import cpu_has_native_bf16

FAST_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
CACHE_STEP = 512  # the KV cache grows in multiples of this many positions
PREFILL_CHUNK = 256  # prompts are prefilled in chunks aligned to multiples of this (see Engine._prefill)
INT8_ATTENTION_FROM = 1536  # with int8 decoding, decoded tokens attend through `_Int8Cache` from this context length
DTYPE_ENV = "MCPFT_INFERENCE_DTYPE"  # "float32" / "bfloat16" / "float16": overrides the choice below
DECODE_WEIGHTS_ENV = "MCPFT_DECODE_WEIGHTS"  # "int8" / "same": overrides the choice in `decode_weights`


def inference_dtype(model) -> torch.dtype:
    """The dtype the engine computes in: `$MCPFT_INFERENCE_DTYPE`, else bf16 on a native-BF16 CPU, fp32 on other
    CPUs, and the model's own dtype on a GPU."""
    if name := os.environ.get(DTYPE_ENV):
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{DTYPE_ENV}={name!r} is not a torch dtype (try float32 or bfloat16)")
        return dtype
    device = next(model.parameters()).device
    if device.type != "cpu":
        return next(model.parameters()).dtype
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def decode_weights(device: torch.device) -> str:
    """How decoding reads the weights: `$MCPFT_DECODE_WEIGHTS`, else "int8" on a CPU (a decoded token reads every
    weight once: int8 reads half of bf16's bytes and a quarter of fp32's; see `_Int8Rows`), "same" on a GPU (not
    bound the same way)."""
    if choice := os.environ.get(DECODE_WEIGHTS_ENV):
        if choice not in ("int8", "same"):
            raise ValueError(f"{DECODE_WEIGHTS_ENV}={choice!r} is not one of 'int8' or 'same'")
        return choice
    return "int8" if device.type == "cpu" else "same"


@dataclass
class Sampling:
    """How the next token is picked. `temperature` 0 (or None with a greedy model config) is greedy."""

    temperature: float | None = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def greedy(self) -> bool:
        return not self.temperature


def sampling_from_config(generation_config, temperature: float | None, top_p: float | None,
                         seed: int | None) -> Sampling:
    """The request's sampling where it says, the model's generation config where it does not."""
    if temperature is None:
        sampled = bool(getattr(generation_config, "do_sample", False))
        temperature = (getattr(generation_config, "temperature", None) or 1.0) if sampled else 0.0
    if top_p is None and temperature:
        top_p = getattr(generation_config, "top_p", None)
    top_k = getattr(generation_config, "top_k", None) if temperature else None
    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


class _Picker:
    def __init__(self, sampling: Sampling, device):
        self.sampling = sampling
        self.generator = None
        if not sampling.greedy():
            self.generator = torch.Generator(device=device)
            if sampling.seed is not None:
                self.generator.manual_seed(sampling.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        if self.sampling.greedy():  # via fp32: bf16's argmax of 49k logits takes ~180 µs, the cast and fp32's ~60
            return int(logits.float().argmax())
        logits = logits.float() / self.sampling.temperature
        if self.sampling.top_k:
            kth = torch.topk(logits, min(self.sampling.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if self.sampling.top_p is not None and self.sampling.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.sampling.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """The tokens that end a reply: the model's eos ids and, for ChatML templates, `<|im_end|>`."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return ids


LOOP_PERIOD = 64  # the longest repeated block `looping` looks for, in tokens
LOOP_REPEATS, LOOP_MIN_TOKENS = 4, 64  # a block repeated this many times, over at least this many tokens


def looping(tokens: list[int]) -> bool:
    """Whether `tokens` end in a runaway loop: one block of at most LOOP_PERIOD tokens repeated back to back at least
    LOOP_REPEATS times and over at least LOOP_MIN_TOKENS tokens. A small model stuck this way (`"Trelis.com",` line
    after line) writes the same until `max_tokens`; no answer or tool call gets better from what follows."""
    for period in range(1, LOOP_PERIOD + 1):
        span = max(LOOP_REPEATS * period, LOOP_MIN_TOKENS)
        if span > len(tokens):
            break
        if tokens[-1] == tokens[-1 - period]:
            tail = tokens[-span:]
            if tail[period:] == tail[:-period]:
                return True
    return False


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# The Llama-family forward pass over the model's own tensors


def _peft_base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _weight(module, adapter: bool, dtype) -> torch.Tensor:
    """A linear or embedding module's weight, with its active LoRA adapters folded in when `adapter`."""
    base = getattr(module, "base_layer", module)
    weight = base.weight.detach()
    if adapter and hasattr(module, "get_delta_weight"):
        for name in module.active_adapters:
            if name in getattr(module, "lora_A", {}) or name in getattr(module, "lora_embedding_A", {}):
                weight = weight + module.get_delta_weight(name).detach()
    return weight.to(dtype)


def _bias(module, dtype) -> torch.Tensor | None:
    bias = getattr(getattr(module, "base_layer", module), "bias", None)
    return None if bias is None else bias.detach().to(dtype)


def fast_path_problem(model) -> str | None:
    """Why the engine's own forward cannot run this model (None: it can)."""
    config = _peft_base(model).config
    if config.model_type not in FAST_MODEL_TYPES:
        return f"model type {config.model_type!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "use_sliding_window", False) or any(
            kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "sliding-window attention"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "tensor-parallel pretraining slices"
    if any(isinstance(getattr(module, "lora_magnitude_vector", None), torch.nn.ModuleDict)
           and len(module.lora_magnitude_vector) for module in model.modules()):
        return "a DoRA adapter"
    return None


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 values and fp32 scales of each row (the last dimension), symmetric: a row's largest magnitude is 127."""
    x = x.float()
    scales = x.abs().amax(-1).clamp(min=1e-12) / 127
    return torch.round(x / scales[..., None]).clamp(-127, 127).to(torch.int8), scales


class _Int8Rows:
    """A weight quantized to int8 per output row (symmetric: the row's largest magnitude is 127), used for decoding.

    A decoded token is a matrix-vector product per weight, bound by the bytes read: int8 reads half of bf16's, and
    PyTorch's weight-only int8 kernel runs SmolLM2's weights in ~11 ms against ~25 ms in bf16 on 2 cores. Prefill
    keeps the engine's own weights: there the int8 kernel is 3x slower than bf16's matrix product.

    The kernel always runs with bf16 activations: with fp32 ones it is 7x slower (106 ms against 14 ms for SmolLM2's
    weights on an AVX2 CPU without native BF16, where fp32's own product takes 46 ms), so an fp32 engine casts the
    one token's activations to bf16 and back, and keeps computing everything else in fp32.
    """

    KERNEL_DTYPE = torch.bfloat16

    def __init__(self, weight: torch.Tensor):
        values, scales = _quantize_rows(weight)
        self.values, self.scales = values.contiguous(), scales.to(self.KERNEL_DTYPE)

    def mean_error(self, weight: torch.Tensor) -> float:
        """How far what the kernel computes with lies from `weight` (the one quantized), on average."""
        return (self.values * self.scales.float()[:, None] - weight.float()).abs().mean().item()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(self.KERNEL_DTYPE), self.values,
                                                  self.scales)
        return rows.view(*x.shape[:-1], -1).to(x.dtype)


class _Int4Groups:
    """A weight quantized to 4 bits in groups of 32 inputs (a step and a zero per group), used for decoding where it
    is closer to the weight than `_Int8Rows`.

    That is where the weights already sit on such a grid: SmolLM2 as packaged comes from a Q4_1 GGUF (4 bits, groups
    of 32, a step and a minimum each), so its layers' weights come back to within the bf16 rounding of the steps, 5x
    closer than int8 rows, and PyTorch's int4 kernel reads them in half int8's time. A weight off such a grid (a
    model trained in bf16, the GGUF's embedding) loses more in 4 bits than in 8 and keeps int8 (`decode_copy`). So
    does a weight with a LoRA adapter folded in, whatever the error says: 4 bits would round the adapter's small,
    coherent change back onto the base's grid, where int8's rounding noise averages out in the product.
    """

    GROUP = 32
    KERNEL_DTYPE = torch.bfloat16

    def __init__(self, weight: torch.Tensor):
        outputs, inputs = weight.shape
        groups = weight.float().view(outputs, inputs // self.GROUP, self.GROUP)
        low = groups.amin(-1, keepdim=True)
        step = ((groups.amax(-1, keepdim=True) - low) / 15).clamp(min=1e-12)
        codes = torch.round((groups - low) / step).clamp(0, 15)
        # The kernel computes (code - 8) * step + zero, with step and zero per group, [groups, outputs, 2].
        steps_zeros = torch.cat([step, low + 8 * step], -1).to(self.KERNEL_DTYPE)
        self.steps_zeros = steps_zeros.transpose(0, 1).contiguous()
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.view(outputs, inputs).to(torch.int32), 2)
        step, zero = steps_zeros.float().unbind(-1)
        self.mean_error = ((codes - 8) * step[..., None] + zero[..., None] - groups).abs().mean().item()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(self.KERNEL_DTYPE),
                                                          self.packed, self.GROUP, self.steps_zeros)
        return rows.view(*x.shape[:-1], -1).to(x.dtype)


def decode_copy(weight: torch.Tensor, four_bit: bool = True) -> _Int8Rows | _Int4Groups | None:
    """The quantized copy of a weight that one-token decode steps multiply through: with `four_bit`, 4-bit groups
    where they are closer to the weight than int8 rows (see `_Int4Groups`), else int8 rows; None (the engine's own
    weight) for a width the int8 kernel cannot take (it computes garbage unless the inputs are a multiple of 16)."""
    if weight.shape[1] % 16:
        return None
    rows = _Int8Rows(weight)
    outputs, inputs = weight.shape
    if not four_bit or inputs % _Int4Groups.GROUP or outputs % 16 or weight.device.type != "cpu":  # int4 kernel's
        return rows
    groups = _Int4Groups(weight)
    return groups if groups.mean_error <= rows.mean_error(weight) else rows


@dataclass
class _Layer:
    norm1: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    out: torch.Tensor
    norm2: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    decode: dict[str, _Int8Rows | _Int4Groups] | None = None  # quantized qkv, out, gate_up, down for one-token steps


def _linear(x: torch.Tensor, weight: torch.Tensor, quantized: _Int8Rows | _Int4Groups | None,
            bias: torch.Tensor | None = None):
    if quantized is None:
        return F.linear(x, weight, bias)
    return quantized(x) if bias is None else quantized(x) + bias


def _attention_shape(config) -> tuple[int, int, int]:
    """Query heads, key-value heads, head dimension."""
    heads = config.num_attention_heads
    return heads, config.num_key_value_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


class _LlamaWeights:
    """The tensors of one model state (base, or base + adapter), fused for fewer, larger matrix products."""

    def __init__(self, model, adapter: bool, dtype: torch.dtype, int8_decode: bool = False):
        base = _peft_base(model)
        config, inner = base.config, base.model
        self.eps = config.rms_norm_eps
        self.heads, self.kv_heads, self.head_dim = _attention_shape(config)
        self.rotary = inner.rotary_emb
        self.embed = _weight(inner.embed_tokens, adapter, dtype)
        self.norm = inner.norm.weight.detach().to(dtype)
        self.head = _weight(base.lm_head, adapter, dtype)
        self.layers = []
        for layer in inner.layers:
            attention, mlp = layer.self_attn, layer.mlp
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            biases = [_bias(p, dtype) for p in projections]
            q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
            self.layers.append(_Layer(
                norm1=layer.input_layernorm.weight.detach().to(dtype),
                qkv=torch.cat([_weight(p, adapter, dtype) for p in projections]).contiguous(),
                qkv_bias=None if biases[0] is None else torch.cat(biases),
                q_norm=None if q_norm is None else q_norm.weight.detach().to(dtype),
                k_norm=None if k_norm is None else k_norm.weight.detach().to(dtype),
                out=_weight(attention.o_proj, adapter, dtype).contiguous(),
                norm2=layer.post_attention_layernorm.weight.detach().to(dtype),
                gate_up=torch.cat([_weight(mlp.gate_proj, adapter, dtype),
                                   _weight(mlp.up_proj, adapter, dtype)]).contiguous(),
                down=_weight(mlp.down_proj, adapter, dtype).contiguous()))
        self.head_decode = None
        self.quantize = int8_decode  # decode copies still to make (`quantized`)
        self.adapter = adapter

    def quantized(self) -> _LlamaWeights:
        """These weights with their decode copies, made on the first decoded token (~3 s for SmolLM2): a request that
        only prefills (Test connection's one-token completion) never waits for them. They are quantized after the
        adapter is folded in (to int8 rows only: see `_Int4Groups`), so the adapter's change is kept."""
        if self.quantize:
            for layer in self.layers:
                layer.decode = {name: decode_copy(getattr(layer, name), four_bit=not self.adapter)
                                for name in ("qkv", "out", "gate_up", "down")}
            self.head_decode = decode_copy(self.head, four_bit=not self.adapter)
            self.quantize = False
        return self


class _Int8Cache:
    """Int8 copies of a cache's keys and values, which decoded tokens attend through at long contexts.

    One decoded token reads the whole cache: at 3.6k positions SmolLM2's bf16 cache is 83 MB a token, and SDPA's CPU
    kernel, with one query row a head, reads it at ~5 GB/s (15 ms of a 31 ms token). PyTorch's weight-only int8 kernel
    reads a key cache quantized per position as if it were a weight, `q · K8ᵀ`, and the values, kept transposed, the
    same way, `P · V8ᵀᵀ`: 8 ms for the same attention, at half the bytes. Below INT8_ATTENTION_FROM positions SDPA
    is faster (the int8 path's per-head calls cost more than they save).

    Keys and values are quantized per position and head (symmetric, as `_Int8Rows`), lazily, from the engine's own
    cache: prefill writes and reuse keeps only that one, so these copies change decoded tokens only, as the int8
    weights do. Positions past the sequence's length hold stale values that the attention weights by exactly 0.
    """

    STEP = 256  # capacity grows in multiples of this; the int8 kernel wants an inner dimension divisible by 16

    def __init__(self, layers: int, kv_heads: int, head_dim: int, device):
        self.keys = torch.zeros((layers, kv_heads, 0, head_dim), dtype=torch.int8, device=device)
        self.key_scales = torch.zeros((layers, kv_heads, 0), dtype=_Int8Rows.KERNEL_DTYPE, device=device)
        self.values = torch.zeros((layers, kv_heads, head_dim, 0), dtype=torch.int8, device=device)  # transposed
        self.value_scales = torch.zeros((layers, kv_heads, 0), dtype=torch.float32, device=device)
        self.ones = torch.ones(head_dim, dtype=_Int8Rows.KERNEL_DTYPE, device=device)
        self.length = 0  # positions quantized, in every layer

    def reserve(self, length: int) -> None:
        capacity = self.keys.shape[2]
        if length <= capacity:
            return
        capacity = -(-length // self.STEP) * self.STEP
        for name in ("keys", "key_scales", "values", "value_scales"):
            old = getattr(self, name)
            axis = 3 if name == "values" else 2
            grown = old.new_zeros(old.shape[:axis] + (capacity,) + old.shape[axis + 1:])
            grown.narrow(axis, 0, old.shape[axis]).copy_(old)
            setattr(self, name, grown)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, end: int) -> None:
        """Quantize positions self.length..end of one layer's keys and values ([kv_heads, positions, head_dim])."""
        start = self.length
        keys8, self.key_scales[layer, :, start:end] = _quantize_rows(keys[:, start:end])
        values8, self.value_scales[layer, :, start:end] = _quantize_rows(values[:, start:end])
        self.keys[layer, :, start:end] = keys8
        self.values[layer, :, :, start:end] = values8.transpose(1, 2)

    def attend(self, layer: int, q: torch.Tensor, end: int) -> torch.Tensor:
        """One decoded token's attention: q [heads, head_dim] -> [heads, head_dim], over positions 0..end."""
        kv_heads, dim, capacity = self.values.shape[1:]
        group = q.shape[0] // kv_heads
        rows = (q * dim ** -0.5).to(_Int8Rows.KERNEL_DTYPE).view(kv_heads, group, dim)
        # The value product runs over the whole capacity: positions past `end` are weighted by exactly 0.
        weights = torch.zeros((kv_heads, group, capacity), dtype=torch.float32, device=q.device)
        for head in range(kv_heads):
            weights[head, :, :end] = torch.ops.aten._weight_int8pack_mm(
                rows[head], self.keys[layer, head, :end], self.key_scales[layer, head, :end])
        weights[..., :end] = torch.softmax(weights[..., :end], -1) * self.value_scales[layer, :, None, :end]
        weights = weights.to(_Int8Rows.KERNEL_DTYPE)
        return torch.cat([torch.ops.aten._weight_int8pack_mm(weights[head], self.values[layer, head], self.ones)
                          for head in range(kv_heads)]).to(q.dtype)


class _LlamaCache:
    """Keys and values of one sequence, [layers, kv_heads, capacity, head_dim], grown in CACHE_STEP blocks, and,
    with int8 decoding, their int8 copies (`_Int8Cache`)."""

    def __init__(self, weights: _LlamaWeights, dtype, device, int8: bool = False):
        self.shape = (len(weights.layers), weights.kv_heads, 0, weights.head_dim)
        self.dtype, self.device = dtype, device
        self.keys = self.values = torch.empty(self.shape, dtype=dtype, device=device)
        # The int8 kernel reads keys as rows of head_dim inputs: it needs a multiple of 16.
        self.int8 = (_Int8Cache(len(weights.layers), weights.kv_heads, weights.head_dim, device)
                     if int8 and weights.head_dim % 16 == 0 else None)

    def reserve(self, length: int) -> None:
        capacity = self.keys.shape[2]
        if length <= capacity:
            return
        capacity = max(length, 2 * capacity)
        capacity = -(-capacity // CACHE_STEP) * CACHE_STEP
        layers, heads, _, dim = self.shape
        for name in ("keys", "values"):
            grown = torch.empty((layers, heads, capacity, dim), dtype=self.dtype, device=self.device)
            old = getattr(self, name)
            grown[:, :, :old.shape[2]] = old
            setattr(self, name, grown)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: normalise in fp32, scale in the model's dtype.
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class _LlamaRunner:
    """The Llama-family forward pass: `forward(ids, cache, start)` writes positions start.. and returns the last
    position's logits."""

    def __init__(self, model, dtype, decode: str | None = None):
        self.model, self.dtype = model, dtype
        self.device = next(model.parameters()).device
        self.int8_decode = (decode or decode_weights(self.device)) == "int8"
        self._weights: dict[bool, _LlamaWeights] = {}
        self.attention_kernel = self._attention_kernel(_peft_base(model).config)

    def _attention_kernel(self, config) -> cpu_attention.Kernel | None:
        """mcpft's attention kernel where it computes this model's attention: bf16 on a CPU that has it."""
        if self.device.type != "cpu" or self.dtype != torch.bfloat16:
            return None
        heads, kv_heads, head_dim = _attention_shape(config)
        found = cpu_attention.kernel() if cpu_attention.supports(head_dim, heads, kv_heads) else None
        return found if isinstance(found, cpu_attention.Kernel) else None

    def weights(self, adapter: bool) -> _LlamaWeights:
        if adapter not in self._weights:
            self._weights[adapter] = _LlamaWeights(self.model, adapter, self.dtype, self.int8_decode)
        return self._weights[adapter]

    def new_cache(self, adapter: bool) -> _LlamaCache:
        # The attention kernel reads the bf16 cache faster than the int8 copy is read (docs/benchmarks.md).
        return _LlamaCache(self.weights(adapter), self.dtype, self.device,
                           int8=self.int8_decode and self.attention_kernel is None)

    def crop(self, cache: _LlamaCache, length: int) -> None:
        # Positions past `length` are simply overwritten; their int8 copies are made again.
        if cache.int8 is not None:
            cache.int8.length = min(cache.int8.length, length)

    def reserve(self, cache: _LlamaCache, length: int) -> None:
        cache.reserve(length)

    @torch.inference_mode()
    def forward(self, ids: list[int], cache: _LlamaCache, start: int, adapter: bool,
                decoding: bool = False) -> torch.Tensor:
        w = self.weights(adapter).quantized() if decoding else self.weights(adapter)
        count, end = len(ids), start + len(ids)
        cache.reserve(end)
        tokens = torch.tensor(ids, device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        x = F.embedding(tokens, w.embed)[None]
        cos, sin = w.rotary(x, positions)
        cos, sin = cos.to(self.dtype)[:, None], sin.to(self.dtype)[:, None]
        heads, kv_heads, dim = w.heads, w.kv_heads, w.head_dim
        mask = None
        if count > 1 and self.attention_kernel is None:  # new positions see the cached prefix and, causally, each other
            mask = torch.ones(count, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
        int8_cache = cache.int8 if decoding and end >= INT8_ATTENTION_FROM else None
        if int8_cache is not None:
            int8_cache.reserve(end)
        for i, layer in enumerate(w.layers):
            # A prefilled position's keys and values are reused later, so only decoding reads the quantized weights.
            quantized = layer.decode if decoding and layer.decode else {}
            h = _rms(x, layer.norm1, w.eps)
            q, k, v = _linear(h, layer.qkv, quantized.get("qkv"), layer.qkv_bias).split(
                [heads * dim, kv_heads * dim, kv_heads * dim], -1)
            q, k = q.view(1, count, heads, dim), k.view(1, count, kv_heads, dim)
            if layer.q_norm is not None:
                q, k = _rms(q, layer.q_norm, w.eps), _rms(k, layer.k_norm, w.eps)
            q = _rotate(q.transpose(1, 2), cos, sin)
            k = _rotate(k.transpose(1, 2), cos, sin)
            cache.keys[i, :, start:end] = k[0]
            cache.values[i, :, start:end] = v.view(count, kv_heads, dim).transpose(0, 1)
            attended = self._attend(i, q, cache, end, mask, int8_cache)
            x = x + _linear(attended, layer.out, quantized.get("out"))
            gate, up = _linear(_rms(x, layer.norm2, w.eps), layer.gate_up, quantized.get("gate_up")).chunk(2, -1)
            x = x + _linear(F.silu(gate) * up, layer.down, quantized.get("down"))
        if int8_cache is not None:
            int8_cache.length = end
        return _linear(_rms(x[0, -1], w.norm, w.eps), w.head, w.head_decode if decoding else None)

    def _attend(self, layer: int, q: torch.Tensor, cache: _LlamaCache, end: int, mask: torch.Tensor | None,
                int8_cache: _Int8Cache | None) -> torch.Tensor:
        """Layer `layer`'s attention of q [1, heads, count, head_dim] over the cache up to `end`, as rows
        [1, count, heads * head_dim]: mcpft's kernel where it runs, else the int8 cache (decoding at long
        contexts) or SDPA."""
        _, heads, count, dim = q.shape
        keys, values = cache.keys[layer], cache.values[layer]
        if self.attention_kernel is not None and count == 1:
            return self.attention_kernel.decode(q.view(heads, dim), keys, values, end).view(1, 1, -1)
        if self.attention_kernel is not None:
            return self.attention_kernel.prefill(q[0], keys, values, end)[None]
        if int8_cache is not None:
            int8_cache.update(layer, keys, values, end)
            return int8_cache.attend(layer, q.view(heads, dim), end).view(1, 1, heads * dim)
        keys, values = keys[None, :, :end], values[None, :, :end]
        if count == 1:  # a group's query heads as rows of one head: 4x faster than SDPA's GQA path on CPU
            kv_heads = keys.shape[1]
            return F.scaled_dot_product_attention(q.view(1, kv_heads, heads // kv_heads, dim), keys,
                                                  values).view(1, 1, heads * dim)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return attended.transpose(1, 2).reshape(1, count, heads * dim)


class _TransformersRunner:
    """Any causal LM through its own forward and a `DynamicCache`, cropped to the reused prefix."""

    def __init__(self, model, dtype, decode: str | None = None):
        self.model = model
        self.device = next(model.parameters()).device

    def new_cache(self, adapter: bool):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        cache = DynamicCache(config=self.model.config)  # the config's layer kinds (hybrid models need theirs)
        # A sliding-window layer drops what falls out of its window, and a reused prefix must crop back to any
        # position: here such layers keep every position (the attention mask still applies the window).
        cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
        return cache

    def reserve(self, cache, length: int) -> None:
        pass  # a DynamicCache grows as it goes

    def crop(self, cache, length: int) -> None:
        if (surplus := cache.get_seq_length() - length) > 0:
            cache.crop(-surplus)  # transformers 5: a negative count removes that many positions

    @torch.inference_mode()
    def forward(self, ids: list[int], cache, start: int, adapter: bool, decoding: bool = False) -> torch.Tensor:
        disable = getattr(self.model, "disable_adapter", None)
        with disable() if (disable is not None and not adapter) else nullcontext():
            output = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache,
                                use_cache=True, logits_to_keep=1)
        return output.logits[0, -1]


# ---------------------------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Sequence:
    cache: object
    tokens: list[int]


@dataclass
class Stats:
    """What the last `generate` did: prompt tokens reused from the cache, and prefilled."""

    reused: int = 0
    prefilled: int = 0
    looped: bool = False  # generation stopped in a runaway loop (see `looping`)


class Engine:
    """Generates token ids for one model (a PeftModel serves its base with `adapter=False`), on the calling thread.

    Not thread-safe: callers serialise (the embedded endpoint runs every engine on its one model thread).
    """

    def __init__(self, model, dtype: torch.dtype | None = None, fast: bool = True, decode: str | None = None):
        """`decode`: "int8" or "same" (the weights decoding reads); None chooses by `decode_weights`."""
        self.model = model
        self.dtype = dtype or inference_dtype(model)
        self.fast_problem = fast_path_problem(model) if fast else "the fast path was turned off"
        runner = _TransformersRunner if self.fast_problem else _LlamaRunner
        self.runner = runner(model, self.dtype, decode)
        self.kind = "transformers forward" if self.fast_problem else self._own_forward_kind()
        self._sequences: dict[bool, _Sequence] = {}
        self.stats = Stats()

    def _own_forward_kind(self) -> str:
        kernel, int8 = self.runner.attention_kernel is not None, self.runner.int8_decode
        parts = [str(self.dtype)] + (["mcpft's bf16 attention kernel"] if kernel else [])
        if int8:
            parts.append("int8 or int4 weights" + ("" if kernel else " and an int8 cache") + " for decoding")
        return f"mcpft Llama-family forward ({', '.join(parts)})"

    def adapter_key(self, adapter: bool) -> bool:
        return bool(adapter) and hasattr(self.model, "disable_adapter")

    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling | None = None,
                 adapter: bool = True, reuse: bool = True) -> Iterator[int]:
        """Yield up to `max_new_tokens` new token ids after `prompt`, ending early in a runaway loop (`looping`,
        then `stats.looped` says so); the caller stops when it has what it needs (an end-of-turn token, a stop
        string, a client gone) simply by not asking for more."""
        if not prompt:
            raise ValueError("the prompt holds no token")
        key = self.adapter_key(adapter)
        sequence = self._sequences.get(key)
        if sequence is None or not reuse:
            sequence = self._sequences[key] = _Sequence(self.runner.new_cache(key), [])
        # Only whole chunks are reused, and at least one prompt token is prefilled again (its logits pick the first
        # new token): see `_prefill` for why.
        kept = min(common_prefix(sequence.tokens, prompt), len(prompt) - 1) // PREFILL_CHUNK * PREFILL_CHUNK
        del sequence.tokens[kept:]
        self.runner.crop(sequence.cache, kept)
        self.stats = Stats(reused=kept, prefilled=len(prompt) - kept)
        # The whole sequence's cache is allocated first: memory runs out before any work, not halfway through.
        self.runner.reserve(sequence.cache, len(prompt) + max_new_tokens)
        pick = _Picker(sampling or Sampling(), self.runner.device)
        logits = self._prefill(sequence, prompt, key)
        position, produced_tokens = len(prompt), []
        for produced in range(max_new_tokens):
            token = pick(logits)
            yield token
            produced_tokens.append(token)
            if looping(produced_tokens):
                self.stats.looped = True
                return
            if produced + 1 < max_new_tokens:
                logits = self._forward(sequence, [token], position, key, decoding=True)
                position += 1

    def _prefill(self, sequence: _Sequence, prompt: list[int], adapter: bool) -> torch.Tensor:
        """Prefill `prompt` past the cached tokens in chunks aligned to multiples of PREFILL_CHUNK.

        Kernels round differently for different shapes, so a position's keys and values are bit-identical only when
        computed in the same chunk shape. Aligned chunks make a prompt's positions always computed the same way,
        whatever was cached before, so greedy answers are the same with and without reuse (in bf16 too). Tokens
        generated one at a time are for the same reason never kept as reusable.
        """
        logits = None
        for start in range(len(sequence.tokens), len(prompt), PREFILL_CHUNK):
            end = min(start // PREFILL_CHUNK * PREFILL_CHUNK + PREFILL_CHUNK, len(prompt))
            logits = self._forward(sequence, prompt[start:end], start, adapter)
            sequence.tokens.extend(prompt[start:end])
        return logits

    def _forward(self, sequence: _Sequence, ids: list[int], start: int, adapter: bool,
                 decoding: bool = False) -> torch.Tensor:
        try:
            return self.runner.forward(ids, sequence.cache, start, adapter, decoding)
        except BaseException:  # a half-written cache is never reused
            sequence.tokens.clear()
            sequence.cache = self.runner.new_cache(adapter)
            raise
