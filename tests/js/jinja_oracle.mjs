// tests/js/jinja_oracle.mjs — oracle for api/jinja.c: renders every chat template of
// tests/fixtures/jinja (plus the Llama 3, Qwen3 and Phi-3 templates read in place from the
// shared assets) and a set of language-feature snippets with @huggingface/jinja, and writes
// tests/fixtures/jinja/expected.json, which tests/unit/test_jinja.c replays byte for byte.
//
//   cd tests/js && npm install && node jinja_oracle.mjs [--check]
//
// --check renders again and exits 1 when expected.json differs (no write).
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

// strftime_now() uses `new Date()`: pin it to 2024-07-26 09:05 local time.
const RealDate = Date;
const FIXED = new RealDate(2024, 6, 26, 9, 5, 0).getTime();
globalThis.Date = class extends RealDate {
  constructor(...a) { if (a.length === 0) super(FIXED); else super(...a); }
  static now() { return FIXED; }
};
const { Template } = await import("@huggingface/jinja");

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../..");
const fixdir = path.join(repo, "tests/fixtures/jinja");
const shared = process.env.D2_SHARED ? path.resolve(repo, process.env.D2_SHARED) : path.resolve(repo, "../shared");

const tools = [
  { type: "function", function: { name: "get_weather", description: "Get the current weather in a city",
    parameters: { type: "object", properties: { city: { type: "string", description: "City name, e.g. Paris" },
      unit: { type: "string", enum: ["celsius", "fahrenheit"] } }, required: ["city"] } } },
  { type: "function", function: { name: "add", description: "Add two numbers",
    parameters: { type: "object", properties: { a: { type: "number" }, b: { type: "number", default: 1.5 } },
      required: ["a", "b"] } } },
];
const call = { id: "call12345", type: "function",
  function: { name: "get_weather", arguments: { city: "Paris", unit: "celsius", days: 3, ratio: 0.25, big: 1e21 } } };

const convs = {
  sys_user: [{ role: "system", content: "You are a helpful assistant." }, { role: "user", content: "Hello!" }],
  user: [{ role: "user", content: "What is 2+2?" }],
  multi: [{ role: "system", content: "  Be brief.\n" }, { role: "user", content: "Hi" },
    { role: "assistant", content: " Hello! How can I help? " }, { role: "user", content: "Tell me a joke." }],
  multi_nosys: [{ role: "user", content: "Hi" }, { role: "assistant", content: "Hello." },
    { role: "user", content: "Bye" }, { role: "assistant", content: "Goodbye!" }],
  unicode: [{ role: "user", content: "héllo wörld — 你好 🙂\u00a0ß \"quoted\" \\ back\tslash\n" },
    { role: "assistant", content: "Ça va? Привет! 😀" }, { role: "user", content: "ΑΒΓ straße" }],
  empty: [{ role: "user", content: "" }],
  not_alternating: [{ role: "user", content: "one" }, { role: "user", content: "two" }],
  assistant_first: [{ role: "assistant", content: "I start." }, { role: "user", content: "ok" }],
  tool_flow: [{ role: "system", content: "You can call tools." }, { role: "user", content: "Weather in Paris?" },
    { role: "assistant", content: "", tool_calls: [call] },
    { role: "tool", tool_call_id: "call12345", name: "get_weather", content: "{\"temperature\": 21.5}" },
    { role: "user", content: "Thanks" }],
  tool_result_last: [{ role: "user", content: "Weather in Paris?" },
    { role: "assistant", content: "", tool_calls: [call] },
    { role: "tool", tool_call_id: "call12345", name: "get_weather", content: "{\"temperature\": 21.5}" }],
  think: [{ role: "user", content: "Solve x+1=2" },
    { role: "assistant", content: "<think>\nx = 2 - 1\n</think>\n\nx = 1" },
    { role: "user", content: "And x+2=5?" },
    { role: "assistant", content: "x = 3", reasoning_content: "subtract 2" }],
  think_last: [{ role: "user", content: "Q" }, { role: "assistant", content: "<think>\nhmm\n</think>\n\nA" }],
};

const families = [
  { name: "llama2", file: "llama2.jinja", bos: "<s>", eos: "</s>" },
  { name: "mistral_v1", file: "mistral_v1.jinja", bos: "<s>", eos: "</s>" },
  { name: "mistral_v3", file: "mistral_v3.jinja", bos: "<s>", eos: "</s>", tools: true },
  { name: "gemma", file: "gemma.jinja", bos: "<bos>", eos: "<eos>" },
  { name: "llama3_1", file: "llama3_1.jinja", bos: "<|begin_of_text|>", eos: "<|eot_id|>", tools: true },
  { name: "llama3_2", file: "llama3_2.jinja", bos: "<|begin_of_text|>", eos: "<|eot_id|>", tools: true },
  { name: "qwen2_5", file: "qwen2_5.jinja", bos: null, eos: "<|im_end|>", tools: true },
  { name: "llama3", shared: "assets/tokenizers/llama3/tokenizer_config.json" },
  { name: "qwen3", shared: "assets/tokenizers/qwen3/tokenizer_config.json", tools: true },
  { name: "phi3", shared: "assets/tokenizers/llama2-hf-phi3/tokenizer_config.json" },
];

function loadTemplate(f) {
  if (f.file) return fs.readFileSync(path.join(fixdir, f.file), "utf8");
  const cfg = JSON.parse(fs.readFileSync(path.join(shared, f.shared), "utf8"));
  if (f.bos === undefined) f.bos = typeof cfg.bos_token === "string" ? cfg.bos_token : (cfg.bos_token?.content ?? null);
  if (f.eos === undefined) f.eos = typeof cfg.eos_token === "string" ? cfg.eos_token : (cfg.eos_token?.content ?? null);
  return cfg.chat_template;
}

function render(src, ctx) {
  try {
    return { output: new Template(src).render(ctx) };
  } catch (e) {
    return { error: String(e && e.message !== undefined ? e.message : e) };
  }
}

const cases = [];
for (const f of families) {
  const src = loadTemplate(f);
  for (const [cname, messages] of Object.entries(convs)) {
    for (const agp of [false, true]) {
      const ctx = { messages, add_generation_prompt: agp, bos_token: f.bos, eos_token: f.eos };
      const variants = [["", ctx]];
      if (f.tools && (cname === "user" || cname.startsWith("tool_") || cname === "sys_user"))
        variants.push(["+tools", { ...ctx, tools }]);
      if (f.name.startsWith("llama3_") && cname === "tool_flow") {
        variants.push(["+date", { ...ctx, tools, date_string: "01 Jan 2025", tools_in_user_message: false }]);
        if (f.name === "llama3_1") variants.push(["+builtin", { ...ctx, builtin_tools: ["brave_search"] }]);
      }
      if (f.name === "qwen3" && cname.startsWith("think")) variants.push(["+nothink", { ...ctx, enable_thinking: false }]);
      for (const [suffix, c] of variants) {
        const r = render(src, c);
        const entry = { name: `${f.name}/${cname}${suffix}/agp=${agp}`, context: c, ...r };
        if (f.file) entry.template_file = f.file; else entry.template_shared = f.shared;
        cases.push(entry);
      }
    }
  }
}

// Language-feature snippets: [template, context]
const S = (t, c = {}) => [t, c];
const snippets = [
  S("{{ 'a' ~ 1 ~ 1.0 ~ 2.5 ~ true ~ [1, 'x'] }}"),
  S("{{ 1.0 }}|{{ 2.50 }}|{{ -0.0 }}|{{ 10 / 4 }}|{{ 10 // 4 }}|{{ 7 % 3 }}|{{ -7 % 3 }}|{{ 2 ** 10 }}|{{ 2 ** -1 }}|{{ 5 if false else 3.0 * 2 }}"),
  S("{{ 0.1 + 0.2 }}|{{ 1 / 3 }}|{{ 123456789012345680000 }}|{{ 1000000000000000000000 * 10 }}|{{ 0.000001 }}|{{ 0.0000001 * 1 }}"),
  S("{{ x }}|{{ none }}|{{ undefined_thing }}|{{ x.y.z }}|{{ true }}|{{ False }}", { x: null }),
  S("{% for m in items %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.revindex }}/{{ loop.first }}/{{ loop.last }}/{{ loop.length }};{% endfor %}", { items: ["a", "b", "c"] }),
  S("{% for m in items %}{{ m }}{% else %}empty{% endfor %}", { items: [] }),
  S("{% for m in items if m != 'b' %}{{ m }}{{ loop.index }}{% endfor %}", { items: ["a", "b", "c"] }),
  S("{% for k, v in d.items() %}{{ k }}={{ v }},{% endfor %}|{% for k in d %}{{ k }}{% endfor %}", { d: { b: 1, a: [1, 2], "2": "two", "1": "one" } }),
  S("{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}<{{ i }}>{% if i == 3 %}{% break %}{% endif %}{% endfor %}"),
  S("{% for i in [1,2,3] %}a{{ i }}{% if i == 2 %}{% continue %}{% endif %}b{% endfor %}"),
  S("{% for i in [1] %}{% continue %}{% else %}else-ran{% endfor %}"),
  S("{% set ns = namespace(count=0, found=false) %}{% for i in range(1, 6) %}{% set ns.count = ns.count + i %}{% endfor %}{{ ns.count }} {{ ns.found }} {{ ns }}"),
  S("{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{{ x }}{% endfor %}{{ x }}"),
  S("{% set a, b = 1, 'two' %}{{ a }}{{ b }}{% set t %}block {{ a }}{% endset %}[{{ t }}]"),
  S("{% macro greet(name, greeting='Hello') %}{{ greeting }}, {{ name }}!{% endmacro %}{{ greet('Ann') }} {{ greet('Bob', 'Hi') }} {{ greet(name='Cy', greeting='Yo') }}"),
  S("{% macro wrap(tag) %}<{{ tag }}>{{ caller() }}</{{ tag }}>{% endmacro %}{% call wrap('b') %}bold {{ 1 + 1 }}{% endcall %}"),
  S("{% macro m() %}{{ varargs|length }}{{ kwargs.k }}{% endmacro %}{{ m(1, 2, k='v') }}"),
  S("{% filter upper %}shout {{ 'it' }}{% endfilter %}"),
  S("{{ '  padded  '|trim }}|{{ 'abc'|upper }}|{{ 'ABC'|lower }}|{{ 'hello world-foo_bar'|title }}|{{ 'hELLO'|capitalize }}|{{ 'abc'|length }}|{{ '🙂x'|length }}"),
  S("{{ [3, 1, 2]|sort }}|{{ ['b', 'A', 'c']|sort }}|{{ [3, 1, 2]|sort(reverse=true) }}|{{ [1,2,3]|reverse }}|{{ [1,1,2,'a','a']|unique }}|{{ [1,2]|first }}{{ [1,2]|last }}"),
  S("{{ ['a', 'b']|join(', ') }}|{{ [1, 2.0, none, true]|join('-') }}|{{ 'abc'|join('.') }}|{{ ['x','y']|join }}"),
  S("{{ msgs|selectattr('role', 'equalto', 'user')|map(attribute='content')|list }}|{{ msgs|rejectattr('role', 'equalto', 'user')|length }}|{{ msgs|selectattr('extra')|length }}|{{ msgs|map(attribute='nope', default='d')|join }}",
    { msgs: [{ role: "user", content: "u1" }, { role: "assistant", content: "a1", extra: true }, { role: "user", content: "u2" }] }),
  S("{{ d|tojson }}|{{ d|tojson(indent=2) }}|{{ [1, [2, {}], []]|tojson(indent=1) }}|{{ 'é\"\\n\\u0001'|tojson }}|{{ 'é😀'|tojson(ensure_ascii=true) }}|{{ d|tojson(separators=(',', ':')) }}|{{ d|tojson(sort_keys=true) }}",
    { d: { z: 1, a: [true, null, 1.5, "s"], m: { k: -2 } } }),
  S("{{ d }}|{{ [1, 'a', none] }}|{{ 5|string }}|{{ 5.0|string }}|{{ true|string }}|{{ [1]|string }}", { d: { a: 1 } }),
  S("{{ '42'|int }}|{{ '3.7'|float }}|{{ 'x'|int }}|{{ 'x'|int(7) }}|{{ 3.9|int }}|{{ -3|abs }}|{{ '12abc'|int + 1 }}|{{ true|int }}|{{ ' 1e2x'|float }}"),
  S("{{ x|default('dflt') }}|{{ ''|default('d2', true) }}|{{ 0|default('d3') }}|{{ none|default('d4') }}", {}),
  S("{{ d.get('a') }}|{{ d.get('zz', 'dv') }}|{{ d.get('zz') }}|{{ d.keys()|list }}|{{ d.values()|list }}|{{ d|items|list }}|{{ d|length }}|{{ d|dictsort }}", { d: { b: 2, a: 1 } }),
  S("{{ 'a,b,,c'.split(',') }}|{{ '  a  b c '.split() }}|{{ 'a b c'.split(' ', 1) }}|{{ 'a b  c d'.split(none, 2) }}|{{ 'x'.split('x') }}"),
  S("{{ 'hello'.startswith('he') }}{{ 'hello'.endswith(('x', 'lo')) }}|{{ '\\n\\n hi \\n'.strip() }}|{{ 'xxhixx'.strip('x') }}|{{ '\\nhi\\n'.lstrip('\\n') }}|{{ '\\nhi\\n'.rstrip() }}|"),
  S("{{ 'aaa'.replace('a', 'b') }}|{{ 'aaa'.replace('a', 'b', 2) }}|{{ 'abc'.replace('', '-') }}|{{ 'a.b'|replace('.', '::') }}|{{ 'ÄÖü'.upper() }}{{ 'ÄÖÜ straße'.lower() }}{{ 'straße'.upper() }}"),
  S("{{ s[0] }}{{ s[-1] }}{{ s[1:3] }}{{ s[::-1] }}{{ s[::2] }}|{{ l[1:] }}{{ l[:-1] }}{{ l[::-1] }}{{ l[-2:] }}{{ l[5:] }}|{{ s[10] }}|{{ l.length }}{{ s.length }}", { s: "héllo", l: [1, 2, 3, 4] }),
  S("{{ 1 == 1.0 }}{{ '1' == 1 }}{{ none == undefinedvar }}{{ [1] == [1] }}{{ d == d }}{{ 'a' != 'b' }}{{ true == 1 }}|{{ 1 in [1, 2] }}{{ 'a' in 'cat' }}{{ 'k' in d }}{{ 'z' not in d }}{{ x in undefinedvar }}", { d: { k: 1 } }),
  S("{{ 1 < 2 }}{{ 2 <= 2 }}{{ 3 > 4 }}{{ 1.5 >= 1 }}|{{ not true }}{{ not [] }}{{ [] or 'alt' }}{{ 'v' and 0 }}{{ {} or 'e' }}|{{ 'yes' if 1 else 'no' }}|{{ 'sel' if false }}|"),
  S("{{ x is defined }}{{ y is undefined }}{{ x is none }}{{ 'a' is string }}{{ 1 is number }}{{ 1.5 is integer }}{{ d is mapping }}{{ [] is iterable }}{{ 'a' is sequence }}{{ true is true }}{{ 0 is false }}{{ 3 is odd }}{{ 4 is even }}{{ 'ab' is lower }}{{ x is not none }}", { x: null, d: {} }),
  S("{{ [1, 2] + [3] }}|{{ 'a' + 'b' }}|{{ 'n' + 1 }}|{{ -x }}|{{ +3 }}|{{ - 2.5 }}|{{ (1, 2)|length }}|{{ {'a': 1, 'b': 2}['b'] }}|{{ [[1, 2], [3]][0][1] }}", { x: 4 }),
  S("{{- '  ws  ' -}}  \n  {#- comment -#}  \n  text  {%- if true -%}  \n  in  {%- endif %}\n  after\n"),
  S("  {% if true %}\n    indented\n  {% endif %}\n{# c #}\nline\n    {%- set x = 1 %}\nend\n"),
  S("a {% generation %}gen{% endgeneration %} b\n{%- generation -%}  g2  {%- endgeneration %}"),
  S("{{ \"it's\" }} {{ 'say \"hi\"' }} {{ 'tab\\there' }} {{ '\\u00e9\\x41' }} {{ 'a' 'b' }}"),
  S("{{ strftime_now('%Y-%m-%d %H:%M %b %B %%') }}"),
  S("{{ raise_exception('custom failure: ' + reason) }}", { reason: "bad input" }),
  S("{{ 'a' < 'b' }}"),
  S("{{ undefinedvar + 1 }}"),
  S("{{ none + 1 }}"),
  S("{{ [1]|bogus }}"),
  S("{% for x in 'abc' %}{{ x }}{% endfor %}"),
  S("{% if %}"),
  S("{% for x in y %}no end"),
  S("{{ 'unterminated }}"),
  S("{% unknowntag %}"),
  S("{{ x.strip() }}", {}),
  S("{{ 5|round }}"),
  S("{{ d|string }}", { d: { a: 1 } }),
  S("{{ [1,2]|reject('equalto', 1)|list }}"),
  S("{% set x = [1,2,3] %}{{ x|length }}{{ x|list|length }}{{ x|count }}"),
  S("{{ range(3) }}{{ range(1, 7, 2) }}{{ range(5, 0, -2) }}"),
  S("{% set d = {'a': {'b': [10, 20]}} %}{{ [d]|map(attribute='a.b.1')|first }}{{ d.a.b.0 }}"),
  S("{{ 'abc' * 2 }}"),
  S("{{ messages[0].content|indent(2) }}|{{ 'l1\\n\\nl3'|indent(2, true, true) }}|{{ 'a\\nb'|indent }}", { messages: [{ content: "x\ny" }] }),
  S("{% set l = [3, 1] %}{% for x in l|sort %}{{ x }}{% endfor %}{{ l }}"),
  S("{{ n }} {{ f }} {{ big }} {{ neg }} {{ n|tojson }} {{ f|tojson }} {{ tiny }}", { n: 3, f: 2.5, big: 12345678901234567890, neg: -0.5, tiny: 1e-7 }),
];
snippets.forEach(([src, ctx], i) => {
  cases.push({ name: `snippet/${String(i).padStart(2, "0")}`, source: src, context: ctx, ...render(src, ctx) });
});

const out = JSON.stringify({ generator: "tests/js/jinja_oracle.mjs with @huggingface/jinja", cases }, null, 1) + "\n";
const target = path.join(fixdir, "expected.json");
if (process.argv.includes("--check")) {
  const old = fs.existsSync(target) ? fs.readFileSync(target, "utf8") : "";
  if (old !== out) { console.error("expected.json is stale: rerun node jinja_oracle.mjs"); process.exit(1); }
  console.log("expected.json up to date");
} else {
  fs.writeFileSync(target, out);
  console.log(`wrote ${cases.length} cases to ${path.relative(repo, target)}`);
}
