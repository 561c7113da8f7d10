// tests/js/tok_oracle.mjs — the tokenizer oracle: encodes the corpus of
// make_tok_corpus.mjs with @huggingface/tokenizers (tokenizers.js) for every
// tokenizer.json in the shared assets and writes tests/fixtures/tok_oracle.json,
// which tests/unit/test_tokenizer.c compares against (no node needed there).
//
//   cd tests/js && npm install
//   node tok_oracle.mjs            # (re)write tests/fixtures/tok_oracle.json
//   node tok_oracle.mjs --check    # recompute; compare with the committed
//                                  # fixture and with the llama.cpp .inp/.out
//                                  # vectors; exit 1 on any difference
//
// Shared assets: $D2_SHARED (default ../shared relative to the repo root).
// Encoding uses add_special_tokens=false ("ids") and, for the first texts,
// true ("ids_special"); decoding uses skip_special_tokens=true and
// clean_up_tokenization_spaces=false. Known tokenizers.js 0.2.0 quirk: its
// ByteFallback decoder drops U+FEFF, so for byte-fallback tokenizers the
// decoded text of inputs containing U+FEFF is stored as null (not compared).
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Tokenizer } from "@huggingface/tokenizers";
import { makeCorpus } from "./make_tok_corpus.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "..", "..");
const shared = process.env.D2_SHARED ? path.resolve(repo, process.env.D2_SHARED) : path.resolve(repo, "..", "shared");
const fixturePath = path.join(repo, "tests", "fixtures", "tok_oracle.json");

export const TOKENIZERS = {
  llama3: { json: "assets/tokenizers/llama3/tokenizer.json", config: "assets/tokenizers/llama3/tokenizer_config.json" },
  qwen3: { json: "assets/tokenizers/qwen3/tokenizer.json", config: "assets/tokenizers/qwen3/tokenizer_config.json" },
  gpt2: { json: "assets/tokenizers/gpt2/tokenizer.json", config: null },
  phi3: { json: "assets/tokenizers/llama2-hf-phi3/tokenizer.json", config: "assets/tokenizers/llama2-hf-phi3/tokenizer_config.json" },
  stories260k: { json: "assets/models/stories260K/hf/tokenizer.json", config: "assets/models/stories260K/hf/tokenizer_config.json" },
};
// llama.cpp vocab tests: test set -> tokenizer above.
export const VOCAB_TESTS = {
  "llama-spm": "phi3", "phi-3": "phi3", "llama-bpe": "llama3", "qwen2": "qwen3",
  "deepseek-r1-qwen": "qwen3", "gpt-2": "gpt2",
};
const N_SPECIAL = 40;

function load(name) {
  const d = TOKENIZERS[name];
  const tj = JSON.parse(fs.readFileSync(path.join(shared, d.json), "utf8"));
  const cfg = d.config ? JSON.parse(fs.readFileSync(path.join(shared, d.config), "utf8")) : {};
  return { tok: new Tokenizer(tj, cfg), byteFallback: !!tj.model.byte_fallback };
}

function run() {
  const texts = makeCorpus();
  const out = {
    generator: "tests/js/tok_oracle.mjs with @huggingface/tokenizers " +
      JSON.parse(fs.readFileSync(path.join(here, "node_modules/@huggingface/tokenizers/package.json"), "utf8")).version,
    texts,
    n_special: N_SPECIAL,
    tokenizers: {},
  };
  for (const name of Object.keys(TOKENIZERS)) {
    const { tok, byteFallback } = load(name);
    const ids = [], ids_special = [], decoded = [];
    texts.forEach((t, i) => {
      const e = tok.encode(t, { add_special_tokens: false }).ids;
      ids.push(e);
      if (i < N_SPECIAL) ids_special.push(tok.encode(t, { add_special_tokens: true }).ids);
      let d = e.length ? tok.decode(e, { skip_special_tokens: true, clean_up_tokenization_spaces: false }) : "";
      if (byteFallback && t.includes("\uFEFF")) d = null;
      decoded.push(d);
    });
    out.tokenizers[name] = { ...TOKENIZERS[name], ids, ids_special, decoded };
  }
  return out;
}

// Compact JSON: one line per text's ids.
function serialize(o) {
  let s = "{\n";
  s += `"generator": ${JSON.stringify(o.generator)},\n"n_special": ${o.n_special},\n`;
  s += `"texts": [\n${o.texts.map((t) => JSON.stringify(t)).join(",\n")}\n],\n"tokenizers": {\n`;
  s += Object.entries(o.tokenizers).map(([name, v]) =>
    `${JSON.stringify(name)}: {"json": ${JSON.stringify(v.json)}, "config": ${JSON.stringify(v.config)},\n` +
    `"ids": [\n${v.ids.map((x) => JSON.stringify(x)).join(",\n")}\n],\n` +
    `"ids_special": [\n${v.ids_special.map((x) => JSON.stringify(x)).join(",\n")}\n],\n` +
    `"decoded": [\n${v.decoded.map((x) => JSON.stringify(x)).join(",\n")}\n]}`).join(",\n");
  return s + "\n}\n}\n";
}

function checkVocabTests() {
  let bad = 0;
  for (const [set, name] of Object.entries(VOCAB_TESTS)) {
    const base = path.join(shared, "assets/vocab-tests", `ggml-vocab-${set}.gguf`);
    const inp = fs.readFileSync(base + ".inp", "utf8").split("\n__ggml_vocab_test__\n");
    if (inp.length && inp[inp.length - 1] === "") inp.pop();
    const outs = fs.readFileSync(base + ".out", "utf8").split("\n");
    const { tok } = load(name);
    inp.forEach((t, i) => {
      const want = outs[i].trim() === "" ? [] : outs[i].trim().split(/\s+/).map(Number);
      const got = tok.encode(t, { add_special_tokens: false }).ids;
      if (JSON.stringify(want) !== JSON.stringify(got)) {
        bad++;
        console.error(`vocab-test ${set} #${i} ${JSON.stringify(t)}: want ${want} got ${got}`);
      }
    });
  }
  return bad;
}

const fresh = run();
if (process.argv.includes("--check")) {
  const old = fs.readFileSync(fixturePath, "utf8");
  const now = serialize(fresh);
  let bad = checkVocabTests();
  if (old !== now) {
    console.error("fixture differs from a fresh oracle run: regenerate with `node tok_oracle.mjs`");
    bad++;
  }
  console.log(bad ? `check: ${bad} problems` : "check: fixture and vocab tests agree");
  process.exit(bad ? 1 : 0);
} else {
  fs.mkdirSync(path.dirname(fixturePath), { recursive: true });
  fs.writeFileSync(fixturePath, serialize(fresh));
  console.log(`wrote ${fixturePath}: ${fresh.texts.length} texts x ${Object.keys(fresh.tokenizers).length} tokenizers`);
}
