// The official `openai` npm package against a live Sluice: a chat completion, a stream and a
// batch, as a Node user writes them. Run by tests/e2e/openai_batch.rs with NODE_PATH pointing at
// the node_modules of scripts/openai-sdks.sh; prints one JSON object for the Rust side to check.
const assert = require("node:assert/strict");
const OpenAI = require("openai");
const { toFile } = require("openai");

const client = new OpenAI({ baseURL: process.env.SLUICE_BASE_URL, apiKey: process.env.SLUICE_KEY });

async function main() {
  const { data: completion, response } = await client.chat.completions
    .create({ model: "default", messages: [{ role: "user", content: "Hello from Node" }] })
    .withResponse();
  assert.equal(completion.object, "chat.completion");
  assert.equal(completion.choices[0].message.role, "assistant");
  assert.equal(completion._request_id ?? response.headers.get("x-request-id"), response.headers.get("x-request-id"));

  const { data: stream, response: streamed } = await client.chat.completions
    .create({
      model: "default",
      messages: [{ role: "user", content: "Stream from Node" }],
      stream: true,
      stream_options: { include_usage: true },
    })
    .withResponse();
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  const withChoices = chunks.filter((c) => c.choices.length > 0);
  assert.ok(chunks.length >= 3, `${chunks.length} chunks`);
  assert.equal(new Set(chunks.map((c) => c.id)).size, 1);
  assert.equal(withChoices[0].choices[0].delta.role, "assistant");
  assert.equal(withChoices[withChoices.length - 1].choices[0].finish_reason, "stop");
  assert.ok(chunks[chunks.length - 1].usage.total_tokens > 0);
  const streamText = withChoices.map((c) => c.choices[0].delta.content ?? "").join("");

  const lines = [];
  for (let i = 0; i < 10; i++) {
    lines.push(JSON.stringify({
      custom_id: `req-${i}`, method: "POST", url: "/v1/chat/completions",
      body: { model: "default", messages: [{ role: "user", content: `node batch ${i}` }] },
    }));
  }
  const file = await client.files.create({
    file: await toFile(Buffer.from(lines.join("\n") + "\n"), "node.jsonl"),
    purpose: "batch",
  });
  let batch = await client.batches.create({
    input_file_id: file.id, endpoint: "/v1/chat/completions", completion_window: "24h",
  });
  const deadline = Date.now() + 120_000;
  while (!["completed", "failed", "expired", "cancelled"].includes(batch.status)) {
    assert.ok(Date.now() < deadline, `batch still ${batch.status}`);
    await new Promise((r) => setTimeout(r, 200));
    batch = await client.batches.retrieve(batch.id);
  }
  assert.equal(batch.status, "completed");
  const output = await (await client.files.content(batch.output_file_id)).text();
  const results = output.trim().split("\n").map((l) => JSON.parse(l));
  results.forEach((r) => assert.equal(r.response.status_code, 200));

  console.log(JSON.stringify({
    chat: response.headers.get("x-request-id"),
    chat_text: completion.choices[0].message.content,
    stream: streamed.headers.get("x-request-id"),
    stream_text: streamText,
    batch_counts: [batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed],
    batch_ids: results.map((r) => r.custom_id),
  }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
