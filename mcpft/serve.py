"""The embedded OpenAI-compatible endpoint: `/v1/models` and `/v1/chat/completions` on 127.0.0.1.

It answers the way vLLM does with `--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser`: the model
writes Hermes text, and the reply carries `tool_calls` and `reasoning_content` (also as streamed deltas). Each model
name is served by a `Backend`, which turns a request into streamed text; `TransformersBackend` runs a local model
(optionally a PEFT LoRA adapter beside its base), and anything else that follows the protocol (a scripted policy, say)
can be registered under another name without this module knowing it.

Deliberate choices: `tool_choice: "none"` leaves the tools out of the prompt and returns any call text as content;
stop strings are applied here (the backend is cancelled as soon as one appears, so no token is wasted); `max_tokens`
beyond the room the prompt leaves in the context is shortened to that room (finish_reason "length"), while a prompt
that fills the context alone is a 400, worded as vLLM's ("maximum context length is N tokens").
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, wait
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from transformers import TextIteratorStreamer

from mcpft.hermes import (
    ParsedAssistant, ThinkStreamSplitter, format_tool_calls, parse_assistant_text, tool_calls_end)
from mcpft.inference import Engine, Sampling, end_of_turn_ids, sampling_from_config
from mcpft.models import explain_out_of_memory

log = logging.getLogger(__name__)

# When a request names no max_tokens: an agent step is a tool call or a short answer (SmolLM2's demo calls are
# 30-80 tokens, a reasoning model's step a few hundred), and a model that loops on repeated JSON must end in seconds on
# a CPU, not minutes. Clients that need more (long reasoning) ask for it.
DEFAULT_MAX_TOKENS = 1024
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
MAX_STOP_STRINGS = 4
# Request keys we honour; anything else is refused so that a client never silently gets something it did not ask for.
ACCEPTED_KEYS = {
    "model", "messages", "tools", "tool_choice", "stream", "stream_options", "temperature", "top_p", "max_tokens",
    "max_completion_tokens", "stop", "seed", "n", "user", "parallel_tool_calls", "chat_template_kwargs", "logprobs",
}


class RequestError(Exception):
    """A request we refuse: becomes OpenAI-style error JSON with this status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


# ---------------------------------------------------------------------------------------------------------------
# The backend protocol


@dataclass
class GenerationRequest:
    """What a backend is asked for. `tools` is None when the prompt must not offer tools."""

    messages: list[dict]
    tools: list[dict] | None = None
    temperature: float | None = None  # None: the model's own generation defaults; 0: greedy
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    template_kwargs: dict = field(default_factory=dict)


@dataclass
class Generation:
    """A started generation. `chunks` yields text deltas (blocking); the counters are final once it is exhausted."""

    chunks: Iterable[str]
    think_opened: bool = False  # the prompt already opened <think>, so the text starts inside reasoning
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (end of turn) or "length" (max_tokens reached, or a runaway loop cut)
    cancel: Callable[[], None] = lambda: None  # stop generating early (client gone, stop string seen)


class Backend(Protocol):
    """Serves one model name: starts a generation for a request (raise RequestError for a request it refuses)."""

    def start(self, request: GenerationRequest) -> Generation: ...


# ---------------------------------------------------------------------------------------------------------------
# A transformers model as a backend


class ModelThread:
    """One long-lived thread for all torch work of the process: loading, generating.

    On CPU, PyTorch's OpenMP workers spin between operations only while a single thread's team exists; once a
    second thread has run torch operations, every team falls back to sleeping waits, and SmolLM2 on 2 cores
    generated 40% slower (measured: 31 vs 19 tokens/s). So models are loaded and run here, never on a thread per
    request. Jobs run one at a time, which also keeps a PEFT model's adapter switch safe between backends.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        """Queue `fn(*args, **kwargs)`; the future can be cancelled until it starts."""
        with self._start_lock:
            if self._thread is None:  # daemon: a stuck generation never blocks the interpreter's exit
                self._thread = threading.Thread(target=self._work, name="mcpft-model", daemon=True)
                self._thread.start()
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def run(self, fn: Callable, *args, **kwargs):
        """`fn(*args, **kwargs)` on the model thread, waiting for its result (called there, it just runs)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def _work(self) -> None:
        while True:
            future, fn, args, kwargs = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as error:  # the caller gets it from the future
                future.set_exception(error)


MODEL_THREAD = ModelThread()


class TransformersBackend:
    """A local causal LM, generating with `mcpft.inference.Engine` on `MODEL_THREAD`. With a PEFT model,
    `adapter=False` serves the base weights; a base and its adapter share one engine (one copy of the model) and
    never each other's cache."""

    def __init__(self, model, tokenizer, *, adapter: bool = True, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 engine: Engine | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.adapter = adapter
        self.default_max_tokens = default_max_tokens
        self.engine = engine or Engine(model)
        self.eos_ids = end_of_turn_ids(model, tokenizer)
        self.context = getattr(model.config, "max_position_embeddings", None)

    def start(self, request: GenerationRequest) -> Generation:
        prompt = self._render(request)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        max_new = self._max_new_tokens(request.max_tokens, len(prompt_ids))
        sampling = sampling_from_config(self.model.generation_config, request.temperature, request.top_p,
                                        request.seed)
        cancelled = threading.Event()
        streamer = _TokenStreamer(self.tokenizer, skip_special_tokens=True)
        generation = Generation(chunks=(), think_opened=prompt.rstrip().endswith("<think>"),
                                prompt_tokens=len(prompt_ids), cancel=cancelled.set)

        def chunks() -> Iterator[str]:
            job = MODEL_THREAD.submit(self._generate, prompt_ids, max_new, sampling, cancelled, streamer)
            try:
                yield from (text for text in streamer if text)
            finally:  # also when the consumer stops early (a stop string, a client gone): counters must be right
                cancelled.set()
                if not job.cancel():  # it started: it stops within a token
                    wait([job])
                generation.completion_tokens = streamer.count
                reached_max = streamer.count >= max_new and streamer.last_token not in self.eos_ids
                # a runaway loop is cut as max_tokens would have cut it
                generation.finish_reason = "length" if reached_max or streamer.looped else "stop"
            if job.exception():
                raise RuntimeError(str(job.exception())) from job.exception()

        generation.chunks = chunks()
        return generation

    def _render(self, request: GenerationRequest) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                request.messages, tools=request.tools, add_generation_prompt=True, tokenize=False,
                **request.template_kwargs)
        except Exception as error:  # a template raising on these messages is the request's problem, not ours
            raise RequestError(f"the chat template cannot render these messages: {error}", param="messages") from None

    def _max_new_tokens(self, asked: int | None, prompt_tokens: int) -> int:
        """The generation budget: what was asked (or the default), shortened to the room the context leaves. A prompt
        that leaves no room is refused as vLLM refuses it (clients such as `mcpft eval` count that as too long)."""
        room = self.context - prompt_tokens if self.context else None
        if room is not None and room <= 0:
            raise RequestError(f"This model's maximum context length is {self.context} tokens. However, your request "
                               f"has {prompt_tokens} input tokens. Please reduce the length of the input messages.",
                               param="messages", code="context_length_exceeded")
        wanted = asked or self.default_max_tokens
        return min(wanted, room) if room is not None else wanted

    def _generate(self, prompt_ids: list[int], max_new: int, sampling: Sampling, cancelled: threading.Event,
                  streamer: _TokenStreamer) -> None:
        doing = f"generating up to {max_new} tokens after a {len(prompt_ids)}-token prompt"
        advice = ("Lower max_tokens, shorten the conversation, or serve the model where there is more memory "
                  "(a smaller model, or a GPU).")
        try:
            with explain_out_of_memory(doing, advice):
                for token in self.engine.generate(prompt_ids, max_new, sampling, adapter=self.adapter):
                    if cancelled.is_set():  # checked before each token: a client gone stops it within one
                        break
                    streamer.put_token(token)
                    if token in self.eos_ids:
                        break
                else:
                    streamer.looped = self.engine.stats.looped
        finally:
            streamer.end()  # the consumer must not wait forever; an error it reads from the job


class _TokenStreamer(TextIteratorStreamer):
    """A text streamer fed one token at a time, counting them and remembering the last one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.count, self.last_token, self.looped = 0, None, False

    def put_token(self, token: int) -> None:
        self.count, self.last_token = self.count + 1, token
        self.put(torch.tensor([token]))


# ---------------------------------------------------------------------------------------------------------------
# Requests


@dataclass
class ChatRequest:
    """A validated `/v1/chat/completions` body."""

    model: str
    generation: GenerationRequest
    stop: list[str]
    stream: bool = False
    include_usage: bool = False
    parse_tools: bool = True  # False for tool_choice "none": call text stays content


def parse_chat_request(body) -> ChatRequest:
    """Validate a request body; RequestError names the offending parameter."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - ACCEPTED_KEYS)
    if unknown:
        raise RequestError(f"unsupported parameter(s): {', '.join(unknown)}", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' must be a non-empty string", param="model")
    tools = _tools(body.get("tools"))
    tool_choice = body.get("tool_choice") or "auto"
    if tool_choice not in ("auto", "none"):
        raise RequestError(f"tool_choice {tool_choice!r} is not supported: use 'auto' or 'none'", param="tool_choice")
    if (body.get("n") or 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    if body.get("logprobs"):
        raise RequestError("logprobs are not supported", param="logprobs")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise RequestError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    generation = GenerationRequest(
        messages=_messages(body.get("messages")),
        tools=tools if (tools and tool_choice == "auto") else None,
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 0, 1, low_open=True),
        max_tokens=_positive_int(body, max_key),
        seed=_integer(body, "seed"),
        template_kwargs=template_kwargs,
    )
    return ChatRequest(model=model, generation=generation, stop=_stops(body.get("stop")),
                       stream=_flag(body, "stream"), include_usage=bool(stream_options.get("include_usage")),
                       parse_tools=tool_choice == "auto")


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    return [_prompt_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def _prompt_message(message, where: str) -> dict:
    """A message as chat templates expect it: text content (never None), reasoning under `reasoning_content`."""
    if not isinstance(message, dict):
        raise RequestError(f"{where} must be an object", param=where)
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise RequestError(f"{where}.role {role!r} is not one of system, user, assistant, tool", param=where)
    prompt = dict(message, role="system" if role == "developer" else role,
                  content=_text_content(message.get("content"), where))
    if role == "assistant" and "reasoning_content" not in prompt and isinstance(prompt.get("reasoning"), str):
        prompt["reasoning_content"] = prompt.pop("reasoning")  # newer vLLM clients name it `reasoning`
    for i, call in enumerate(prompt.get("tool_calls") or []):
        if not (isinstance(call, dict) and isinstance((call.get("function") or {}).get("name"), str)):
            raise RequestError(f"{where}.tool_calls[{i}] needs function.name", param=where)
    return prompt


def _text_content(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"{where}.content[{i}]: only text parts are supported", param=where)
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{where}.content must be a string or a list of text parts", param=where)


def _tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list", param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(function, dict) or not function.get("name"):
            raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                               param="tools")
    return tools or None


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    return stops


def _number(body: dict, key: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            low < value <= high if low_open else low <= value <= high):
        raise RequestError(f"'{key}' must be a number in {'(' if low_open else '['}{low}, {high}]", param=key)
    return float(value)


def _integer(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise RequestError(f"'{key}' must be an integer", param=key)
    return value


def _positive_int(body: dict, key: str) -> int | None:
    value = _integer(body, key)
    if value is not None and value < 1:
        raise RequestError(f"'{key}' must be at least 1", param=key)
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool) and value is not None:
        raise RequestError(f"'{key}' must be true or false", param=key)
    return bool(value)


# ---------------------------------------------------------------------------------------------------------------
# Replies


class _StopWatch:
    """Cuts the text at the first stop string, or where a reply's Hermes tool calls are complete (`tool_calls`), and
    cancels the generation there, so that no token is spent past the answer."""

    def __init__(self, generation: Generation, stops: list[str], tool_calls: bool = False):
        self.generation, self.stops, self.tool_calls = generation, stops, tool_calls
        self.hit = False

    def deltas(self) -> Iterator[str]:
        chunks = iter(self.generation.chunks)
        hold = max((len(s) for s in self.stops), default=1) - 1  # a tail that might begin a stop string
        buffer, text = "", ""  # not yet sent; everything so far
        try:
            for delta in chunks:
                buffer, text = buffer + delta, text + delta
                cut = min((at for s in self.stops if (at := buffer.find(s)) != -1), default=-1)
                calls_end = tool_calls_end(text) if self.tool_calls else None
                if calls_end is not None:  # what follows the calls is dropped (only whitespace was sent of it)
                    cut = min(cut if cut != -1 else len(buffer), max(0, calls_end - (len(text) - len(buffer))))
                if cut != -1:
                    self.hit, buffer = True, buffer[:cut]
                    self.generation.cancel()
                    break
                if len(buffer) > hold:
                    yield buffer[:len(buffer) - hold]
                    buffer = buffer[len(buffer) - hold:]
        finally:
            if self.hit and hasattr(chunks, "close"):
                chunks.close()  # lets the backend finish its bookkeeping now
        if buffer:
            yield buffer

    def collect(self) -> str:
        return "".join(self.deltas())


def _stop_watch(chat: ChatRequest, generation: Generation) -> _StopWatch:
    offered_tools = chat.parse_tools and bool(chat.generation.tools)
    return _StopWatch(generation, chat.stop, tool_calls=offered_tools)


def final_message(text: str, think_opened: bool, parse_tools: bool) -> ParsedAssistant:
    """The reply parsed the way vLLM's hermes + reasoning parsers do; without tool parsing, calls stay text."""
    parsed = parse_assistant_text(text, think_opened=think_opened)
    if parse_tools or not parsed.tool_calls:
        return parsed
    content = "\n".join(part for part in (parsed.content, format_tool_calls(parsed.tool_calls)) if part)
    return ParsedAssistant(content=content, reasoning=parsed.reasoning, flags=parsed.flags)


def _finish_reason(parsed: ParsedAssistant, watch: _StopWatch) -> str:
    if parsed.tool_calls:
        return "tool_calls"
    return "stop" if watch.hit else watch.generation.finish_reason


def _usage(generation: Generation) -> dict:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


def _message_json(parsed: ParsedAssistant) -> dict:
    message = {"role": "assistant", "content": parsed.content or (None if parsed.tool_calls else "")}
    if parsed.reasoning:
        message["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        message["tool_calls"] = parsed.tool_calls
    return message


@dataclass
class _Reply:
    """Identity of one reply, shared by its chunks."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, parsed: ParsedAssistant, finish_reason: str, usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": _message_json(parsed), "logprobs": None,
                             "finish_reason": finish_reason}],
                "usage": usage}

    def chunk(self, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        payload = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": choices}
        if usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


_DELTA_KEY = {"content": "content", "reasoning": "reasoning_content"}


async def _sse(chat: ChatRequest, generation: Generation):
    """The reply as OpenAI chunks: role, reasoning/content deltas, then parsed tool calls, finish, [DONE]."""
    reply, watch = _Reply(chat.model), _stop_watch(chat, generation)
    splitter = ThinkStreamSplitter(think_opened=generation.think_opened)
    raw, streamed_content = [], []
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        async for delta in iterate_in_threadpool(watch.deltas()):
            raw.append(delta)
            for kind, text in splitter.feed(delta):
                streamed_content += [text] if kind == "content" else []
                yield reply.chunk({_DELTA_KEY[kind]: text})
        for kind, text in splitter.finish():
            streamed_content += [text] if kind == "content" else []
            yield reply.chunk({_DELTA_KEY[kind]: text})
        parsed = final_message("".join(raw), generation.think_opened, chat.parse_tools)
        streamed = "".join(streamed_content)
        if parsed.content.startswith(streamed) and len(parsed.content) > len(streamed):
            yield reply.chunk({"content": parsed.content[len(streamed):]})  # e.g. call text kept as content
        for index, call in enumerate(parsed.tool_calls):
            yield reply.chunk({"tool_calls": [{"index": index, **call}]})
        yield reply.chunk({}, finish_reason=_finish_reason(parsed, watch))
        if chat.include_usage:
            yield reply.chunk({}, usage=_usage(generation))
    except Exception as error:  # headers are sent: the error can only travel as an event
        log.exception("generation failed")
        yield f"data: {json.dumps(_error_body(f'generation failed: {error}', 'server_error'))}\n\n"
    finally:
        generation.cancel()  # a client that went away stops the generation
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------------
# The app


def _error_body(message: str, error_type: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _error(error: RequestError) -> JSONResponse:
    error_type = "invalid_request_error" if error.status < 500 else "server_error"
    return JSONResponse(_error_body(error.message, error_type, error.param, error.code), status_code=error.status)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return _error(RequestError(f"{request.method} {request.url.path}: {error.detail}", status=error.status_code))


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("request failed")
    return _error(RequestError(f"internal error: {error}", status=500))


async def _collect_while_connected(request: Request, watch: _StopWatch) -> str:
    """The whole reply; a client that hangs up meanwhile cancels the generation (within a poll and a token)."""
    collecting = asyncio.ensure_future(run_in_threadpool(watch.collect))
    while not collecting.done():
        await asyncio.wait({collecting}, timeout=DISCONNECT_POLL_S)
        if not collecting.done() and await request.is_disconnected():
            watch.generation.cancel()
    return collecting.result()


def create_app(backends: Mapping[str, Backend]) -> Starlette:
    """The OpenAI-compatible app serving each backend under its model name."""
    if not backends:
        raise ValueError("create_app needs at least one backend")
    backends = dict(backends)
    created = int(time.time())

    async def list_models(request: Request) -> JSONResponse:
        data = [{"id": name, "object": "model", "created": created, "owned_by": "mcpft"} for name in backends]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _error(RequestError(f"the request body is not valid JSON: {error}"))
        try:
            chat = parse_chat_request(body)
            if chat.model not in backends:
                raise RequestError(f"model {chat.model!r} is not served here; models: {', '.join(backends)}",
                                   param="model", status=404, code="model_not_found")
            generation = await run_in_threadpool(backends[chat.model].start, chat.generation)
        except RequestError as error:
            return _error(error)
        if chat.stream:
            return StreamingResponse(_sse(chat, generation), media_type="text/event-stream")
        watch = _stop_watch(chat, generation)
        try:
            text = await _collect_while_connected(request, watch)
        except Exception as error:  # answered here: the catch-all 500 handler re-raises, which drops the connection
            log.exception("generation failed")
            return _error(RequestError(f"generation failed: {error}", status=500))
        parsed = final_message(text, generation.think_opened, chat.parse_tools)
        return JSONResponse(_Reply(chat.model).completion(parsed, _finish_reason(parsed, watch), _usage(generation)))

    routes = [Route("/v1/models", list_models, methods=["GET"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _internal_error})


# ---------------------------------------------------------------------------------------------------------------
# Running it


DEFAULT_PORT = 8008


def load_backends(model_spec: str | None, adapter: str | Path | None, data_dir: Path) -> dict[str, Backend]:
    """The base model under its name and, with `adapter`, the LoRA adapter (same weights) under the adapter's name.

    Loaded on the model thread (see ModelThread), where they will generate.
    """
    return MODEL_THREAD.run(_load_backends, model_spec, adapter, data_dir)


def _load_backends(model_spec: str | None, adapter: str | Path | None, data_dir: Path) -> dict[str, Backend]:
    from mcpft.models import ModelError, adapter_problem, load_model, model_name

    model, tokenizer = load_model(model_spec, data_dir)
    base_name = model_name(model_spec)
    if adapter is None:
        return {base_name: TransformersBackend(model, tokenizer)}
    adapter = Path(adapter).expanduser()
    if problem := adapter_problem(adapter):
        raise ModelError(f"adapter {str(adapter)!r}: {problem}")
    adapter_name = adapter.resolve().name
    if adapter_name == base_name:
        raise ModelError(f"adapter {str(adapter)!r} has the base model's name {base_name!r}; rename its folder")
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter)
    peft_model.eval()
    engine = Engine(peft_model)
    return {base_name: TransformersBackend(peft_model, tokenizer, adapter=False, engine=engine),
            adapter_name: TransformersBackend(peft_model, tokenizer, adapter=True, engine=engine)}


def serve_in_thread(app, port: int = 0, host: str = "127.0.0.1") -> tuple[str, Callable[[], None]]:
    """Serve `app` from a background thread; returns its base URL (…/v1) and a function that stops it.

    The socket is bound and listening before this returns, so the URL takes connections at once.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mcpft-serve", daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return f"http://{host}:{sock.getsockname()[1]}/v1", stop


def run_server(model_spec: str | None, adapter: str | Path | None = None, host: str = "127.0.0.1",
               port: int = DEFAULT_PORT, data_dir: Path | None = None,
               extra_backends: Mapping[str, Backend] | None = None) -> None:
    """`mcpft serve`: load the model (and adapter), then serve until interrupted. Logs go to stderr only."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from mcpft.config import data_dir as default_data_dir

    backends = load_backends(model_spec, adapter, Path(data_dir) if data_dir else default_data_dir())
    backends.update(extra_backends or {})
    log_config = deepcopy(LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout belongs to the CLI's --json
    print(f"mcpft serve: http://{host}:{port}/v1 serving {', '.join(backends)}", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(create_app(backends), host=host, port=port, log_config=log_config)).run()
