"""The official `openai` Python SDK against a live Sluice: chat completions as a user writes them.

Run by tests/e2e/openai.rs with the SDK venv of scripts/openai-sdks.sh:
    python chat.py <scenario> [args...]
with SLUICE_BASE_URL (ending in /v1) and the keys the scenario needs in the environment. Each
scenario checks what the SDK shows (types, exceptions, headers) itself and prints one JSON object
with what the Rust side checks against the database (request ids, texts, attempt counts).
"""

import json
import os
import sys
import time

import jsonschema
import openai
from openai.types.chat import ChatCompletion

BASE = os.environ["SLUICE_BASE_URL"]


REFUSALS = []


def client(key_env="SLUICE_KEY", **kwargs):
    """A client on Sluice, counting every HTTP attempt it makes in `attempts` (and noting the
    `retry-after-ms` of every 429 in REFUSALS)."""
    attempts = []

    def count(request):
        if request.url.path.endswith("/chat/completions"):
            attempts.append(time.monotonic())

    def refused(response):
        if response.status_code == 429 and "retry-after-ms" in response.headers:
            REFUSALS.append(float(response.headers["retry-after-ms"]) / 1000)

    http = openai.DefaultHttpxClient(event_hooks={"request": [count], "response": [refused]})
    c = openai.OpenAI(base_url=BASE, api_key=os.environ[key_env], http_client=http, **kwargs)
    return c, attempts


def ask(text, **extra):
    return [{"role": "user", "content": text}]


def out(result):
    print(json.dumps(result))


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def basic(model="default", key_env="SLUICE_KEY"):
    """A plain completion validates as the SDK's ChatCompletion; a body field cannot raise the lane."""
    c, _ = client(key_env)
    raw = c.chat.completions.with_raw_response.create(
        model=model,
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": "What is a sluice?"},
        ],
        max_completion_tokens=12,
        stop="NEVER-SEEN",
        user="end-user-1",
        metadata={"purpose": "test"},
        extra_body={"service_tier": "priority"},
    )
    body = raw.http_response.json()
    validated = ChatCompletion.model_validate(body)
    completion = raw.parse()
    check(completion.id == validated.id, "parse and validate agree")
    check(completion.object == "chat.completion", completion.object)
    check(completion.choices[0].message.role == "assistant", "assistant")
    check(completion.choices[0].finish_reason in ("stop", "length"), completion.choices[0].finish_reason)
    check(completion.usage.total_tokens > 0, "usage")
    check(completion._request_id == raw.headers["x-request-id"], "request id header")
    out(
        {
            "request_id": completion._request_id,
            "content": completion.choices[0].message.content,
            "lane": raw.headers.get("x-sluice-lane"),
            "model": completion.model,
        }
    )


def stream(model="default"):
    """Chunks share one id, the role comes first, finish_reason last, then the usage chunk."""
    c, _ = client()
    s = c.chat.completions.create(
        model=model,
        messages=ask("Stream me a reply, please."),
        stream=True,
        stream_options={"include_usage": True},
    )
    started = time.monotonic()
    chunks = list(s)
    elapsed = time.monotonic() - started
    check(len(chunks) >= 3, f"{len(chunks)} chunks")
    ids = {ch.id for ch in chunks}
    check(len(ids) == 1, f"ids {ids}")
    with_choices = [ch for ch in chunks if ch.choices]
    check(with_choices[0].choices[0].delta.role == "assistant", "role first")
    check(with_choices[-1].choices[0].finish_reason == "stop", "finish last")
    check(all(ch.choices[0].finish_reason is None for ch in with_choices[:-1]), "finish only last")
    last = chunks[-1]
    check(last.choices == [] and last.usage is not None and last.usage.total_tokens > 0, "usage chunk")
    check(all(ch.usage is None for ch in chunks[:-1]), "usage only on the last chunk")
    text = "".join(ch.choices[0].delta.content or "" for ch in with_choices)
    texts = [ch.choices[0].delta.content for ch in with_choices if ch.choices[0].delta.content]
    out(
        {
            "request_id": s.response.headers["x-request-id"],
            "text": text,
            "pieces": len(texts),
            "usage": last.usage.model_dump(exclude_none=True),
            "elapsed": elapsed,
        }
    )


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "temperature": {"type": "number"},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "temperature", "sunny"],
    "additionalProperties": False,
}


def tools(model, streamed="no"):
    """A tool call comes back as tool_calls; the follow-up with its result completes; a
    json_schema answer parses and validates."""
    c, _ = client()
    messages = ask("What is the weather in Paris?")
    if streamed == "yes":
        s = c.chat.completions.create(model=model, messages=messages, tools=[WEATHER], stream=True)
        calls = {}
        finish = None
        for ch in s:
            for choice in ch.choices:
                for call in choice.delta.tool_calls or []:
                    entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                    entry["id"] = call.id or entry["id"]
                    if call.function and call.function.name:
                        entry["name"] = call.function.name
                    if call.function and call.function.arguments:
                        entry["arguments"] += call.function.arguments
                finish = choice.finish_reason or finish
        check(finish == "tool_calls", f"finish {finish}")
        check(len(calls) == 1, f"calls {calls}")
        call = calls[0]
        assistant = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
            ],
        }
        name, arguments, call_id = call["name"], call["arguments"], call["id"]
        first_id = s.response.headers["x-request-id"]
    else:
        first = c.chat.completions.create(model=model, messages=messages, tools=[WEATHER], tool_choice="auto")
        choice = first.choices[0]
        check(choice.finish_reason == "tool_calls", f"finish {choice.finish_reason}")
        check(choice.message.tool_calls and len(choice.message.tool_calls) == 1, f"{choice.message}")
        call = choice.message.tool_calls[0]
        assistant = choice.message  # appended as the SDK's own object, as users do
        name, arguments, call_id = call.function.name, call.function.arguments, call.id
        first_id = first._request_id
    check(name == "get_weather", name)
    args = json.loads(arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    follow = c.chat.completions.create(
        model=model,
        messages=messages + [assistant, {"role": "tool", "tool_call_id": call_id, "content": "22 degrees and sunny"}],
        tools=[WEATHER],
    )
    text = follow.choices[0].message.content
    check(follow.choices[0].finish_reason == "stop", follow.choices[0].finish_reason)
    check("22 degrees and sunny" in text, text)

    structured = c.chat.completions.create(
        model=model,
        messages=ask("Describe the weather in Paris as JSON."),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": ANSWER_SCHEMA, "strict": True},
        },
    )
    content = structured.choices[0].message.content
    jsonschema.validate(json.loads(content), ANSWER_SCHEMA)
    obj = c.chat.completions.create(
        model=model, messages=ask("Any JSON object, please."), response_format={"type": "json_object"}
    )
    check(isinstance(json.loads(obj.choices[0].message.content), dict), obj.choices[0].message.content)
    out(
        {
            "first": first_id,
            "follow_up": follow._request_id,
            "structured": structured._request_id,
            "arguments": args,
            "follow_text": text,
        }
    )


def errors(model="default"):
    """Each failure reaches the SDK as the exception its status means, with all four keys."""
    bad, attempts = client(key_env="SLUICE_KEY", max_retries=2)
    bad.api_key = "sk_sluice_not_a_key"
    try:
        bad.chat.completions.create(model=model, messages=ask("hi"))
        raise AssertionError("a bad key was accepted")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, e.status_code)
        check(set(e.body) >= {"message", "type", "param", "code"}, e.body)
        check(e.request_id, "a request id")
    c, attempts = client()
    try:
        c.chat.completions.create(model="no-such-model", messages=ask("hi"))
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        check(e.code == "model_not_found" and e.param == "model", e.body)
    try:
        c.chat.completions.create(model=model, messages=ask("hi"), n=2)
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        check(e.param == "n", e.body)
    try:
        c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}],
        )
        raise AssertionError("audio was accepted")
    except openai.BadRequestError as e:
        check(e.param == "messages[0].content[0].type", e.body)
    out({"attempts": len(attempts)})


def failing(model, kind):
    """A job that went dead reaches the SDK once (Sluice already retried), with the provider's
    message: `rejected` (a provider 400) or `broken` (a provider 500)."""
    c, attempts = client()
    try:
        c.chat.completions.create(model=model, messages=ask(f"this one will fail ({kind})"))
        raise AssertionError("a failing job succeeded")
    except openai.BadRequestError as e:
        check(kind == "rejected", f"400 for {kind}")
        message, status, rid = e.message, e.status_code, e.request_id
    except openai.InternalServerError as e:
        check(kind == "broken", f"{e.status_code} for {kind}")
        message, status, rid = e.message, e.status_code, e.request_id
    out({"attempts": len(attempts), "message": message, "status": status, "request_id": rid})


def stream_failing(model):
    """A streamed job that dies after the 200 ends the stream with an error frame: the SDK's
    iterator raises APIError with the provider's message, after the chunks so far."""
    c, attempts = client()
    s = c.chat.completions.with_raw_response.create(
        model=model, messages=ask("this stream will fail"), stream=True
    )
    rid = s.headers["x-request-id"]
    check(s.http_response.status_code == 200, s.http_response.status_code)
    chunks = 0
    try:
        for _ in s.parse():
            chunks += 1
        raise AssertionError("the stream ended without an error")
    except openai.APIError as e:
        message = e.message
    out({"request_id": rid, "message": message, "chunks": chunks, "attempts": len(attempts)})


def quota(window):
    """Over a quota: a short window's Retry-After is honoured and the retry succeeds; a long
    window's refusal raises RateLimitError after one attempt."""
    c, attempts = client(max_retries=2)
    first = c.chat.completions.create(model="default", messages=ask("the quota's first"))
    started = time.monotonic()
    if window == "short":
        second = c.chat.completions.create(model="default", messages=ask("over the quota, then not"))
        waited = attempts[-1] - attempts[-2]
        out({"attempts": len(attempts), "waited": waited, "retry_after": REFUSALS[-1],
             "elapsed": time.monotonic() - started,
             "second": second._request_id, "first": first._request_id})
        return
    try:
        c.chat.completions.create(model="default", messages=ask("over the quota for long"))
        raise AssertionError("the quota let it through")
    except openai.RateLimitError as e:
        out({"attempts": len(attempts), "retry_after": e.response.headers.get("retry-after"),
             "should_retry": e.response.headers.get("x-should-retry"), "code": e.code})


def reuse(model="default"):
    """Sampled requests are fresh samples; deterministic ones are answered from the cache."""
    c, _ = client()
    ids, caches = [], []
    for temperature in (1.0, 1.0, 0.0, 0.0):
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=ask("Same question every time."), temperature=temperature
        )
        ids.append(raw.parse()._request_id)
        caches.append(raw.headers.get("x-sluice-cache"))
    out({"ids": ids, "caches": caches})


def timeout(seconds, retries):
    """A request whose client gives up: with the lane paused nothing can answer in time."""
    c, attempts = client(timeout=float(seconds), max_retries=int(retries))
    started = time.monotonic()
    try:
        r = c.chat.completions.create(model="default", messages=ask("held while the lane is paused"))
        out({"outcome": "ok", "request_id": r._request_id, "attempts": len(attempts),
             "elapsed": time.monotonic() - started, "content": r.choices[0].message.content})
    except openai.APITimeoutError:
        out({"outcome": "timeout", "attempts": len(attempts), "elapsed": time.monotonic() - started})
    except openai.APIStatusError as e:
        out({"outcome": "status", "status": e.status_code, "code": e.code, "request_id": e.request_id,
             "retry_after": e.response.headers.get("retry-after"), "attempts": len(attempts),
             "elapsed": time.monotonic() - started})


def burst(n, pause):
    """n completions one after another, `pause` seconds apart: their request ids."""
    c, _ = client()
    ids = []
    for i in range(int(n)):
        ids.append(c.chat.completions.create(model="default", messages=ask(f"pro question {i}"))._request_id)
        time.sleep(float(pause))
    out({"ids": ids})


def models():
    c, _ = client()
    ids = [m.id for m in c.models.list()]
    one = c.models.retrieve(ids[0])
    check(one.id == ids[0] and one.object == "model", one)
    try:
        c.models.retrieve("no-such-model")
        raise AssertionError("an unknown model was found")
    except openai.NotFoundError:
        pass
    out({"models": ids})


if __name__ == "__main__":
    scenario, args = sys.argv[1], sys.argv[2:]
    globals()[scenario](*args)
