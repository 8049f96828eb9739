"""The embedded OpenAI-compatible endpoint, driven by the real `openai` SDK.

A tiny random Qwen3 model exercises the transformers path (rendering, sampling, streaming, stop strings, usage, a
LoRA adapter beside its base); a scripted backend (a `Backend` like the demo's scripted teacher) writes fixed Hermes
text, so that tool call and reasoning parsing can be checked exactly. One test serves the real SmolLM2.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import wait
from pathlib import Path

import httpx
import openai
import pytest
import torch

from mcpft.agent.endpoint import Endpoint, probe
from mcpft.inference import Engine
from mcpft.models import load_model
from mcpft.serve import (
    MODEL_THREAD, Generation, GenerationRequest, TransformersBackend, create_app, load_backends, serve_in_thread)

TOOLS = [{"type": "function", "function": {
    "name": "browser_navigate", "description": "Navigate to a URL",
    "parameters": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]}}}]
HI = [{"role": "user", "content": "Find the title of example.com"}]
SCRIPT = ("<think>\nThe user wants the title. I will open the page.\n</think>\n\nOpening it now.\n"
          '<tool_call>\n{"name": "browser_navigate", "arguments": {"url": "https://example.com/"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "browser_snapshot", "arguments": {}}\n</tool_call>')


class ScriptedBackend:
    """Writes a fixed text a few characters at a time, and keeps the requests it got."""

    def __init__(self, text: str, piece: int = 5):
        self.text, self.piece = text, piece
        self.requests: list[GenerationRequest] = []

    def start(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        pieces = [self.text[i:i + self.piece] for i in range(0, len(self.text), self.piece)]
        return Generation(chunks=iter(pieces), prompt_tokens=1, completion_tokens=len(pieces))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    return load_model(str(tiny_model_dir), tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def scripted():
    return ScriptedBackend(SCRIPT)


@pytest.fixture(scope="module")
def server(tiny, scripted):
    model, tokenizer = tiny
    base_url, stop = serve_in_thread(create_app({"tiny": TransformersBackend(model, tokenizer),
                                                 "scripted": scripted}))
    yield base_url
    stop()


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)


def sampled(api, **kwargs):
    request = dict(model="tiny", messages=HI, temperature=1.0, seed=7, max_tokens=24) | kwargs
    return api.chat.completions.create(**request)


def streamed(api, **kwargs):
    """(content, reasoning, tool call deltas, finish_reason, usage) gathered from a streamed reply."""
    request = dict(model="tiny", messages=HI, temperature=1.0, seed=7, max_tokens=24, stream=True,
                   stream_options={"include_usage": True}) | kwargs
    content, reasoning, calls, finish, usage = [], [], [], None, None
    for chunk in api.chat.completions.create(**request):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    return "".join(content), "".join(reasoning), calls, finish, usage


def test_models_lists_every_backend(api):
    assert sorted(model.id for model in api.models.list().data) == ["scripted", "tiny"]


def test_sampled_reply_is_reproducible_and_counted(api):
    first, second = sampled(api), sampled(api)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].finish_reason == "length"  # a random model does not stop by itself in 24 tokens
    assert first.usage.completion_tokens == 24
    assert first.usage.total_tokens == first.usage.prompt_tokens + 24
    assert sampled(api, seed=8).choices[0].message.content != first.choices[0].message.content


def test_a_runaway_loop_is_cut_as_max_tokens_would_cut_it(api):
    """Greedy decoding of the random model falls into a loop: the reply ends there, well short of its budget, and
    says it was cut ("length"), streamed or not."""
    reply = sampled(api, temperature=0, max_tokens=400)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens < 400
    content, reasoning, calls, finish, usage = streamed(api, temperature=0, max_tokens=400)
    assert finish == "length" and usage.completion_tokens == reply.usage.completion_tokens


def test_stream_matches_the_plain_reply(api):
    reply = sampled(api).choices[0].message
    content, reasoning, calls, finish, usage = streamed(api)
    assert " ".join(content.split()) == " ".join((reply.content or "").split())
    assert " ".join(reasoning.split()) == " ".join(((reply.model_extra or {}).get("reasoning_content") or "").split())
    assert finish == "length" and usage.completion_tokens == 24


def test_tools_are_rendered_unless_tool_choice_is_none(api):
    plain = sampled(api, max_tokens=1).usage.prompt_tokens
    with_tools = sampled(api, max_tokens=1, tools=TOOLS).usage.prompt_tokens
    tool_choice_none = sampled(api, max_tokens=1, tools=TOOLS, tool_choice="none").usage.prompt_tokens
    assert with_tools > plain + 20  # the tool schema is in the system turn
    assert tool_choice_none == plain


def test_stop_string_cuts_the_text_and_the_generation(api):
    full = sampled(api, max_tokens=40)
    text = full.choices[0].message.content
    words = text.split()
    assert len(words) > 4, text
    stop = words[len(words) // 2]
    cut = sampled(api, max_tokens=40, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    assert 0 < cut.usage.completion_tokens < full.usage.completion_tokens  # generation stopped there: no waste
    content, _, _, finish, _ = streamed(api, max_tokens=40, stop=stop)
    assert content.strip() == cut.choices[0].message.content and finish == "stop"


def test_scripted_backend_reply_has_parsed_calls_and_reasoning(api, scripted):
    reply = api.chat.completions.create(model="scripted", messages=HI, tools=TOOLS)
    choice = choice_message = reply.choices[0]
    message = choice_message.message
    assert choice.finish_reason == "tool_calls"
    assert message.content == "Opening it now."
    assert message.model_extra["reasoning_content"] == "The user wants the title. I will open the page."
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("browser_navigate", '{"url": "https://example.com/"}'), ("browser_snapshot", "{}")]
    assert all(c.id.startswith("call_") and c.type == "function" for c in message.tool_calls)
    assert scripted.requests[-1].tools == TOOLS


def test_scripted_backend_stream_has_reasoning_then_content_then_calls(api):
    content, reasoning, calls, finish, _ = streamed(api, model="scripted", tools=TOOLS)
    assert reasoning == "The user wants the title. I will open the page."  # streamed as the parser reads it
    assert content == "Opening it now."
    assert [(c.index, c.function.name) for c in calls] == [(0, "browser_navigate"), (1, "browser_snapshot")]
    assert calls[0].function.arguments == '{"url": "https://example.com/"}'
    assert finish == "tool_calls"


def test_reply_after_a_prompt_that_opened_think(api):
    class OpenedThink(ScriptedBackend):
        def start(self, request):
            generation = super().start(request)
            generation.think_opened = True  # as when a template ends its generation prompt with "<think>\n"
            return generation

    base_url, stop = serve_in_thread(create_app({"thinker": OpenedThink("Two and two.\n</think>\n\nFour.")}))
    try:
        thinker = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        message = thinker.chat.completions.create(model="thinker", messages=HI).choices[0].message
        content, reasoning, _, finish, _ = streamed(thinker, model="thinker")
    finally:
        stop()
    assert (message.content, message.model_extra["reasoning_content"]) == ("Four.", "Two and two.")
    assert (content, reasoning.strip(), finish) == ("Four.", "Two and two.", "stop")


@pytest.fixture
def runaway(tiny_model_dir, tmp_path):
    """An endpoint whose model only a cancel can stop before its 100,000 tokens, and a way to see it stopped."""
    model, tokenizer = load_model(str(tiny_model_dir), tmp_path)
    model.generation_config.eos_token_id = None
    tokenizer.eos_token = None
    backend = TransformersBackend(model, tokenizer)
    backend.eos_ids = set()
    base_url, stop = serve_in_thread(create_app({"tiny": backend}))

    def generation_ended() -> bool:
        # the model thread runs one job at a time: this one waits until the generation has ended
        done, _ = wait([MODEL_THREAD.submit(lambda: None)], timeout=10)
        return bool(done)

    yield base_url, generation_ended
    stop()


def test_a_client_that_leaves_a_stream_stops_the_generation(runaway):
    base_url, generation_ended = runaway
    api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    stream = api.chat.completions.create(model="tiny", messages=HI, temperature=1.0, seed=7, max_tokens=100_000,
                                         stream=True)
    next(chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content)
    stream.close()
    assert generation_ended(), "the generation went on after the client left"


def test_a_client_that_hangs_up_on_a_plain_request_stops_the_generation(runaway):
    base_url, generation_ended = runaway
    body = {"model": "tiny", "messages": HI, "temperature": 1.0, "max_tokens": 100_000}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after a second and closes the connection
        httpx.post(f"{base_url}/chat/completions", json=body, timeout=1.0)
    assert generation_ended(), "the generation went on after the client hung up"


class CountingBackend(ScriptedBackend):
    """A scripted backend that counts the pieces it was asked for."""

    def start(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        self.produced = 0

        def pieces():
            for i in range(0, len(self.text), self.piece):
                self.produced += 1
                yield self.text[i:i + self.piece]

        return Generation(chunks=pieces(), prompt_tokens=1)


def test_generation_ends_where_the_tool_calls_end():
    """A model that goes on writing JSON after its call is stopped there, in a plain and a streamed reply."""
    call = '<tool_call>\n{"name": "browser_navigate", "arguments": {"url": "https://example.com/"}}\n</tool_call>\n'
    junk = '{"name": "browser_navigate", "arguments": {}}\n' * 200
    backend = CountingBackend(call + junk)
    base_url, stop = serve_in_thread(create_app({"loop": backend}))
    try:
        api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        reply = api.chat.completions.create(model="loop", messages=HI, tools=TOOLS)
        assert reply.choices[0].finish_reason == "tool_calls"
        assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["browser_navigate"]
        assert not reply.choices[0].message.content
        assert backend.produced * backend.piece < len(call) + 2 * backend.piece  # nothing generated past the call
        _, _, calls, finish, _ = streamed(api, model="loop", tools=TOOLS)
        assert finish == "tool_calls" and len(calls) == 1
        assert backend.produced * backend.piece < len(call) + 2 * backend.piece
        without_tools = api.chat.completions.create(model="loop", messages=HI)  # no tools offered: not cut
        assert without_tools.choices[0].message.content.count("browser_navigate") == 200
        assert backend.produced * backend.piece >= len(call + junk)
    finally:
        stop()


def test_two_clients_at_once_get_what_each_would_alone(api):
    """Requests are queued on the one model thread; prefix caches never leak between them."""
    from concurrent.futures import ThreadPoolExecutor

    questions = [[{"role": "user", "content": f"Question {n}: what is on the page {n}?"}] for n in range(4)]
    alone = [sampled(api, messages=q, temperature=0).choices[0].message.content for q in questions]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda q: sampled(api, messages=q, temperature=0).choices[0].message.content,
                                 questions * 2))
    assert together == alone * 2


def test_tool_choice_none_keeps_call_text_as_content(api, scripted):
    reply = api.chat.completions.create(model="scripted", messages=HI, tools=TOOLS, tool_choice="none")
    message = reply.choices[0].message
    assert scripted.requests[-1].tools is None
    assert not message.tool_calls and reply.choices[0].finish_reason == "stop"
    assert message.content.startswith("Opening it now.\n<tool_call>\n")
    assert '"name": "browser_snapshot"' in message.content


def test_history_with_tool_results_renders(api, scripted):
    history = HI + [
        {"role": "assistant", "content": None, "reasoning_content": "Open it.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "browser_navigate", "arguments": '{"url": "https://example.com/"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "- Page Title: Example Domain"}]
    reply = sampled(api, messages=history, tools=TOOLS, max_tokens=2)
    assert reply.usage.prompt_tokens > sampled(api, tools=TOOLS, max_tokens=2).usage.prompt_tokens + 10


@pytest.mark.parametrize("kwargs, status, fragment", [
    ({"model": "nope"}, 404, "model 'nope' is not served here"),
    ({"frequency_penalty": 0.5}, 400, "unsupported parameter(s): frequency_penalty"),
    ({"tool_choice": "required", "tools": TOOLS}, 400, "tool_choice 'required' is not supported"),
    ({"messages": []}, 400, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role 'robot'"),
    ({"temperature": 3}, 400, "'temperature' must be a number in [0, 2]"),
    ({"max_tokens": 0}, 400, "'max_tokens' must be at least 1"),
    ({"n": 2}, 400, "only n=1"),
])
def test_bad_requests_get_openai_errors(api, kwargs, status, fragment):
    with pytest.raises(openai.APIStatusError) as raised:
        api.chat.completions.create(**(dict(model="tiny", messages=HI) | kwargs))
    assert raised.value.status_code == status
    assert fragment in raised.value.body["message"]
    assert raised.value.body["type"] == "invalid_request_error"


def test_bad_json_body_and_unknown_route(server):
    reply = httpx.post(f"{server}/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert "not valid JSON" in reply.json()["error"]["message"]
    missing = httpx.get(f"{server}/completions")
    assert missing.status_code == 404 and "/v1/completions" in missing.json()["error"]["message"]


def test_probe_of_the_embedded_server(server):
    report = asyncio.run(probe(Endpoint(server, "tiny"), timeout=60, max_tokens=8))
    assert report.ok, report.summary()
    assert report.models == ["tiny", "scripted"] and report.model_listed
    assert report.tool_calls == "none" and report.reasoning_field == "none"  # greedy random text: blank lines
    assert set(report.latencies_s) == {"models", "chat", "tools"}
    scripted_report = asyncio.run(probe(Endpoint(server, "scripted"), timeout=60))
    assert scripted_report.tool_calls == "native" and scripted_report.reasoning_field == "reasoning_content"


def test_the_quick_probe_lists_models_and_asks_for_one_token(server):
    report = asyncio.run(probe(Endpoint(server, "tiny"), timeout=60, deep=False))
    assert report.ok, report.summary()
    assert set(report.latencies_s) == {"models", "chat"}
    assert report.tool_calls is None and report.reasoning_field is None  # "not tested"
    assert len(report.reply) <= 16  # one token of text


def test_adapter_is_served_beside_its_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter_dir = tmp_path / "my-adapter"
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # random: changes outputs
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(adapter_dir)

    backends = load_backends(str(tiny_model_dir), adapter_dir, tmp_path / "data")
    assert list(backends) == ["model", "my-adapter"]
    plain = load_backends(str(tiny_model_dir), None, tmp_path / "data")
    texts = {}
    for label, chosen in (("base", backends), ("plain", plain)):
        base_url, stop = serve_in_thread(create_app(chosen))
        try:
            api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
            for name in chosen:
                texts[label, name] = sampled(api, model=name).choices[0].message.content
        finally:
            stop()
    assert texts["base", "model"] == texts["plain", "model"]  # adapter disabled: the base weights exactly
    assert texts["base", "my-adapter"] != texts["base", "model"]


def test_context_limits_the_budget_and_refuses_a_prompt_that_fills_it(tiny_model_dir, tmp_path):
    """A 300-token context: max_tokens beyond the room left is shortened to it; a longer prompt is a 400 as vLLM's."""
    from tests.test_models import tiny_variant

    folder = tiny_variant(tiny_model_dir, tmp_path / "small-context", config={"max_position_embeddings": 300})
    base_url, stop = serve_in_thread(create_app(load_backends(str(folder), None, tmp_path)))
    try:
        api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        # sampled (seeded), since greedy decoding of the random model falls into a loop the engine cuts short
        reply = sampled(api, model="small-context", max_tokens=1000)
        assert reply.usage.total_tokens == 300 and reply.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError) as raised:
            sampled(api, model="small-context", messages=[{"role": "user", "content": "weather " * 300}])
    finally:
        stop()
    body = raised.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
    assert body["message"].startswith("This model's maximum context length is 300 tokens. However, your request has ")
    assert body["message"].endswith(" input tokens. Please reduce the length of the input messages.")


def test_adapter_folder_must_hold_an_adapter(tiny_model_dir, tmp_path):
    from mcpft.models import ModelError

    with pytest.raises(ModelError, match="no adapter_config.json"):
        load_backends(str(tiny_model_dir), tmp_path, tmp_path / "data")


@pytest.mark.slow
def test_smollm2_answers_through_the_endpoint():
    data_dir = Path(os.environ.get("MCPFT_TEST_CACHE", "/tmp/mcpft-test-cache"))
    backends = load_backends(None, None, data_dir)
    base_url, stop = serve_in_thread(create_app(backends))
    try:
        api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = api.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, temperature=0,
                                            max_tokens=30)
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        stream = api.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, temperature=0,
                                             max_tokens=30, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            reply.choices[0].message.content
    finally:
        stop()


def test_running_out_of_memory_while_generating_is_explained(tiny_model_dir, tmp_path):
    """The model's own forward pass runs out of RAM: the client hears what ran out, doing what, and what to lower."""
    model, tokenizer = load_model(str(tiny_model_dir), tmp_path)
    model.model.layers[0].register_forward_hook(lambda *_: torch.empty(2**62, dtype=torch.uint8))
    engine = Engine(model, fast=False)  # the model's own forward, where the hook plants the failure
    base_url, stop = serve_in_thread(create_app({"tiny": TransformersBackend(model, tokenizer, engine=engine)}))
    try:
        api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as raised:
            sampled(api, max_tokens=24)
        with pytest.raises(openai.APIError) as streamed_error:
            streamed(api, max_tokens=24)
    finally:
        stop()
    for message in (raised.value.body["message"], streamed_error.value.message):
        assert "generation failed: the RAM ran out while generating up to 24 tokens after a " in message
        assert "-token prompt. Lower max_tokens, shorten the conversation" in message
