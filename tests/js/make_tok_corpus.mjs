// tests/js/make_tok_corpus.mjs — builds the deterministic tokenizer test
// corpus (>= 500 texts) used by tests/js/tok_oracle.mjs. Everything comes from
// fixed lists and a seeded PRNG (mulberry32), so the output never changes
// unless this file does. Usage: import { makeCorpus } from "./make_tok_corpus.mjs",
// or `node make_tok_corpus.mjs` to print the texts as JSON.
//
// Characters are limited to those assigned in Unicode 14 (the version of the
// engine's generated tables, tools/gen_unicode_tables.py); lone surrogates
// are never produced (JS strings could hold them, UTF-8 cannot).

function mulberry32(seed) {
  return function () {
    seed |= 0;
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const FIXED = [
  "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r\n\r\n", " \n", "\t\t\n  \n",
  "Hello world", "Hello World!", " Hello", "  Hello  ", "hello\n\nworld", "Hello\r\nWorld\r\n",
  "Once upon a time, there was a little girl named Lily. She loved to play outside.",
  "It's a dog's life, isn't it? I'LL go. You'RE right; we'Ve seen it. He'd say I'm OK.",
  "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D",
  "don't won't can't shouldn't y'all ma'am rock'n'roll",
  "1 12 123 1234 12345 123456 1234567 3.14159 1,000,000 2024-01-31",
  "0000000000000000000000000000000000", "a1b22c333d4444e55555",
  "tabs\there\tand\tthere", "a  b   c    d     e", "trailing spaces   ", "   leading spaces",
  "line1\nline2\r\nline3\rline4", "mixed \t \n whitespace \r\n\t end",
  "中文测试：你好，世界！", "日本語のテキストです。カタカナとひらがな。", "한국어 텍스트입니다",
  "Привет, мир! Как дела?", "Ελληνικά γράμματα", "مرحبا بالعالم", "שלום עולם",
  "नमस्ते दुनिया", "สวัสดีชาวโลก", "ស្វាគមន៍មកកាន់ប្រទេសកម្ពុជា", "Cửa Việt",
  "café naïve résumé façade", "cafe\u0301 nai\u0308ve re\u0301sume\u0301", "A\u030A \u212B \u00C5",
  "\u1100\u1161\u11A8 \u1112\u1161\u11AB", "e\u0323\u0302 \u1EC7 o\u031B\u0301", "\u0041\u0300\u0316",
  "\u2126 \u212A \u00E9\u0301", "\u0958 \u0915\u093C", "Z\u0351\u036B\u0343\u036A\u0302\u036B\u033D\u034F",
  "😀 😃 😄", "👨‍👩‍👧‍👦 family", "👍🏻👍🏼👍🏽👍🏾👍🏿", "🇺🇸🇫🇷🇯🇵 flags", "🏳️‍🌈 ❤️‍🔥", "🧑🏽‍💻 coder",
  "emoji😀inside😀words", "\u00A0nbsp\u00A0here\u00A0", "ideographic\u3000space", "thin\u2009space\u200Ahair",
  "zero\u200Bwidth\u200Cjoiner\u200Dhere", "next\u0085line", "bom\uFEFFinside", "\u000B\u000Cvt ff",
  "control\u0001\u0002\u0007\u001Bchars", "nul\u0000byte",
  "<|endoftext|>", "Hello<|endoftext|>World", "a <|endoftext|> b", "<|endoftext|><|endoftext|>",
  "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<|begin_of_text|>Hello<|eot_id|>",
  "<|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>",
  "<s>Hello</s>", "<s> Hello </s> ", "text </s>  more", "<unk><s></s>", "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>",
  "<|system|>  be brief  <|end|>", "<|endoftext|> spaced", "< |endoftext| >", "<|im_start", "</think>done<think>",
  "▁ already ▁▁ meta", "\u2581leading meta", "x▁y",
  "def foo(x):\n    return x * 2\n\n\nclass A:\n\tpass\n",
  "for (int i = 0; i < n; i++) { sum += a[i]; }\r\n",
  "https://example.com/path?q=1&r=two#frag", "user@example.org", "$100.00 €50 £3 ¥1000",
  "((()))[[[]]]{{{}}} !!! ??? ... --- ***", "\"quoted\" 'single' `back`", "a-b_c.d/e\\f|g",
  "UPPER lower MiXeD", "ALLCAPS'S TEST'LL", "x'sy 'ss '''", "I'M HERE", "’s curly’ll",
  "3rd 21st 100th", "½ ¼ ¾ ² ³ ¹ Ⅻ ⅷ ① ⑩", "٣٤٥ ४५६ ๓๔๕", "𝐀𝐁𝐂 𝟏𝟐𝟑", "𠀀𠀁 𪜀",
  "ﬁ ﬂ ﬀ", "Ａｂｃ １２３", "hello\u00ADsoft", "ends with newline\n", "ends with crlf\r\n",
  "\n\n\nstarts with newlines", "word\n\n\n\nword", "   \n   \n   ", " \r\n \r\n",
  "a\u0301\u0302\u0303\u0304", "\u0301leading combining", "ᄀ ᅡ ᆨ", "\u1100\u1161", "\uAC00\u11A8",
];

const WORDS = [
  "the", "cat", "sat", "on", "mat", "Lily", "Tim", "happy", "ball", "tree", "sun", "big", "little",
  "played", "jumped", "said", "friend", "mom", "dog", "bird", "park", "toy", "red", "blue",
  "Hello", "World", "GPU", "tokenizer", "KV-cache", "llama", "qwen", "gpt", "function", "return",
  "мир", "привет", "кошка", "日本", "東京", "你好", "世界", "学习", "안녕", "세계", "ខ្មែរ", "ភាសា",
  "مرحبا", "كتاب", "नमस्ते", "भारत", "γεια", "κόσμος", "café", "naïve", "Việt", "über", "straße",
  "😀", "🎉", "👨‍💻", "🇩🇪", "👋🏽", "❤️", "🔥", "✨",
  "123", "4567", "0", "99999", "3.5", "1e10", "x2", "v1.2.3",
  "it's", "they'll", "we're", "I've", "she'd", "I'm", "DON'T", "WE'LL",
  "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|eot_id|>", "<|user|>", "<|end|>",
  "e\u0301", "o\u0308", "A\u030A", "n\u0303", "\u1100\u1161", "i\u0307",
];
const SEPS = [" ", " ", " ", " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", ", ", ". ", "! ", "? ", "; ", ": ",
  "-", "_", "/", "", "", " (", ") ", "\"", "'", " \n ", "\u00A0", "\u3000", " \t "];

const CODEPOINT_POOLS = [
  [0x20, 0x7e], [0xa0, 0x17f], [0x300, 0x36f], [0x370, 0x3ff], [0x400, 0x4ff], [0x590, 0x5ff],
  [0x600, 0x6ff], [0x900, 0x97f], [0xe00, 0xe5b], [0x1780, 0x17dd], [0x1100, 0x11ff], [0x2000, 0x206f],
  [0x3040, 0x30ff], [0x4e00, 0x9fa5], [0xac00, 0xd7a3], [0x1f300, 0x1f5ff], [0x1f600, 0x1f64f],
];

function pick(rng, arr) {
  return arr[Math.floor(rng() * arr.length)];
}

// True for code points that are assigned (per a conservative check) in the
// pools above; skips gaps that some pools contain.
function okCodepoint(cp) {
  if (cp >= 0xd800 && cp <= 0xdfff) return false;
  const s = String.fromCodePoint(cp);
  return !/\p{Cn}/u.test(s) && !/\p{Cs}/u.test(s);
}

export function makeCorpus() {
  const texts = FIXED.slice();
  // Word salads: sentences built from the word and separator lists.
  const rng = mulberry32(20251123);
  for (let k = 0; k < 300; k++) {
    const n = 1 + Math.floor(rng() * 24);
    let s = "";
    for (let i = 0; i < n; i++) {
      s += pick(rng, WORDS);
      if (i + 1 < n || rng() < 0.2) s += pick(rng, SEPS);
    }
    if (rng() < 0.15) s = pick(rng, SEPS) + s;
    texts.push(s);
  }
  // Random code points from a few blocks (assigned ones only).
  const rng2 = mulberry32(4242);
  for (let k = 0; k < 120; k++) {
    const n = 1 + Math.floor(rng2() * 40);
    let s = "";
    for (let i = 0; i < n; i++) {
      if (rng2() < 0.15) { s += pick(rng2, SEPS); continue; }
      const [a, b] = pick(rng2, CODEPOINT_POOLS);
      const cp = a + Math.floor(rng2() * (b - a + 1));
      if (okCodepoint(cp)) s += String.fromCodePoint(cp);
    }
    texts.push(s);
  }
  // Digit, space and punctuation runs.
  const rng3 = mulberry32(777);
  for (let k = 0; k < 40; k++) {
    let s = "";
    const parts = 1 + Math.floor(rng3() * 8);
    for (let i = 0; i < parts; i++) {
      const kind = Math.floor(rng3() * 5);
      const len = 1 + Math.floor(rng3() * 12);
      const unit = ["7", " ", "\n", "!", "\r\n"][kind];
      s += unit.repeat(len);
      if (rng3() < 0.5) s += pick(rng3, WORDS);
    }
    texts.push(s);
  }
  // A few long texts (a paragraph repeated).
  const para = texts[17] + " " + texts[18] + "\n";
  texts.push(para.repeat(20));
  texts.push(("The quick brown fox jumps over the lazy dog. 0123456789 ").repeat(40));
  return texts;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const t = makeCorpus();
  process.stdout.write(JSON.stringify(t, null, 0) + "\n");
  process.stderr.write(`${t.length} texts\n`);
}
