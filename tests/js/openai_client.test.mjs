// tests/js/openai_client.test.mjs — drives a running d2od daemon with the
// official `openai` npm client (v6), the way users' programs talk to it.
//
// Started by tests/integration/test_api.py, which runs the daemons and passes:
//   D2_BASE_URL    http://127.0.0.1:PORT/v1 of the main daemon (no API key)
//   D2_MODEL       the served model id
//   D2_GREEDY      JSON file {"max_tokens": N, "cases": [{"prompt", "text"}]}:
//                  `d2od generate --temperature 0` output for each prompt
//   D2_AUTH_URL    a daemon started with --api-key D2_AUTH_KEY (optional)
//   D2_QUEUE_URL   a daemon started with --max-seqs 1 --max-queue 1 (optional)
// Prints "ok   NAME" / "FAIL NAME DETAIL" per check and a closing
// "js: N passed, N failed" line; exits 1 when anything failed.
import fs from "node:fs";
import OpenAI from "openai";

const BASE = process.env.D2_BASE_URL;
const MODEL = process.env.D2_MODEL;
let passed = 0;
let failed = 0;

function check(name, cond, detail = "") {
  if (cond) {
    passed++;
    console.log(`ok   ${name}`);
  } else {
    failed++;
    console.log(`FAIL ${name} ${detail}`);
  }
}

// Runs one named test body; an exception thrown by it is a failure.
async function test(name, fn) {
  try {
    await fn();
  } catch (e) {
    check(name, false, `threw ${e?.constructor?.name}: ${e?.message}`);
  }
}

// Expects fn() to reject with an instance of cls and the given status.
async function expectError(name, cls, status, fn, more = () => true) {
  try {
    await fn();
    check(name, false, "no error was thrown");
  } catch (e) {
    check(name, e instanceof cls && e.status === status && more(e),
      `got ${e?.constructor?.name} status=${e?.status} type=${e?.type} code=${e?.code} param=${e?.param} ${e?.message}`);
  }
}

function client(baseURL, apiKey = "none") {
  // no retries: a 429 or 5xx must surface as the first answer, not be retried
  return new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60_000 });
}

async function collect(stream) {
  const texts = [];
  const finish = [];
  let usage = null;
  let chunks = 0;
  for await (const ch of stream) {
    chunks++;
    if (ch.usage) usage = ch.usage;
    for (const c of ch.choices) {
      const t = c.text ?? c.delta?.content ?? "";
      texts[c.index] = (texts[c.index] ?? "") + t;
      if (c.finish_reason) finish[c.index] = c.finish_reason;
    }
  }
  return { texts, finish, usage, chunks };
}

async function main() {
  const oa = client(BASE);
  const greedy = JSON.parse(fs.readFileSync(process.env.D2_GREEDY, "utf8"));
  const N = greedy.max_tokens;

  await test("models.list", async () => {
    const page = await oa.models.list();
    const ids = page.data.map((m) => m.id);
    check("models.list", ids.length === 1 && ids[0] === MODEL, JSON.stringify(ids));
  });

  await test("completions greedy == d2od generate", async () => {
    let bad = [];
    for (const c of greedy.cases) {
      const r = await oa.completions.create({ model: MODEL, prompt: c.prompt, max_tokens: N, temperature: 0 });
      if (r.choices[0].text !== c.text) bad.push({ prompt: c.prompt, got: r.choices[0].text, want: c.text });
    }
    check("completions greedy == d2od generate", bad.length === 0, JSON.stringify(bad).slice(0, 400));
  });

  await test("completions non-stream shape and usage", async () => {
    const c = greedy.cases[0];
    const r = await oa.completions.create({ model: MODEL, prompt: c.prompt, max_tokens: 7, temperature: 0 });
    check("completions non-stream shape and usage",
      r.object === "text_completion" && r.model === MODEL && typeof r.id === "string" &&
      r.choices.length === 1 && r.choices[0].index === 0 && ["length", "stop"].includes(r.choices[0].finish_reason) &&
      r.usage.completion_tokens <= 7 && r.usage.prompt_tokens > 0 &&
      r.usage.total_tokens === r.usage.prompt_tokens + r.usage.completion_tokens &&
      c.text.startsWith(r.choices[0].text),
      JSON.stringify(r));
  });

  await test("completions stream == non-stream, include_usage", async () => {
    const c = greedy.cases[1];
    const s = await oa.completions.create({ model: MODEL, prompt: c.prompt, max_tokens: N, temperature: 0,
      stream: true, stream_options: { include_usage: true } });
    const got = await collect(s);
    const r = await oa.completions.create({ model: MODEL, prompt: c.prompt, max_tokens: N, temperature: 0 });
    check("completions stream == d2od generate", got.texts[0] === c.text, JSON.stringify(got.texts[0]));
    check("completions stream usage chunk",
      got.usage && got.usage.completion_tokens === r.usage.completion_tokens &&
      got.usage.prompt_tokens === r.usage.prompt_tokens && got.finish[0] === r.choices[0].finish_reason,
      JSON.stringify({ got: got.usage, want: r.usage, f: got.finish }));
  });

  await test("completions stream without include_usage", async () => {
    const s = await oa.completions.create({ model: MODEL, prompt: greedy.cases[0].prompt, max_tokens: 5,
      temperature: 0, stream: true });
    const got = await collect(s);
    check("completions stream without include_usage has no usage", got.usage === null && got.chunks >= 2,
      JSON.stringify(got));
  });

  const messages = [{ role: "system", content: "You tell stories." }, { role: "user", content: "Tell me a story." }];
  await test("chat non-stream", async () => {
    const r = await oa.chat.completions.create({ model: MODEL, messages, max_tokens: 16, temperature: 0 });
    const m = r.choices[0].message;
    check("chat non-stream shape and usage",
      r.object === "chat.completion" && m.role === "assistant" && typeof m.content === "string" &&
      m.content.length > 0 && r.usage.completion_tokens > 0 && r.usage.completion_tokens <= 16 &&
      r.usage.total_tokens === r.usage.prompt_tokens + r.usage.completion_tokens,
      JSON.stringify(r));
    const s = await oa.chat.completions.create({ model: MODEL, messages, max_tokens: 16, temperature: 0,
      stream: true, stream_options: { include_usage: true } });
    const got = await collect(s);
    check("chat stream == chat non-stream",
      got.texts[0] === m.content && got.finish[0] === r.choices[0].finish_reason &&
      got.usage?.completion_tokens === r.usage.completion_tokens && got.usage?.prompt_tokens === r.usage.prompt_tokens,
      JSON.stringify({ got, want: r.choices[0] }));
  });

  await test("chat stream first delta has role", async () => {
    const s = await oa.chat.completions.create({ model: MODEL, messages, max_tokens: 4, temperature: 0, stream: true });
    let first = null;
    for await (const ch of s) if (!first && ch.choices.length) first = ch;
    check("chat stream first delta has role", first?.choices[0].delta.role === "assistant" &&
      first.object === "chat.completion.chunk", JSON.stringify(first));
  });

  await test("stop strings", async () => {
    // a stop string taken from the middle of the greedy continuation
    const c = greedy.cases.find((x) => x.text.length > 20);
    const stop = c.text.slice(10, 14);
    const at = c.text.indexOf(stop);
    const r = await oa.completions.create({ model: MODEL, prompt: c.prompt, max_tokens: N, temperature: 0, stop: [stop, "zzzz"] });
    check("stop string (non-stream)", r.choices[0].text === c.text.slice(0, at) && r.choices[0].finish_reason === "stop",
      JSON.stringify({ stop, got: r.choices[0], want: c.text.slice(0, at) }));
    const s = await oa.completions.create({ model: MODEL, prompt: c.prompt, max_tokens: N, temperature: 0, stop, stream: true });
    const got = await collect(s);
    check("stop string (stream: nothing of it leaks)", got.texts[0] === c.text.slice(0, at) && got.finish[0] === "stop",
      JSON.stringify({ stop, got }));
    const cr = await oa.chat.completions.create({ model: MODEL, messages, max_tokens: 24, temperature: 0 });
    const full = cr.choices[0].message.content;
    if (full.length > 8) {
      const cs = full.slice(5, 8);
      const cr2 = await oa.chat.completions.create({ model: MODEL, messages, max_tokens: 24, temperature: 0, stop: cs });
      check("stop string (chat)", cr2.choices[0].message.content === full.slice(0, full.indexOf(cs)) &&
        cr2.choices[0].finish_reason === "stop", JSON.stringify({ cs, full, got: cr2.choices[0] }));
    }
  });

  await test("seeds", async () => {
    const ask = (seed) => oa.completions.create({ model: MODEL, prompt: "Once upon a time", max_tokens: 40,
      temperature: 1, seed });
    const [a, b, c] = await Promise.all([ask(1234), ask(1234), ask(99)]);
    check("same seed => same text at temperature 1", a.choices[0].text === b.choices[0].text,
      JSON.stringify([a.choices[0].text, b.choices[0].text]));
    check("different seed => different text", a.choices[0].text !== c.choices[0].text, a.choices[0].text);
    const s = await oa.completions.create({ model: MODEL, prompt: "Once upon a time", max_tokens: 40,
      temperature: 1, seed: 1234, stream: true });
    const got = await collect(s);
    check("same seed streamed => same text", got.texts[0] === a.choices[0].text, JSON.stringify(got.texts[0]));
  });

  await test("n > 1", async () => {
    const r = await oa.completions.create({ model: MODEL, prompt: "Once upon a time", max_tokens: 30,
      temperature: 1, seed: 7, n: 3 });
    const texts = r.choices.map((c) => c.text);
    check("n=3 gives 3 choices with indices 0..2",
      r.choices.length === 3 && r.choices.every((c, i) => c.index === i && c.finish_reason),
      JSON.stringify(r.choices));
    check("n=3 choices differ", new Set(texts).size > 1, JSON.stringify(texts));
    const sum = r.choices.length ? r.usage.completion_tokens : -1;
    check("n=3 usage counts every choice", sum >= 3 && sum <= 90, JSON.stringify(r.usage));
    const s = await oa.completions.create({ model: MODEL, prompt: "Once upon a time", max_tokens: 30,
      temperature: 1, seed: 7, n: 3, stream: true });
    const got = await collect(s);
    check("n=3 stream == non-stream (same seed)", JSON.stringify(got.texts) === JSON.stringify(texts) &&
      got.finish.length === 3, JSON.stringify({ got: got.texts, texts }));
    const g = greedy.cases[0];
    const c2 = await oa.chat.completions.create({ model: MODEL, messages, max_tokens: 12, temperature: 0, n: 2 });
    check("chat n=2 at temperature 0: both greedy",
      c2.choices.length === 2 && c2.choices[0].message.content === c2.choices[1].message.content, JSON.stringify(c2.choices));
    const p2 = await oa.completions.create({ model: MODEL, prompt: [g.prompt, greedy.cases[1].prompt], max_tokens: N, temperature: 0 });
    check("two prompts in one request", p2.choices.length === 2 && p2.choices[0].text === g.text &&
      p2.choices[1].text === greedy.cases[1].text, JSON.stringify(p2.choices));
  });

  await test("logprobs", async () => {
    const r = await oa.completions.create({ model: MODEL, prompt: "Once upon a time", max_tokens: 8,
      temperature: 0, logprobs: 3 });
    const lp = r.choices[0].logprobs;
    const n = r.usage.completion_tokens;
    const okShape = lp && lp.tokens.length === n && lp.token_logprobs.length === n && lp.top_logprobs.length === n &&
      lp.text_offset.length === n;
    let okVals = okShape;
    for (let i = 0; okVals && i < n; i++) {
      const tops = Object.values(lp.top_logprobs[i]);
      const best = Math.max(...tops);
      okVals = lp.token_logprobs[i] <= 0 && tops.length >= 1 && tops.length <= 3 &&
        Math.abs(best - lp.token_logprobs[i]) < 1e-4; // greedy: the chosen token is the most likely
    }
    check("completions logprobs shape", okShape, JSON.stringify(lp));
    check("completions logprobs: greedy token is the top one", okVals, JSON.stringify(lp));
    const c = await oa.chat.completions.create({ model: MODEL, messages, max_tokens: 6, temperature: 0,
      logprobs: true, top_logprobs: 2 });
    const content = c.choices[0].logprobs?.content;
    check("chat logprobs shape", Array.isArray(content) && content.length === c.usage.completion_tokens &&
      content.every((t) => typeof t.token === "string" && t.logprob <= 0 && Array.isArray(t.bytes) &&
        t.top_logprobs.length === 2 && Math.abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4),
      JSON.stringify(content));
    const s = await oa.chat.completions.create({ model: MODEL, messages, max_tokens: 6, temperature: 0,
      logprobs: true, top_logprobs: 2, stream: true });
    let n2 = 0;
    for await (const ch of s) for (const cc of ch.choices) n2 += cc.logprobs?.content?.length ?? 0;
    check("chat stream logprobs cover every token", n2 === content.length, `${n2} vs ${content?.length}`);
  });

  // ---- errors surface as the client's own exception types ----
  await expectError("400 -> BadRequestError (negative max_tokens)", OpenAI.BadRequestError, 400,
    () => oa.completions.create({ model: MODEL, prompt: "x", max_tokens: -1 }),
    (e) => e.param === "max_tokens" && e.type === "invalid_request_error");
  await expectError("400 -> BadRequestError (empty messages)", OpenAI.BadRequestError, 400,
    () => oa.chat.completions.create({ model: MODEL, messages: [] }), (e) => e.param === "messages");
  await expectError("400 -> BadRequestError (temperature 5)", OpenAI.BadRequestError, 400,
    () => oa.chat.completions.create({ model: MODEL, messages, temperature: 5 }), (e) => e.param === "temperature");
  await expectError("400 -> BadRequestError in a stream request", OpenAI.BadRequestError, 400,
    () => oa.completions.create({ model: MODEL, prompt: "x", top_p: 0, stream: true }), (e) => e.param === "top_p");
  await expectError("400 -> BadRequestError (prompt over the context)", OpenAI.BadRequestError, 400,
    () => oa.completions.create({ model: MODEL, prompt: Array(3000).fill(300), max_tokens: 4 }),
    (e) => /2048/.test(e.message));
  await expectError("404 -> NotFoundError (unknown model)", OpenAI.NotFoundError, 404,
    () => oa.completions.create({ model: "gpt-17", prompt: "x", max_tokens: 2 }), (e) => e.code === "model_not_found");
  await expectError("404 -> NotFoundError (unknown route)", OpenAI.NotFoundError, 404,
    () => oa.embeddings.create({ model: MODEL, input: "x" }));

  if (process.env.D2_AUTH_URL) {
    const key = process.env.D2_AUTH_KEY;
    await expectError("401 -> AuthenticationError (wrong key)", OpenAI.AuthenticationError, 401,
      () => client(process.env.D2_AUTH_URL, key + "x").models.list(), (e) => e.code === "invalid_api_key");
    await test("right key accepted", async () => {
      const r = await client(process.env.D2_AUTH_URL, key).completions.create({ model: MODEL, prompt: "Once", max_tokens: 3 });
      check("right key accepted", r.choices.length === 1);
    });
  }

  if (process.env.D2_QUEUE_URL) {
    // max_seqs 1, max_queue 1: of several concurrent long requests one runs,
    // one waits and the rest are refused at once with 429.
    const q = client(process.env.D2_QUEUE_URL);
    const ac = new AbortController();
    const reqs = [];
    for (let i = 0; i < 5; i++)
      reqs.push(q.completions.create({ model: MODEL, prompt: "Once upon a time", max_tokens: 6000, ignore_eos: true,
        temperature: 0 }, { signal: ac.signal }));
    const first = await Promise.race(reqs.map((p) => p.then(() => null, (e) => e)));
    ac.abort(); // the accepted ones are long; drop them (the daemon cancels them)
    const all = await Promise.allSettled(reqs);
    const limited = all.filter((s) => s.status === "rejected" && s.reason instanceof OpenAI.RateLimitError);
    check("429 -> RateLimitError", first instanceof OpenAI.RateLimitError && limited.length >= 1 &&
      limited[0].reason.type === "rate_limit_error",
      `first=${first?.constructor?.name} ${all.map((s) => s.reason?.constructor?.name ?? "ok").join(",")}`);
  }
  console.log(`js: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.log(`FAIL js driver: ${e?.stack ?? e}`);
  console.log(`js: ${passed} passed, ${failed + 1} failed`);
  process.exit(1);
});
