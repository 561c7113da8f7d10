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
//   node tok_oracle.mjs --fuzz N --seed S --out /tmp/f.json
//                                  # N random texts (vocabulary pieces, their
//                                  # fragments, random code points) instead of
//                                  # the corpus; then run the C side with
//                                  # D2_TOK_FIXTURE=/tmp/f.json build/tests/test_tokenizer
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
  // stories260K with the newer Metaspace form (no normalizer; Metaspace
  // pre-tokenizer and decoder, prepend_scheme "first", split false);
  // tests/unit/test_tokenizer.c applies the same edit (metaspace_variant).
  stories260k_metaspace: { json: "assets/models/stories260K/hf/tokenizer.json", config: "assets/models/stories260K/hf/tokenizer_config.json", variant: "metaspace" },
};
const METASPACE = { type: "Metaspace", replacement: "\u2581", prepend_scheme: "first", split: false };
// llama.cpp vocab tests: test set -> tokenizer above.
export const VOCAB_TESTS = {
  "llama-spm": "phi3", "phi-3": "phi3", "llama-bpe": "llama3", "qwen2": "qwen3",
  "deepseek-r1-qwen": "qwen3", "gpt-2": "gpt2",
};
const N_SPECIAL = 40;

function load(name) {
  const d = TOKENIZERS[name];
  const tj = JSON.parse(fs.readFileSync(path.join(shared, d.json), "utf8"));
  if (d.variant === "metaspace") {
    tj.normalizer = null;
    tj.pre_tokenizer = METASPACE;
    tj.decoder = METASPACE;
  }
  const cfg = d.config ? JSON.parse(fs.readFileSync(path.join(shared, d.config), "utf8")) : {};
  return { tok: new Tokenizer(tj, cfg), byteFallback: !!tj.model.byte_fallback };
}

function arg(name, def) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : def;
}

function mulberry32(seed) {
  return function () {
    seed |= 0;
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// Random texts: decoded vocabulary pieces of every tokenizer, fragments of
// them, separators and random assigned code points.
function fuzzTexts(n, seed) {
  const rng = mulberry32(seed);
  const pieces = [];
  for (const name of Object.keys(TOKENIZERS)) {
    const { tok } = load(name);
    const vocab = tok.model.vocab;
    for (let i = 0; i < 3000; i++) {
      const id = Math.floor(rng() * vocab.length);
      if (vocab[id] === undefined) continue;
      const d = tok.decode([id], { skip_special_tokens: false, clean_up_tokenization_spaces: false });
      if (!d.includes("\uFFFD")) pieces.push(d);
    }
  }
  const seps = [" ", "  ", "\n", "\r\n", "\t", "", "", "", "'s", "'LL", "\u00A0", "\u3000", "\u0301", "\u200D"];
  const texts = [];
  for (let k = 0; k < n; k++) {
    let s = "";
    const parts = 1 + Math.floor(rng() * 12);
    for (let i = 0; i < parts; i++) {
      const r = rng();
      if (r < 0.6) {
        const p = pieces[Math.floor(rng() * pieces.length)];
        s += r < 0.45 ? p : Array.from(p).slice(Math.floor(rng() * 3)).join("");
      } else if (r < 0.8) {
        s += seps[Math.floor(rng() * seps.length)];
      } else {
        // Blocks whose assignments did not change after Unicode 14 (the
        // version of the engine's tables; node's may be newer).
        const planes = [[0x20, 0x2ff], [0x300, 0x36f], [0x370, 0xcff], [0xd00, 0xeff], [0x1000, 0x1fff],
          [0x2000, 0x2bff], [0x3000, 0x9fff], [0xac00, 0xd7ff], [0xf900, 0xfffd], [0x1f300, 0x1f64f],
          [0x20000, 0x2a6df]];
        const [a, b] = planes[Math.floor(rng() * planes.length)];
        const cp = a + Math.floor(rng() * (b - a + 1));
        const c = String.fromCodePoint(cp);
        if (!/[\p{Cn}\p{Cs}\p{Co}]/u.test(c)) s += c;
      }
    }
    texts.push(s);
  }
  return texts;
}

function run() {
  const fuzzN = Number(arg("--fuzz", "0"));
  // The committed corpus: the fixed/seeded texts plus 300 fuzz texts (seed 1).
  const texts = fuzzN > 0 ? fuzzTexts(fuzzN, Number(arg("--seed", "1"))) : makeCorpus().concat(fuzzTexts(300, 1));
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
    `${JSON.stringify(name)}: {"json": ${JSON.stringify(v.json)}, "config": ${JSON.stringify(v.config)}, "variant": ${JSON.stringify(v.variant ?? null)},\n` +
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
  const dest = arg("--out", fixturePath);
  fs.mkdirSync(path.dirname(dest), { recursive: true });
  fs.writeFileSync(dest, serialize(fresh));
  console.log(`wrote ${dest}: ${fresh.texts.length} texts x ${Object.keys(fresh.tokenizers).length} tokenizers`);
}
