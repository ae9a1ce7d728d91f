"""The OpenAI-compatible server with a real client: a uvicorn server on a free loopback port, the embedded
model on the CPU, and the official `openai` package (plus raw httpx for what a client library would not
send). Also the command line and a smoke run of the serving benchmark."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

import mini_infer
from helpers import TINY_DUMMY, assert_engine_quiet
from mini_infer.llm import LLM
from mini_infer.serve.api_server import build_app, cli, serve_in_thread
from mini_infer.serve.loadgen import run_load, summarize

ROOT = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
pytestmark = pytest.mark.slow  # loads the embedded model or starts servers


def test_command_line_help_and_loopback_default():
    result = subprocess.run(
        [sys.executable, "-m", "mini_infer.serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--port" in result.stdout and "0.0.0.0 to listen on every interface" in result.stdout


@pytest.fixture(scope="module")
def llm(smol):  # tests/conftest.py
    return smol


PENALIZED = dict(presence_penalty=1.0, frequency_penalty=0.5)  # OpenAI's fields
EXTENSIONS = dict(repetition_penalty=1.3, min_p=0.05, min_tokens=6)  # vLLM's


@pytest.fixture(scope="module")
def references(llm) -> dict:
    """The engine's own outputs, made before the server's thread owns the engine (one thread at a time)."""
    from mini_infer.sampling_params import SamplingParams

    def one(**params):
        return llm.generate(PROMPT, SamplingParams(temperature=0, **params), use_tqdm=False)[
            0
        ].outputs[0]

    return {
        "logprobs": one(max_tokens=4, logprobs=2),
        "penalized": one(max_tokens=12, **PENALIZED, **EXTENSIONS),
    }


@pytest.fixture(scope="module")
def url(llm, references):
    with serve_in_thread(build_app(llm)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert 0 < client.models.list().data[0].created <= time.time()  # when the server loaded it
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_completion_streamed_and_not(client, llm):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.text.startswith(" Paris") and choice.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        len(llm.get_tokenizer().encode(PROMPT)),
        12,
    )
    assert reply.object == "text_completion" and reply.model == MODEL
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks[:-1]) == choice.text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * 11 + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    token_ids = llm.get_tokenizer().encode(PROMPT)  # a prompt of token ids gives the same text
    assert (
        client.completions.create(model=MODEL, prompt=token_ids, max_tokens=12, temperature=0)
        .choices[0]
        .text
        == choice.text
    )


def test_chat_streamed_and_not(client, llm):
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    message = reply.choices[0].message
    assert message.role == "assistant" and "Paris" in message.content
    assert reply.usage.prompt_tokens == len(
        llm.get_tokenizer().apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=16, temperature=0, stream=True
        )
    )
    assert (
        chunks[0].choices[0].delta.role == "assistant"
        and chunks[0].object == "chat.completion.chunk"
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    # vLLM's extensions: the end-of-turn token's text, which is special, in the reply
    shown = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=16,
        temperature=0,
        extra_body={"skip_special_tokens": False, "include_stop_str_in_output": True},
    )
    assert reply.choices[0].finish_reason == "stop"  # at <|im_end|>, within 16 tokens
    assert shown.choices[0].message.content == message.content + "<|im_end|>"


def test_stop_strings_and_seed(client):
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=["."]
    )
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (" Paris", "stop")
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=["."], stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == " Paris"
    sampled = [
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=8,
            temperature=1.0,
            top_p=0.9,
            seed=7,
            extra_body={"top_k": 50},
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_n_completions_of_one_prompt(client, llm):
    sampled = dict(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=6,
        temperature=1.0,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    reply = client.completions.create(n=2, **sampled)
    assert [c.index for c in reply.choices] == [0, 1] and len({c.text for c in reply.choices}) == 2
    assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens == len(
        llm.get_tokenizer().encode(PROMPT)
    )
    # choice i is sampled with the seed seed + i, as a request of its own would be
    alone = [
        client.completions.create(n=1, **{**sampled, "seed": 3 + i}).choices[0].text
        for i in range(2)
    ]
    assert [c.text for c in reply.choices] == alone
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, n=2
    )
    assert [c.index for c in chat.choices] == [0, 1]
    # greedy: the same twice
    assert chat.choices[0].message.content == chat.choices[1].message.content
    with pytest.raises(openai.BadRequestError, match="n must be 1 with stream true"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=2, stream=True)
    assert_engine_quiet(llm, within=10)


def test_16_concurrent_clients_all_finish(url, client, llm):
    prompts = [
        "The capital of France is",
        "Once upon a time",
        "def fibonacci(n):",
        "Water boils at",
    ]
    alone = [
        client.completions.create(
            model=MODEL, prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for p in prompts
    ]

    async def sixteen_clients():
        async with openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="none", max_retries=0
        ) as aclient:

            async def one(i):
                stream = await aclient.completions.create(
                    model=MODEL,
                    prompt=prompts[i % 4],
                    max_tokens=8,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                chunks = [c async for c in stream]
                return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[
                    0
                ].finish_reason

            return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(sixteen_clients())
    assert [reason for _, reason in results] == ["length"] * 16
    # batched as alone (fp32 CPU)
    assert [text for text, _ in results] == [alone[i % 4] for i in range(16)]
    assert_engine_quiet(llm, within=10)


def test_load_generator_times_every_request(url, llm):
    bodies = [
        {"model": MODEL, "prompt": p, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        for p in ("The capital of France is", "Once upon a time", "Water boils at")
    ]
    timings, seconds = asyncio.run(run_load(url, bodies, num_clients=2))
    assert [t.num_output_tokens for t in timings] == [4, 4, 4]
    # at least two chunks: the gaps between them
    assert all(t.ttft > 0 and len(t.itl) >= 1 for t in timings)
    stats = summarize(timings, seconds)
    assert stats["requests_per_s"] > 0 and stats["ttft_ms_median"] <= stats["ttft_ms_p99"]
    assert_engine_quiet(llm, within=10)


def test_client_that_hangs_up_mid_stream_frees_its_blocks(client, llm):
    blocks = llm.engine.scheduler.block_manager
    stream = client.completions.create(
        model=MODEL,
        prompt="Once upon a time, " * 20,
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for _, _chunk in zip(range(2), stream):
        pass
    assert blocks.num_free_blocks < blocks.num_blocks
    stream.close()
    assert_engine_quiet(llm, within=5)  # long before its 400 tokens


def test_waiting_client_that_hangs_up_frees_its_blocks(url, llm):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)
    assert_engine_quiet(llm, within=5)


BAD = [  # (body, status, words of the message)
    ('{"model": "SmolLM2-135M-Instruct", "prompt": "Hi",', 400, "not valid JSON"),
    ("[1, 2]", 400, "invalid request body"),
    ({"model": MODEL}, 400, "prompt: Field required"),
    ({"model": MODEL, "prompt": "Hi", "temperature": -1}, 400, "temperature must be >= 0"),
    ({"model": MODEL, "prompt": "Hi", "top_p": 2}, 400, "top_p must be in (0, 1]"),
    ({"model": MODEL, "prompt": "Hi", "top_k": -3}, 400, "top_k must be -1 or 0"),
    (
        {"model": MODEL, "prompt": "Hi", "max_tokens": 0},
        400,
        "max_tokens must be a positive integer",
    ),
    (
        {"model": MODEL, "prompt": "Hi", "max_tokens": "many"},
        400,
        "max_tokens: Input should be a valid integer",
    ),
    ({"model": MODEL, "prompt": "Hi", "n": 2, "stream": True}, 400, "n must be 1 with stream true"),
    (
        {"model": MODEL, "prompt": "Hi", "n": 0},
        400,
        "n (the number of samples) must be a positive integer",
    ),
    ({"model": MODEL, "prompt": "Hi", "n": 17}, 400, "n must be at most 16"),
    (
        {"model": MODEL, "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop must be up to 4",
    ),
    ({"model": MODEL, "prompt": "Hi", "stop": ""}, 400, "stop must be a non-empty string"),
    (
        {"model": MODEL, "prompt": "Hi " * 600},
        400,
        "leaves no room for output in max_model_len 512",
    ),
    ({"model": MODEL, "prompt": ""}, 400, "the prompt is empty"),
    ({"model": MODEL, "prompt": [1, 10**9]}, 400, "token ids must be integers"),
    ({"model": MODEL, "prompt": "Hi", "logit_bias": {"Hi": 1}}, 400, "logit_bias keys must be"),
    ({"model": MODEL, "prompt": "Hi", "logit_bias": {"-3": 1}}, 400, "non-negative integer"),
    ('{"prompt": "Hi", "logit_bias": {"5": NaN}}', 400, "logit_bias values must be finite"),
    ('{"prompt": "Hi", "logit_bias": {"5": -Infinity}}', 400, "logit_bias values must be finite"),
    (
        {"model": MODEL, "prompt": "Hi", "allowed_token_ids": [2], "min_tokens": 1},
        400,
        "allowed_token_ids [2] are all stop or end-of-sequence tokens, which min_tokens 1 forbids",
    ),
    (
        {"model": MODEL, "prompt": "Hi", "allowed_token_ids": [10**9]},
        400,
        "allowed_token_ids must be in [0, 49152)",
    ),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt"),
    ({"model": "gpt-4", "prompt": "Hi"}, 404, "The model `gpt-4` does not exist."),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[w for *_, w in BAD])
def test_bad_completion_requests_get_openai_errors(url, body, status, words):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(
        f"{url}/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == status
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_bad_chat_requests_and_unknown_paths(url, client):
    with pytest.raises(openai.BadRequestError, match="unknown chat role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages="Hi")
    with pytest.raises(openai.BadRequestError, match="messages: List should have at least 1 item"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    assert httpx.post(f"{url}/v1/models").status_code == 405


def context_error(num_prompt_tokens: int, max_tokens: int) -> str:
    """vLLM's words for a request that does not fit in the context (max_model_len 512 here)."""
    return (
        f"This model's maximum context length is 512 tokens. However, you requested "
        f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} "
        "in the completion). Please reduce the length of the messages or completion."
    )


def test_a_request_longer_than_the_context_is_refused_before_it_runs(url, client, llm):
    tokenizer = llm.get_tokenizer()
    prompt = "Hi " * 500
    num_prompt = len(tokenizer.encode(prompt))
    room = 512 - num_prompt  # a few tokens: the accepted requests below stay short
    assert 0 < room < 16
    for stream in (False, True):  # refused before a stream starts, with a status that says so
        body = {"prompt": prompt, "max_tokens": room + 1, "stream": stream}
        r = httpx.post(f"{url}/v1/completions", json=body)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "max_tokens"
        assert error["message"] == context_error(num_prompt, room + 1)
    # prompt and max_tokens that fill the context exactly: accepted
    full = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=room, extra_body={"ignore_eos": True}
    )
    assert full.usage.completion_tokens == room and full.choices[0].finish_reason == "length"
    # no max_tokens: today's behaviour, the completion's default 16 cut short where the context ends
    cut = client.completions.create(model=MODEL, prompt=prompt, extra_body={"ignore_eos": True})
    assert cut.usage.completion_tokens == room and cut.choices[0].finish_reason == "length"
    # vLLM's truncate_prompt_tokens: the prompt's last 100 tokens leave room for the 20 asked for
    kept = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=20,
        extra_body={"ignore_eos": True, "truncate_prompt_tokens": 100},
    )
    assert kept.usage.prompt_tokens == 100 and kept.usage.completion_tokens == 20
    # a chat counts its prompt after the template
    messages = [{"role": "user", "content": "Hi " * 200}]
    num_chat = len(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    )
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=messages, **{field: 600})
        assert refused.value.body["message"] == context_error(num_chat, 600)
        assert refused.value.body["param"] == "max_tokens"
    assert_engine_quiet(llm, within=10)


def test_the_model_field_is_optional(url):
    # as in vLLM: without "model" (or with null), the served model answers; another name is a 404 above
    for path, body in (
        ("completions", {"prompt": PROMPT}),
        ("chat/completions", {"messages": CHAT, "model": None}),
    ):
        r = httpx.post(f"{url}/v1/{path}", json={**body, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == MODEL and r.json()["usage"]["completion_tokens"] == 2


def test_still_healthy_after_bad_requests(url, client):
    for body in ["{", "null", json.dumps({"model": MODEL, "prompt": "Hi", "temperature": "hot"})]:
        httpx.post(
            f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}
        )
    assert httpx.get(f"{url}/health").status_code == 200
    assert (
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
        .choices[0]
        .text
        == " Paris."
    )


# OpenAI's API as vLLM serves it (issue 16): null fields, fields refused by name, stream options, the CLI.


def test_null_fields_mean_the_default(client):
    # OpenAI's schema lets these fields be null (the openai package's request types mark them Optional);
    # the client sends an explicit None as null, and null means "the default".
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0)
    nulls = dict(
        top_p=None,
        n=None,
        stream=None,
        seed=None,
        stop=None,
        max_tokens=None,
        stream_options=None,
        best_of=None,
        echo=None,
        suffix=None,
        logit_bias=None,
        logprobs=None,
        presence_penalty=None,
        frequency_penalty=None,
    )
    reply = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, **nulls)
    assert reply.choices[0].text == greedy.choices[0].text and len(reply.choices) == 1
    assert reply.usage.completion_tokens == greedy.usage.completion_tokens == 16  # the default
    # temperature null is 1.0: the same sample as no temperature, with the same seed
    sampled = [
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, seed=7, **extra)
        .choices[0]
        .text
        for extra in ({}, {"temperature": None})
    ]
    assert sampled[0] == sampled[1]
    chat_nulls = dict(
        top_p=None,
        n=None,
        stream=None,
        seed=None,
        stop=None,
        max_tokens=None,
        stream_options=None,
        logit_bias=None,
        logprobs=None,
        top_logprobs=None,
        presence_penalty=None,
        frequency_penalty=None,
    )
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=8, **chat_nulls
    )
    alone = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=8
    )
    assert chat.choices[0].message.content == alone.choices[0].message.content
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, stream=True, n=None, stream_options=None
    )
    assert "".join(c.choices[0].text for c in stream) == greedy.choices[0].text


NOT_SUPPORTED = [  # (endpoint, field, a value that would change the output, words of the message)
    ("completions", "echo", True, "echo is not supported by this server"),
    ("completions", "suffix", " and so on.", "suffix is not supported by this server"),
    ("completions", "best_of", 2, "best_of is not supported by this server"),
    ("chat", "response_format", {"type": "json_object"}, "response_format is not supported"),
    (
        "chat",
        "tools",
        [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
        "tools is not supported by this server",
    ),
    ("chat", "tool_choice", "required", "tool_choice is not supported by this server"),
]


def create(client, endpoint: str, **fields):
    if endpoint == "chat":
        return client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, **fields)
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **fields)


@pytest.mark.parametrize(
    "endpoint,field,value,words", NOT_SUPPORTED, ids=[f"{e}-{f}" for e, f, *_ in NOT_SUPPORTED]
)
def test_fields_that_would_change_the_output_are_refused_by_name(
    client, endpoint, field, value, words
):
    with pytest.raises(openai.BadRequestError, match=words):
        create(client, endpoint, **{field: value})


def test_fields_that_ask_for_nothing_are_accepted(client, llm):
    # each refused field at the value that asks for nothing, and fields that do not change the output
    off = dict(
        temperature=0,
        logit_bias={},
        echo=False,
        best_of=1,
        presence_penalty=0,
        frequency_penalty=0.0,
        user="alice",
    )
    assert create(client, "completions", **off).choices[0].text == " Paris."
    chat_off = dict(
        logit_bias={},
        logprobs=False,
        top_logprobs=0,
        presence_penalty=0,
        response_format={"type": "text"},
        tool_choice="none",
        user="alice",
        metadata={"chapter": "8"},
    )
    alone = create(client, "chat", temperature=0).choices[0].message.content
    assert create(client, "chat", temperature=0, **chat_off).choices[0].message.content == alone
    assert_engine_quiet(llm, within=10)


def test_unknown_fields_are_refused_by_name(client, url):
    # length_penalty is a vLLM extension this server lacks: ignoring it would change the output unannounced
    with pytest.raises(openai.BadRequestError, match="length_penalty: unknown field"):
        create(client, "completions", extra_body={"length_penalty": 1.2})
    body = {"model": MODEL, "messages": CHAT, "temprature": 0}  # a typo
    r = httpx.post(f"{url}/v1/chat/completions", json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "temprature"
    assert error["message"].startswith("temprature: unknown field")
    body = {"model": MODEL, "prompt": PROMPT, "stream": True, "stream_options": {"usage": True}}
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.usage"


def stream_events(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/{path}", json=body) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def test_stream_options_need_stream_and_usage_is_null_until_the_last_chunk(client, url):
    for stream in ({}, {"stream": False}):
        with pytest.raises(openai.BadRequestError, match="stream_options needs stream true"):
            create(client, "completions", stream_options={"include_usage": True}, **stream)
    asks = {"max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True}
    for path, prompt in (
        ("completions", {"prompt": PROMPT}),
        ("chat/completions", {"messages": CHAT}),
    ):
        body = {"model": MODEL, **prompt, **asks}
        *chunks, last = stream_events(
            url, path, {**body, "stream_options": {"include_usage": True}}
        )
        assert len(chunks) == 4 and all(c["choices"] and c["usage"] is None for c in chunks)
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
        chunks = stream_events(url, path, {**body, "stream_options": {"include_usage": False}})
        assert len(chunks) == 4 and not any("usage" in c for c in chunks)  # as with no options


def test_mini_infer_command_shows_its_defaults():
    env = {**os.environ, "COLUMNS": "100"}
    result = subprocess.run(
        [sys.executable, "-m", "mini_infer", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines at COLUMNS
    assert text.startswith("usage: mini-infer serve [-h]") and "[MODEL]" in text.split("options")[0]
    for shown in ("(default: 127.0.0.1)", "(default: 8000)", "{auto,float32,bfloat16,float16}"):
        assert shown in text
    assert "(default: None)" not in text  # an option without a default says in words what it does
    twice = subprocess.run(
        [sys.executable, "-m", "mini_infer", "serve", "a.gguf", "--model", "b.gguf"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert twice.returncode == 2 and "--model: not allowed with argument MODEL" in twice.stderr


def test_mini_infer_version_and_description(capsys):
    with pytest.raises(SystemExit) as done:
        cli(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == mini_infer.__version__ + "\n"
    with pytest.raises(SystemExit) as done:
        cli(["--help"])
    assert done.value.code == 0
    assert "Mini-Infer, a small LLM inference engine" in capsys.readouterr().out


@pytest.mark.parametrize(
    "option,value,words",
    [
        ("--port", "-5", "argument --port: a port is 0 (any free one) to 65535, got -5"),
        ("--port", "65536", "argument --port: a port is 0 (any free one) to 65535, got 65536"),
        ("--max-num-seqs", "0", "argument --max-num-seqs: must be at least 1, got 0"),
        (
            "--max-num-batched-tokens",
            "-1",
            "argument --max-num-batched-tokens: must be at least 1, got -1",
        ),
        ("--max-model-len", "many", "argument --max-model-len: an integer is needed, got 'many'"),
        (
            "--gpu-memory-utilization",
            "1.5",
            "argument --gpu-memory-utilization: must be in (0, 1], got 1.5",
        ),
    ],
)
def test_bad_numbers_are_refused_before_the_model_loads(capsys, option, value, words):
    with pytest.raises(SystemExit) as refused:  # from argparse: the model is never loaded
        cli(["serve", option, value])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.splitlines()[-1] == f"mini-infer serve: error: {words}"


def test_errors_in_what_the_user_named_are_one_line_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as refused:  # a ValueError from building the engine
        cli(["serve", "--device", "tpu"])
    assert refused.value.code == 2
    assert capsys.readouterr().err == (
        "mini-infer serve: error: device must be 'cpu' or 'cuda' (or 'cuda:N'), got 'tpu'\n"
    )
    result = subprocess.run(  # the whole command, as a user runs it
        [sys.executable, "-m", "mini_infer", "serve", "/no/such/model"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.startswith("mini-infer serve: error: ") and "/no/such/model" in result.stderr
    )
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_mini_infer_serve_takes_the_model_as_an_argument():
    from mini_infer.loader import embedded_gguf_path

    gguf = str(embedded_gguf_path())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = ["serve", gguf, "--port", str(port), "--device", "cpu", "--max-model-len", "128"]
    command += ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
    server = subprocess.Popen(
        [sys.executable, "-m", "mini_infer", *command, "--log-level", "warning"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while server.poll() is None and time.monotonic() < deadline:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert server.poll() is None, server.stderr.read()[-3000:]
        # the model's id is the path it was served from: the argument reached the engine
        assert [m["id"] for m in models["data"]] == [gguf]
        assert models["data"][0]["max_model_len"] == 128
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serving_benchmark_runs_on_the_cpu(tmp_path):
    out = tmp_path / "serving.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/benchmark_serving.py",
            "--num-clients",
            "2",
            "--num-requests",
            "4",
            "--input-len",
            "16",
            "--max-tokens",
            "4",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["num_requests"] == 4 and row["output_tokens"] == 16 and row["requests_per_s"] > 0
    assert row["ttft_ms_median"] > 0 and row["itl_ms_median"] > 0 and row["device"]


def test_async_engine_with_async_scheduling_streams_only_known_tokens():
    # An engine that runs a step ahead has tokens in flight: the streams must see only the known ones.
    from mini_infer.sampling_params import RequestOutputKind, SamplingParams
    from mini_infer.serve.async_engine import AsyncLLMEngine

    ahead = LLM(
        dtype="float32",
        device="cpu",
        max_model_len=128,
        cpu_kv_bytes=16 << 20,
        async_scheduling=True,
    )
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["The capital of France is", "Once upon a time"]
    expected = [o.outputs[0] for o in ahead.generate(prompts, greedy, use_tqdm=False)]
    delta = SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )

    async def stream_both():
        engine = AsyncLLMEngine(ahead.engine)
        engine.start()

        async def one(prompt):
            return [o.outputs[0] async for o in await engine.generate(prompt, delta)]

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            engine.shutdown()

    for deltas, full in zip(asyncio.run(stream_both()), expected):
        assert "".join(d.text for d in deltas) == full.text
        assert [t for d in deltas for t in d.token_ids] == full.token_ids and all(
            len(d.token_ids) == 1 for d in deltas
        )


def test_logprobs_in_openais_shapes_equal_the_engines(client, llm, references):
    ref = references["logprobs"]
    sampled = [e[t] for e, t in zip(ref.logprobs, ref.token_ids)]
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    lp = reply.choices[0].logprobs
    assert lp.tokens == [s.decoded_token for s in sampled]
    assert lp.token_logprobs == pytest.approx([s.logprob for s in sampled])
    # greedy: the sampled token is the most likely, so it is among the 2
    assert [len(top) for top in lp.top_logprobs] == [2] * 4
    assert lp.text_offset == [0] + [sum(len(t) for t in lp.tokens[:i]) for i in range(1, 4)]
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, stream=True
        )
    )
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    # streamed text offsets count every token's text, also where a stop string holds text back
    held = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1, stop=[" of"])
    whole = client.completions.create(**held).choices[0].logprobs.text_offset
    streamed = client.completions.create(**held, stream=True)
    assert [
        o
        for c in streamed
        for o in (c.choices[0].logprobs.text_offset if c.choices[0].logprobs else [])
    ] == whole
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs true"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, top_logprobs=2)
    assert_engine_quiet(llm, within=10)


def test_penalties_and_vllms_sampling_extensions_reach_the_engine(client, references):
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, **PENALIZED, extra_body=EXTENSIONS
    )
    assert reply.choices[0].text == references["penalized"].text
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert reply.choices[0].text != plain.choices[0].text


def test_logit_bias_and_allowed_token_ids_reach_the_engine(client, llm):
    tokenizer = llm.get_tokenizer()
    paris, london = tokenizer.encode(" Paris")[0], tokenizer.encode(" London")[0]
    # +100 (clamped from 500, OpenAI's range) outweighs any logit of the model: every token is London
    forced = create(client, "completions", temperature=0, logit_bias={str(london): 500})
    assert forced.choices[0].text == tokenizer.decode([london, london])
    # -100 on the greedy choice (" Paris") makes the model take its second choice
    greedy = create(client, "completions", temperature=0, logprobs=2)
    second = greedy.choices[0].logprobs.top_logprobs[0]
    assert greedy.choices[0].logprobs.tokens[0] == " Paris" and len(second) == 2
    banned = create(client, "completions", temperature=0, logit_bias={str(paris): -100})
    assert banned.choices[0].text.startswith(min(second, key=second.get))
    allowed = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=6,
        temperature=1.0,
        extra_body={"allowed_token_ids": [paris, london]},
    )
    text = allowed.choices[0].message.content
    assert text and text.replace(" Paris", "").replace(" London", "") == ""
    assert_engine_quiet(llm, within=10)


def test_logprobs_of_a_model_without_a_tokenizer_name_token_ids(tmp_path):
    tiny = LLM(TINY_DUMMY, load_format="dummy", device="cpu", dtype="float32", cpu_kv_bytes=1 << 20)
    with serve_in_thread(build_app(tiny, "tiny")) as url:
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2, "logprobs": 1, "top_k": None}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        tokens = r.json()["choices"][0]["logprobs"]["tokens"]
        assert len(tokens) == 2 and all(t.startswith("token_id:") for t in tokens)
