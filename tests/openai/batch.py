"""The official `openai` Python SDK's Files and Batch API against a live Sluice.

Run by tests/e2e/openai_batch.rs with the SDK venv of scripts/openai-sdks.sh:
    python batch.py <scenario> [args...]
with SLUICE_BASE_URL (ending in /v1) and SLUICE_KEY (and SLUICE_OTHER_KEY: another tenant's).
Each scenario checks what the SDK shows itself and prints one JSON object for the Rust side.
"""

import io
import json
import os
import sys
import time

import openai
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion

BASE = os.environ["SLUICE_BASE_URL"]
ENDED = {"completed", "failed", "expired", "cancelled"}


def client(key_env="SLUICE_KEY"):
    return openai.OpenAI(base_url=BASE, api_key=os.environ[key_env], max_retries=5)


def out(result):
    print(json.dumps(result))


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def line(i, model="default", **body):
    payload = {"model": model, "messages": [{"role": "user", "content": f"batch question {i}"}], "max_tokens": 8}
    payload.update(body)
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": payload}


def jsonl(lines):
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def upload(c, data, name="batch.jsonl"):
    f = c.files.create(file=(name, io.BytesIO(data)), purpose="batch")
    FileObject.model_validate(f.model_dump())
    check(f.purpose == "batch" and f.bytes == len(data), f)
    return f


def wait(c, batch_id, timeout=240, seen=None):
    deadline = time.monotonic() + timeout
    while True:
        b = c.batches.retrieve(batch_id)
        Batch.model_validate(b.model_dump())
        if seen is not None and (not seen or seen[-1] != b.status):
            seen.append(b.status)
        if b.status in ENDED:
            return b
        check(time.monotonic() < deadline, f"batch {batch_id} still {b.status}")
        time.sleep(0.2)


def read_lines(c, file_id):
    if file_id is None:
        return []
    data = c.files.content(file_id).content
    return [json.loads(x) for x in data.decode().splitlines() if x.strip()]


def results(c, b):
    """The output and error files' lines, checked for shape."""
    output = read_lines(c, b.output_file_id)
    errors = read_lines(c, b.error_file_id)
    for o in output:
        check(o["error"] is None and o["response"]["status_code"] == 200, o)
        ChatCompletion.model_validate(o["response"]["body"])
        check(o["id"].startswith("batch_req_"), o["id"])
    return output, errors


def create(n, model="default", wait_for_end="yes", metadata="yes"):
    """A batch of n lines: created in_progress, then (when waited for) completed with every
    custom_id once, in input order."""
    n = int(n)
    c = client()
    data = jsonl([line(i, model) for i in range(n)])
    f = upload(c, data)
    check(c.files.retrieve(f.id).id == f.id, "retrieve")
    check(c.files.content(f.id).content == data, "the bytes come back as uploaded")
    b = c.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "e2e"} if metadata == "yes" else None,
    )
    check(b.status in ("validating", "in_progress"), b.status)
    check(b.expires_at - b.created_at == int(os.environ.get("SLUICE_WINDOW", "86400")), (b.created_at, b.expires_at))
    check(b.request_counts.total == n, b.request_counts)
    if wait_for_end != "yes":
        out({"batch_id": b.id, "input_file_id": f.id})
        return
    seen = [b.status]
    b = wait(c, b.id, seen=seen)
    output, errors = results(c, b)
    out(
        {
            "batch_id": b.id,
            "status": b.status,
            "statuses": seen,
            "counts": [b.request_counts.total, b.request_counts.completed, b.request_counts.failed],
            "custom_ids": [o["custom_id"] for o in output],
            "request_ids": [o["response"]["request_id"] for o in output],
            "errors": len(errors),
            "output_file_id": b.output_file_id,
            "metadata": b.metadata,
        }
    )


def finish(batch_id):
    """Wait for a batch made earlier (maybe through another API node) and read its files."""
    c = client()
    b = wait(c, batch_id)
    output, errors = results(c, b)
    out(
        {
            "status": b.status,
            "counts": [b.request_counts.total, b.request_counts.completed, b.request_counts.failed],
            "custom_ids": [o["custom_id"] for o in output],
            "error_ids": [e["custom_id"] for e in errors],
        }
    )


BAD = {
    # kind: (lines, the bad line's number)
    "duplicate": (lambda: [line(0), line(1), line(0)], 3),
    "url": (lambda: [line(0), dict(line(1), url="/v1/embeddings")], 2),
    "stream": (lambda: [line(0), line(1), line(2, stream=True)], 3),
    "model": (lambda: [line(0, model="no-such-model")], 1),
    "method": (lambda: [line(0), dict(line(1), method="GET")], 2),
    "n": (lambda: [line(0), line(1, n=3)], 2),
}


def invalid(kind):
    """An invalid input line fails the batch, naming the line; no job is made."""
    c = client()
    if kind == "json":
        data, bad_line = b'{"custom_id": "a", "method": "POST"\n', 1
    else:
        lines, bad_line = BAD[kind]
        data = jsonl(lines())
    f = upload(c, data)
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    check(b.status == "failed", b.status)
    check(b.failed_at is not None, b)
    check(b.errors is not None and b.errors.data, b.errors)
    first = b.errors.data[0]
    check(first.line == bad_line, f"{kind}: line {first.line}, wanted {bad_line}: {first}")
    out({"batch_id": b.id, "code": first.code, "line": first.line, "param": first.param})


def mixed(n_ok, n_bad):
    """Lines whose pool answers 400 go to the error file; the batch still completes."""
    c = client()
    lines = [line(i) for i in range(int(n_ok))] + [line(1000 + i, model="rejecting") for i in range(int(n_bad))]
    f = upload(c, jsonl(lines))
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = wait(c, b.id)
    output, errors = results(c, b)
    for e in errors:
        check(e["response"]["status_code"] == 400, e)
        check("Simulated client error" in e["response"]["body"]["error"]["message"], e)
    out(
        {
            "status": b.status,
            "counts": [b.request_counts.total, b.request_counts.completed, b.request_counts.failed],
            "ok": [o["custom_id"] for o in output],
            "bad": [e["custom_id"] for e in errors],
        }
    )


def cancel(n):
    """Cancel keeps what finished and marks the rest batch_cancelled; a second cancel of the
    ended batch is refused."""
    c = client()
    f = upload(c, jsonl([line(i, model="slow") for i in range(int(n))]))
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while c.batches.retrieve(b.id).request_counts.completed < 2:
        check(time.monotonic() < deadline, "no line finished")
        time.sleep(0.2)
    cancelling = c.batches.cancel(b.id)
    check(cancelling.status == "cancelling" and cancelling.cancelling_at, cancelling)
    b = wait(c, b.id)
    check(b.status == "cancelled" and b.cancelled_at, b)
    output, errors = results(c, b)
    for e in errors:
        check(e["response"] is None and e["error"]["code"] == "batch_cancelled", e)
    try:
        c.batches.cancel(b.id)
        raise AssertionError("an ended batch was cancelled again")
    except openai.BadRequestError as e:
        refused = e.code
    out({"status": b.status, "ok": [o["custom_id"] for o in output], "cancelled": [e["custom_id"] for e in errors],
         "counts": [b.request_counts.total, b.request_counts.completed, b.request_counts.failed], "refused": refused})


def expire(n):
    """A batch whose window ends first expires; its unfinished lines say batch_expired."""
    c = client()
    f = upload(c, jsonl([line(i) for i in range(int(n))]))
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = wait(c, b.id)
    check(b.status == "expired" and b.expired_at, b)
    output, errors = results(c, b)
    for e in errors:
        check(e["response"] is None and e["error"]["code"] == "batch_expired", e)
    out({"status": b.status, "expired": len(errors), "ok": len(output), "batch_id": b.id})


def listing(n):
    """n batches list newest first, 10 a page; another tenant sees none of them or their files."""
    c = client()
    made = []
    for i in range(int(n)):
        f = upload(c, jsonl([line(i)]), name=f"one-{i}.jsonl")
        made.append(c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    first = c.batches.list(limit=10)
    check(len(first.data) == 10 and first.has_more, first)
    listed = [b.id for b in c.batches.list(limit=10)]  # auto-paging through all pages
    check(listed == list(reversed(made)), f"{listed} != newest first {list(reversed(made))}")
    files = [f.id for f in c.files.list(limit=7, purpose="batch")]
    check(len(files) >= int(n), len(files))
    other = client("SLUICE_OTHER_KEY")
    check(list(other.batches.list()) == [], "another tenant lists none")
    check(list(other.files.list()) == [], "another tenant lists no files")
    for call in (lambda: other.batches.retrieve(made[0]), lambda: other.files.content(files[0]),
                 lambda: other.batches.cancel(made[0]), lambda: other.files.delete(files[0])):
        try:
            call()
            raise AssertionError("another tenant reached a batch or file")
        except openai.NotFoundError:
            pass
    deleted = c.files.delete(files[0])
    check(deleted.deleted, deleted)
    try:
        c.files.retrieve(files[0])
        raise AssertionError("a deleted file is still there")
    except openai.NotFoundError:
        pass
    out({"made": made, "listed": listed})


def refused(n):
    """A batch past the tenant's cap on unfinished lines (429, not retried) or its budget (402)
    is refused whole: nothing is created."""
    c = client()
    calls = []
    c = openai.OpenAI(base_url=BASE, api_key=os.environ["SLUICE_KEY"], max_retries=2,
                      http_client=openai.DefaultHttpxClient(event_hooks={"request": [
                          lambda r: calls.append(r.url.path) if r.url.path.endswith("/batches") else None]}))
    f = upload(c, jsonl([line(i) for i in range(int(n))]))
    try:
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        raise AssertionError("the batch was accepted")
    except openai.APIStatusError as e:
        out({"status": e.status_code, "code": e.code, "attempts": len(calls),
             "should_retry": e.response.headers.get("x-should-retry"),
             "batches": len(list(c.batches.list()))})


def limits():
    """Past 50,000 lines or 200 MB an upload is refused with a clear error, and leaves no file."""
    c = client()
    before = len(list(c.files.list(purpose="batch")))
    try:
        c.files.create(file=("many.jsonl", io.BytesIO(b"{}\n" * 50_001)), purpose="batch")
        raise AssertionError("50,001 lines were accepted")
    except openai.BadRequestError as e:
        lines = e.code
    try:
        c.files.create(file=("big.jsonl", io.BytesIO(b"x" * (200 * 1024 * 1024 + 1))), purpose="batch")
        raise AssertionError("a file over 200 MB was accepted")
    except openai.APIStatusError as e:
        check(e.status_code == 413, e.status_code)
        size = e.code
    try:
        c.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
        raise AssertionError("purpose fine-tune was accepted")
    except openai.BadRequestError as e:
        purpose = e.param
    out({"lines": lines, "size": size, "purpose": purpose, "before": before,
         "after": len(list(c.files.list(purpose="batch")))})


if __name__ == "__main__":
    scenario, args = sys.argv[1], sys.argv[2:]
    globals()[scenario](*args)
