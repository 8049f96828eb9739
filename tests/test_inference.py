"""The generation engine: its own Llama-family forward against transformers', prefix reuse, adapters, sampling.

The tiny random Qwen3 model (q/k norms, grouped-query attention, tied embeddings) runs the engine's own forward; the
same checks through transformers' forward cover every other architecture. Greedy outputs are compared token for token.
"""

from __future__ import annotations

import pytest
import torch

from mcpft.hermes import tool_calls_end
from mcpft import inference
from mcpft.inference import (LOOP_MIN_TOKENS, PREFILL_CHUNK, Engine, Sampling, _Int4Groups, _Int8Cache, _Int8Rows,
                             decode_copy, decode_weights, inference_dtype, looping)
from mcpft.models import cpu_has_native_bf16, load_model

HAS_BF16 = torch.cpu._is_avx512_bf16_supported()


EXACT = "same"  # decoding reads the model's own fp32 weights, so tokens can be compared with transformers' own
PARAGRAPH = ("The user wants to find the title of the page. I will navigate to the website, read the snapshot and "
             "click the link. ")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    return load_model(str(tiny_model_dir), tmp_path_factory.mktemp("data"), dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_with_adapter(tiny_model_dir, tmp_path_factory):
    """The tiny model with a random (non-zero) LoRA adapter on every projection, so that it changes the outputs."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model(str(tiny_model_dir), tmp_path_factory.mktemp("data"), dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, config).eval(), tokenizer


def prompt_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def transformers_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        output = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    return output[0, len(ids):].tolist()


def conversation(turns: int) -> list[list[dict]]:
    """The prompts of an agent-like conversation: each one extends the one before by a reply and a long message."""
    messages, prompts = [{"role": "user", "content": PARAGRAPH * 4}], []
    for turn in range(turns):
        prompts.append(list(messages))
        messages += [{"role": "assistant", "content": f"Step {turn}: I clicked the link."},
                     {"role": "user", "content": f"Result {turn}: " + PARAGRAPH * 3}]
    return prompts


@pytest.mark.parametrize("fast", [True, False], ids=["own forward", "transformers forward"])
def test_greedy_tokens_match_transformers_generate(tiny, fast):
    model, tokenizer = tiny
    engine = Engine(model, dtype=torch.float32, fast=fast, decode=EXACT)
    assert engine.fast_problem is None if fast else engine.fast_problem
    for messages in conversation(3):
        ids = prompt_ids(tokenizer, messages)
        assert list(engine.generate(ids, 24)) == transformers_greedy(model, ids, 24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("fast", "int8_attention_from"), [(True, inference.INT8_ATTENTION_FROM), (True, 0),
                                                           (False, None)],
                         ids=["own forward", "own forward, int8 cache", "transformers forward"])
def test_prefix_reuse_gives_the_same_greedy_tokens(tiny, dtype, fast, int8_attention_from, monkeypatch):
    """Each prompt extends the one before (as an agent's steps do): with reuse only the new part is prefilled, and
    the answers are the same, token for token, as from an engine that prefills every prompt whole; also where
    decoding attends through the int8 copy of the cache (made again past the reused part)."""
    if int8_attention_from is not None:
        monkeypatch.setattr(inference, "INT8_ATTENTION_FROM", int8_attention_from)
    model, tokenizer = tiny
    reusing, fresh = Engine(model, dtype=dtype, fast=fast), Engine(model, dtype=dtype, fast=fast)
    # bf16 on a CPU with AVX512-BF16 runs mcpft's attention kernel (the int8 cache is then not used)
    assert ("attention kernel" in reusing.kind) == (fast and dtype == torch.bfloat16 and HAS_BF16)
    reused = []
    for messages in conversation(6):
        ids = prompt_ids(tokenizer, messages)
        with_reuse = list(reusing.generate(ids, 16))
        reused.append(reusing.stats.reused)
        assert reusing.stats.reused + reusing.stats.prefilled == len(ids)
        assert with_reuse == list(fresh.generate(ids, 16, reuse=False))
        assert fresh.stats.reused == 0
    assert reused[0] == 0 and all(r % PREFILL_CHUNK == 0 for r in reused)
    assert reused == sorted(reused) and reused[-1] >= 2 * PREFILL_CHUNK


def test_a_different_prompt_reuses_only_the_common_whole_chunks(tiny):
    model, tokenizer = tiny
    engine = Engine(model, dtype=torch.float32, decode=EXACT)
    first = prompt_ids(tokenizer, conversation(4)[-1])
    list(engine.generate(first, 4))
    changed = list(first)
    changed[PREFILL_CHUNK + 10] = (changed[PREFILL_CHUNK + 10] + 1) % len(tokenizer)
    assert list(engine.generate(changed, 8)) == transformers_greedy(model, changed, 8)
    assert engine.stats.reused == PREFILL_CHUNK


def test_a_sliding_window_model_reuses_a_prefix_further_back_than_its_window(tiny_model_dir):
    """A sliding-window layer's cache drops what leaves its window; the engine (transformers' forward, for such
    models) must still crop back to a reused prefix behind it and answer as the model itself does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_sliding_window=True,
                                                 sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = Engine(model.eval(), dtype=torch.float32)
    assert engine.fast_problem == "sliding-window attention"
    first = prompt_ids(tokenizer, conversation(4)[-1])
    list(engine.generate(first, 4))
    changed = list(first)
    changed[PREFILL_CHUNK + 10] = (changed[PREFILL_CHUNK + 10] + 1) % len(tokenizer)
    assert list(engine.generate(changed, 8)) == transformers_greedy(model, changed, 8)
    assert engine.stats.reused == PREFILL_CHUNK and len(first) - PREFILL_CHUNK > 16


@pytest.mark.parametrize("fast", [True, False], ids=["own forward", "transformers forward"])
def test_an_adapter_and_its_base_keep_their_own_caches(tiny_with_adapter, fast):
    """Requests alternate between the adapter and its base on one engine: each answers as a fresh model would."""
    model, tokenizer = tiny_with_adapter
    engine = Engine(model, dtype=torch.float32, fast=fast, decode=EXACT)
    for messages in conversation(4):
        ids = prompt_ids(tokenizer, messages)
        tuned = list(engine.generate(ids, 12, adapter=True))
        base = list(engine.generate(ids, 12, adapter=False))
        assert tuned == transformers_greedy(model, ids, 12)
        with model.disable_adapter():
            assert base == transformers_greedy(model, ids, 12)
        assert tuned != base  # the adapter changes the answer, so a mixed-up cache would show


def test_sampling_with_a_seed_is_reproducible_and_not_greedy(tiny):
    model, tokenizer = tiny
    engine = Engine(model, dtype=torch.float32)
    ids = prompt_ids(tokenizer, conversation(1)[0])
    hot = Sampling(temperature=1.5, top_p=0.95, seed=7)
    first = list(engine.generate(ids, 20, hot))
    assert first == list(engine.generate(ids, 20, hot))
    assert first != list(engine.generate(ids, 20, Sampling(temperature=1.5, top_p=0.95, seed=8)))
    assert first != list(engine.generate(ids, 20))


def test_a_failed_forward_leaves_no_cache_behind(tiny):
    """An error mid-prefill (out of memory, say) must not leave half-written positions for the next request."""
    model, tokenizer = tiny
    engine = Engine(model, dtype=torch.float32, fast=False)
    ids = prompt_ids(tokenizer, conversation(3)[-1])
    hook = model.model.layers[1].register_forward_hook(lambda *_: (_ for _ in ()).throw(MemoryError("planted")))
    with pytest.raises(MemoryError):
        list(engine.generate(ids, 4))
    hook.remove()
    assert list(engine.generate(ids, 8)) == transformers_greedy(model, ids, 8)
    assert engine.stats.reused == 0


def test_the_dtype_follows_the_cpu(tiny, monkeypatch):
    model, _ = tiny
    monkeypatch.delenv("MCPFT_INFERENCE_DTYPE", raising=False)
    assert inference_dtype(model) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    monkeypatch.setenv("MCPFT_INFERENCE_DTYPE", "float32")
    assert inference_dtype(model) == torch.float32
    monkeypatch.setenv("MCPFT_INFERENCE_DTYPE", "fp99")
    with pytest.raises(ValueError, match="MCPFT_INFERENCE_DTYPE='fp99' is not a torch dtype"):
        inference_dtype(model)


def test_decoding_reads_int8_weights_on_a_cpu(monkeypatch):
    monkeypatch.delenv("MCPFT_DECODE_WEIGHTS", raising=False)
    assert decode_weights(torch.device("cpu")) == "int8"
    assert decode_weights(torch.device("meta")) == "same"  # an accelerator is not bound by the bytes read the same way
    monkeypatch.setenv("MCPFT_DECODE_WEIGHTS", "same")
    assert decode_weights(torch.device("cpu")) == "same"
    monkeypatch.setenv("MCPFT_DECODE_WEIGHTS", "int4")
    with pytest.raises(ValueError, match="MCPFT_DECODE_WEIGHTS='int4' is not one of"):
        decode_weights(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_compute_the_product_of_the_weight_they_quantize(dtype):
    """In the engine's dtype out, whichever it is (the kernel itself runs in bf16)."""
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64).to(dtype), torch.randn(1, 3, 64).to(dtype)
    exact = torch.nn.functional.linear(x.float(), weight.float())
    product = _Int8Rows(weight)(x)
    error = (product.float() - exact).norm() / exact.norm()
    assert product.shape == (1, 3, 96) and product.dtype == dtype and error < 0.02


@pytest.mark.parametrize("int8_attention_from", [inference.INT8_ATTENTION_FROM, 0], ids=["sdpa", "int8 cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_decoding_keeps_the_adapter_and_stays_near_the_engines_weights(tiny_with_adapter, dtype,
                                                                            int8_attention_from, monkeypatch):
    """One decoding step with int8 weights (and the int8 cache) against the same step with the engine's own weights
    and cache (fp32 on a CPU without native BF16, bf16 on one with it), with the adapter and without: quantizing
    moves the logits far less than the adapter does, so the adapter's change survives it."""
    monkeypatch.setattr(inference, "INT8_ATTENTION_FROM", int8_attention_from)
    model, tokenizer = tiny_with_adapter
    ids = prompt_ids(tokenizer, conversation(2)[-1])
    engine = Engine(model, dtype=dtype, decode="int8")
    assert "int8" in engine.kind
    runner, logits = engine.runner, {}
    for adapter in (True, False):
        for decoding in (True, False):
            cache = runner.new_cache(adapter)
            runner.forward(ids[:-1], cache, 0, adapter)
            logits[adapter, decoding] = runner.forward(ids[-1:], cache, len(ids) - 1, adapter, decoding).float()

    def distance(a, b):
        return float((a - b).norm() / b.norm())

    for adapter in (True, False):
        assert distance(logits[adapter, True], logits[adapter, False]) < 0.05
    assert distance(logits[True, False], logits[False, False]) > 4 * distance(logits[True, True], logits[True, False])


def on_a_4bit_grid(outputs: int, inputs: int) -> torch.Tensor:
    """A weight as a Q4_1 GGUF stores one: 4-bit codes in groups of 32 inputs, each group with a step and a minimum
    (its codes run from 0 to 15: the step is the group's range over 15)."""
    groups = (outputs, inputs // 32, 1)
    codes = torch.randint(0, 16, (outputs, inputs // 32, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    return (codes * torch.rand(groups) * 0.01 - torch.rand(groups) * 0.08).view(outputs, inputs)


def test_4bit_groups_serve_a_weight_already_on_a_4bit_grid_and_int8_rows_any_other():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 128)
    for weight, kind in ((on_a_4bit_grid(96, 128), _Int4Groups), (torch.randn(96, 128) * 0.05, _Int8Rows)):
        copy = decode_copy(weight)
        assert type(copy) is kind
        exact = torch.nn.functional.linear(x, weight)
        error = (copy(x).float() - exact).norm() / exact.norm()
        assert copy(x).shape == (1, 2, 96) and error < 0.02
    grid = on_a_4bit_grid(96, 128)  # on the grid, 4 bits lose less than 8: only the steps' bf16 rounding
    assert _Int4Groups(grid).mean_error < _Int8Rows(grid).mean_error(grid) / 3
    assert type(decode_copy(grid, four_bit=False)) is _Int8Rows  # a weight with an adapter folded in
    assert decode_copy(torch.randn(8, 40)) is None  # the int8 kernel computes garbage for such a width


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_int8_cache_attends_as_sdpa_does(dtype):
    """Grouped-query attention of one new position over 700 cached ones, against SDPA on the cache it copies,
    written in two parts (as a prompt's prefill, then decoded positions) into a cache grown between them."""
    torch.manual_seed(0)
    layers, kv_heads, heads, dim, length = 2, 2, 6, 32, 700
    keys, values = (torch.randn(layers, kv_heads, length, dim).to(dtype) for _ in range(2))
    cache = _Int8Cache(layers, kv_heads, dim, torch.device("cpu"))
    for end in (500, length):
        cache.reserve(end)
        for layer in range(layers):
            cache.update(layer, keys[layer], values[layer], end)
        cache.length = end
    assert cache.keys.shape[2] % 16 == 0 and cache.keys.shape[2] >= length
    for layer in range(layers):
        q = torch.randn(heads, dim).to(dtype)
        exact = torch.nn.functional.scaled_dot_product_attention(
            q.float()[None, :, None], keys[layer].float()[None], values[layer].float()[None], enable_gqa=True)[0, :, 0]
        attended = cache.attend(layer, q, length)
        assert attended.dtype == dtype and attended.shape == (heads, dim)
        assert float((attended.float() - exact).norm() / exact.norm()) < 0.02


@pytest.mark.parametrize(("tokens", "loops"), [
    ([7] * LOOP_MIN_TOKENS, True),
    ([7] * (LOOP_MIN_TOKENS - 1), False),
    ([1, 2] + [3, 4, 5, 6, 7] * 13, True),  # a 5-token line written 13 times (65 tokens)
    (list(range(20)) * 3, False),  # three repeats of a 20-token sentence: not yet
    (list(range(100, 120)) + list(range(20)) * 4, True),  # four
    (list(range(200)), False),
    (list(range(30)) * 3 + [1], False),  # the loop was left
])
def test_a_runaway_loop_is_told_from_repetition_that_ends(tokens, loops):
    assert looping(tokens) is loops


def test_greedy_generation_ends_in_a_runaway_loop(tiny):
    """The tiny random model falls into a loop; the engine stops there, having written what greedy decoding
    writes (a prefix of transformers' own answer), far short of the budget."""
    model, tokenizer = tiny
    engine = Engine(model, dtype=torch.float32, decode=EXACT)
    ids = tokenizer("Hello there")["input_ids"]
    tokens = list(engine.generate(ids, 300))
    assert engine.stats.looped and len(tokens) < 300 and looping(tokens) and not looping(tokens[:-1])
    assert tokens == transformers_greedy(model, ids, len(tokens))


@pytest.mark.parametrize(("text", "end"), [
    ('<tool_call>\n{"name": "a"}\n</tool_call>', None),  # may go on with another call
    ('<tool_call>\n{"name": "a"}\n</tool_call>\n\n<tool_c', None),  # it does
    ('<tool_call>\n{"name": "a"}\n</tool_call>\n<tool_call>\n{"name": "b"}\n', None),
    ('<tool_call>\n{"name": "a"}\n</tool_call>\n{"name": "a"}', 38),  # repeated JSON after the call: cut
    ('<tool_call>\n{"name": "a"}\n</tool_call>\n<tool_call>{"name": "b"}</tool_call>\nDone', 75),
    ('<think>\nI could write <tool_call>{}</tool_call> here\n', None),  # still reasoning
    ('<think>\nmaybe <tool_call>{}</tool_call>\n</think>\nNo call after all.', None),
    ("Just an answer.", None),
])
def test_where_a_reply_with_tool_calls_is_complete(text, end):
    assert tool_calls_end(text) == end


@pytest.mark.slow
def test_smollm2_reuse_matches_a_fresh_prefill_in_its_default_dtype(tmp_path_factory):
    """The real model, in the dtype this machine serves it in (bf16 on CPUs with native BF16): an agent-like
    conversation answered with reuse and without gives the same tokens."""
    import os
    from pathlib import Path

    data_dir = Path(os.environ.get("MCPFT_TEST_CACHE", "/tmp/mcpft-test-cache"))
    model, tokenizer = load_model(None, data_dir)
    reusing, fresh = Engine(model), Engine(model)
    for messages in conversation(4):
        ids = prompt_ids(tokenizer, messages)
        assert list(reusing.generate(ids, 24)) == list(fresh.generate(ids, 24, reuse=False))
    assert reusing.stats.reused > 0
