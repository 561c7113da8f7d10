#!/usr/bin/env python3
"""tests/integration/test_api.py — the HTTP daemon end to end: starts the real
`d2od serve` on 127.0.0.1 (free ports) with stories260K and drives it over
raw HTTP and with the official `openai` npm client (tests/js/openai_client.test.mjs).

Daemons (each started, checked and stopped here; all traffic is loopback):
  main   default settings, NOTIFY_SOCKET (READY=1), greedy parity with
         `d2od generate`, 64 concurrent streams, the bad-input table, metrics
  auth   --api-key: 401s, the key accepted
  queue  --max-seqs 1 --max-queue 1: 429s
  long   --ctx-len 8192: a disconnect mid-stream frees every page; SIGTERM under
         load drains (STOPPING=1, complete streams, exit 0 within the timeout)

Usage: test_api.py path/to/d2od   (run from the repo root; D2_SHARED locates ../shared)
Prints one line per check and a closing "api: N passed, N failed[, N skipped]" line;
exits 1 when a check failed.
"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

D2OD = sys.argv[1] if len(sys.argv) > 1 else "build/d2od"
SHARED = os.environ.get("D2_SHARED", "../shared")
GGUF = os.path.join(SHARED, "assets/models/stories260K/stories260K.gguf")
HOST = "127.0.0.1"
CTX = 2048  # stories260K's context
results = {"passed": 0, "failed": 0, "skipped": 0}
T0 = time.time()


def check(name, cond, detail=""):
    if cond:
        results["passed"] += 1
        print(f"ok   {name}", flush=True)
    else:
        results["failed"] += 1
        print(f"FAIL {name} {str(detail)[:800]}", flush=True)
    return cond


def skip(name, why):
    results["skipped"] += 1
    print(f"skip {name}: {why}", flush=True)


# ---- daemons ---------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Notify:
    """An AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, d, name):
        self.path = os.path.join(d, f"notify-{name}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.msgs = []

    def wait_for(self, line, timeout):
        end = time.time() + timeout
        while time.time() < end:
            if any(line in m.split("\n") for m in self.msgs):
                return True
            self.sock.settimeout(max(0.01, end - time.time()))
            try:
                self.msgs.append(self.sock.recv(4096).decode("utf-8", "replace"))
            except socket.timeout:
                pass
        return any(line in m.split("\n") for m in self.msgs)

    def close(self):
        self.sock.close()


class Daemon:
    def __init__(self, name, args, tmp, notify=False):
        self.name = name
        self.notify = Notify(tmp, name) if notify else None
        self.log_path = os.path.join(tmp, f"{name}.log")
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        if self.notify:
            env["NOTIFY_SOCKET"] = self.notify.path
        for attempt in range(3):  # a free port can be taken between probe and bind
            self.port = free_port()
            cmd = [D2OD, "serve", "--model", GGUF, "--host", HOST, "--port", str(self.port), "--threads", "2",
                   "--log-requests", "false"] + args
            self.log = open(self.log_path, "wb")
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
            if self.wait_health(30):
                return
            self.kill()
        raise RuntimeError(f"daemon {name} did not start: {self.log_text()[-2000:]}")

    def wait_health(self, timeout):
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                return False
            try:
                st, _, _ = req(self, "GET", "/health", timeout=2)
                if st == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def stop(self, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        if self.notify:
            self.notify.close()
        return self.proc.returncode


# ---- HTTP ---------------------------------------------------------------------------


def req(d, method, path, body=None, headers=None, timeout=60):
    """One request on a fresh connection: (status, headers dict, body bytes)."""
    c = http.client.HTTPConnection(HOST, d.port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        h = {"Content-Type": "application/json"} if body is not None else {}
        h.update(headers or {})
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def raw_request(d, method, path, body, timeout=30):
    """Sends a request whose body the server may refuse half-way (413): a send
    error is expected then, and the answer is read anyway. (status, headers, body)."""
    c = socket.create_connection((HOST, d.port), timeout=timeout)
    try:
        c.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                  % (method.encode(), path.encode(), len(body)))
        try:
            c.sendall(body)
        except OSError:
            pass
        data = b""
        try:
            while True:
                x = c.recv(65536)
                if not x:
                    break
                data += x
        except OSError:
            pass
    finally:
        c.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d+)", head)
    return (int(m.group(1)) if m else None), {}, rest


def post(d, path, body, **kw):
    st, h, b = req(d, "POST", path, body, **kw)
    try:
        return st, json.loads(b)
    except ValueError:
        return st, {"_raw": b[:300]}


def is_openai_error(j):
    """{"error": {"message": str, "type": str, "param": str|null, "code": str|null}}"""
    if not isinstance(j, dict) or set(j) != {"error"}:
        return False
    e = j["error"]
    return (isinstance(e, dict) and set(e) == {"message", "type", "param", "code"}
            and isinstance(e["message"], str) and e["message"] != "" and isinstance(e["type"], str)
            and (e["param"] is None or isinstance(e["param"], str))
            and (e["code"] is None or isinstance(e["code"], str)))


class Stream:
    """A streamed request read event by event. .error says what was malformed."""

    def __init__(self, d, path, body, timeout=60):
        self.conn = http.client.HTTPConnection(HOST, d.port, timeout=timeout)
        self.conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.texts, self.finish, self.usage, self.events = {}, {}, None, []
        self.done = False
        self.error = None
        self.t_first = None

    def next_event(self):
        """Returns the next event's data string, or None at the end of the body."""
        data = []
        while True:
            line = self.resp.readline()
            if not line:
                if data:
                    self.error = "body ended inside an event"
                return None
            line = line.decode("utf-8")
            if line in ("\n", "\r\n"):
                if data:
                    return "\n".join(data)
                continue
            if not line.startswith("data: "):
                self.error = f"not a data line: {line!r}"
                return None
            data.append(line[6:].rstrip("\r\n"))

    def read_one(self):
        """Reads and records one event; False at the end."""
        ev = self.next_event()
        if ev is None:
            return False
        if self.t_first is None:
            self.t_first = time.time()
        if self.done:
            self.error = f"event after [DONE]: {ev[:100]!r}"
            return False
        if ev == "[DONE]":
            self.done = True
            return True
        try:
            j = json.loads(ev)
        except ValueError:
            self.error = f"bad JSON event {ev[:100]!r}"
            return False
        self.events.append(j)
        if j.get("object") not in ("text_completion", "chat.completion.chunk"):
            self.error = f"bad object {j.get('object')}"
        if j.get("usage"):
            self.usage = j["usage"]
        for c in j.get("choices", []):
            t = c.get("text")
            if t is None:
                t = (c.get("delta") or {}).get("content") or ""
            self.texts[c["index"]] = self.texts.get(c["index"], "") + t
            if c.get("finish_reason"):
                if c["index"] in self.finish:
                    self.error = f"two finish_reasons for choice {c['index']}"
                self.finish[c["index"]] = c["finish_reason"]
        return True

    def read_all(self):
        try:
            while self.read_one():
                pass
        except (OSError, http.client.HTTPException, ValueError) as ex:
            self.error = f"{type(ex).__name__}: {ex}"
        self.close()
        return self

    def ok(self):
        """A well-formed stream: 200, events, every choice finished, [DONE] last."""
        return self.status == 200 and self.error is None and self.done and len(self.finish) == len(self.texts) > 0

    def close(self):
        self.conn.close()


def metrics(d):
    st, _, b = req(d, "GET", "/metrics", timeout=10)
    out = {}
    for line in b.decode().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, val = line.rpartition(" ")
        out[name] = float(val)
    return st, out, b.decode()


def metric(m, name, **labels):
    for k, v in m.items():
        if k == name or k.startswith(name + "{"):
            if all(f'{lk}="{lv}"' in k for lk, lv in labels.items()):
                return v
    return None


def completion(d, prompt, max_tokens, **extra):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    body.update(extra)
    return post(d, "/v1/completions", body)


# ---- tests --------------------------------------------------------------------------

PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The little dog", "One day, a big bird",
           "Sam had a red ball", "Mom said", "The sun was hot and", "There was a tree"]
GREEDY_N = 48


def generate_ref(prompt, n):
    r = subprocess.run([D2OD, "generate", "--model", GGUF, "--prompt", prompt, "--temperature", "0",
                        "--max-tokens", str(n), "--threads", "1"], capture_output=True, timeout=60)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


def test_ready_health_metrics(d):
    check("READY=1 on the notify socket", d.notify.wait_for("READY=1", 5), d.notify.msgs)
    st, h, b = req(d, "GET", "/health")
    check("/health 200 after READY", st == 200, (st, b))
    st, _, text = metrics(d)
    names = ["d2od:num_requests_running", "d2od:num_requests_decoding", "d2od:num_requests_waiting", "d2od:kv_cache_usage_perc",
             "d2od:num_preemptions_total", "d2od:prompt_tokens_total", "d2od:generation_tokens_total",
             "d2od:time_to_first_token_seconds", "d2od:inter_token_latency_seconds",
             "d2od:e2e_request_latency_seconds", "d2od:request_success_total", "d2od:kv_pages_total",
             "d2od:kv_pages_free"]
    missing = [n for n in names if not re.search(r"^" + re.escape(n) + r"(_bucket|_sum|_count)?\{", text, re.M)]
    check("/metrics has every metric name", st == 200 and not missing, missing)
    for n in ("d2od:time_to_first_token_seconds", "d2od:inter_token_latency_seconds", "d2od:e2e_request_latency_seconds"):
        check(f"/metrics {n} is a histogram", f"# TYPE {n} histogram" in text and f'{n}_bucket{{' in text and 'le="+Inf"' in text)
    st, h, b = req(d, "GET", "/v1/models")
    j = json.loads(b)
    check("/v1/models", st == 200 and j["object"] == "list" and j["data"][0]["id"] == "stories260K", b)


def test_greedy_parity(d, tmp):
    cases = []
    for p in PROMPTS[:5]:
        rc, out, err = generate_ref(p, GREEDY_N)
        if not check(f"d2od generate runs ({p!r})", rc == 0 and out, err[-300:]):
            continue
        cases.append({"prompt": p, "text": out})
        st, j = completion(d, p, GREEDY_N)
        got = j.get("choices", [{}])[0].get("text") if st == 200 else j
        check(f"HTTP greedy == d2od generate ({p!r})", got == out, f"\n  got:  {got!r}\n  want: {out!r}")
        s = Stream(d, "/v1/completions", {"prompt": p, "max_tokens": GREEDY_N, "temperature": 0, "stream": True}).read_all()
        check(f"streamed greedy == d2od generate ({p!r})", s.ok() and s.texts.get(0) == out,
              f"{s.error} {s.texts.get(0)!r}")
    path = os.path.join(tmp, "greedy.json")
    with open(path, "w") as f:
        json.dump({"max_tokens": GREEDY_N, "cases": cases}, f)
    return path


def test_stream_usage(d):
    s = Stream(d, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "stream": True,
                                      "stream_options": {"include_usage": True}}).read_all()
    last = s.events[-1] if s.events else {}
    check("include_usage: last chunk before [DONE] has usage and no choices",
          s.ok() and last.get("choices") == [] and last.get("usage", {}).get("completion_tokens") == 10
          and last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 10
          and all(e.get("usage") is None for e in s.events[:-1]), f"{s.error} {s.events[-2:]}")
    s = Stream(d, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                                           "stream": True, "n": 2, "temperature": 0}).read_all()
    check("chat stream n=2: both choices finish", s.ok() and set(s.finish) == {0, 1} and s.texts[0] == s.texts[1],
          f"{s.error} {s.texts} {s.finish}")


def test_concurrent(d, n_clients=64):
    want = {}
    for p in PROMPTS:
        st, j = completion(d, p, 160, ignore_eos=True)
        want[p] = j["choices"][0]["text"] if st == 200 else None
    streams = [None] * n_clients
    errors = []

    def client(i):
        p = PROMPTS[i % len(PROMPTS)]
        body = {"prompt": p, "max_tokens": 160, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        if i % 2:
            body = {"model": "stories260K", **body}
        try:
            streams[i] = Stream(d, "/v1/completions", body, timeout=90).read_all()
        except Exception as ex:  # noqa: BLE001 - any client failure is a test failure
            errors.append(f"client {i}: {type(ex).__name__}: {ex}")

    t0 = time.time()
    th = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in th:
        t.start()
    for t in th:
        t.join(120)
    bad = []
    for i, s in enumerate(streams):
        p = PROMPTS[i % len(PROMPTS)]
        if s is None or not s.ok() or s.texts.get(0) != want[p] or not s.usage:
            bad.append((i, s and s.error, s and s.texts.get(0), want[p]))
    check(f"{n_clients} concurrent streaming clients: well-formed, [DONE], text == lone greedy request",
          not errors and not bad, f"{len(bad)} bad, {errors[:3]} {bad[:2]}")
    print(f"     ({n_clients} streams in {time.time() - t0:.2f} s)", flush=True)


BIG = json.dumps({"prompt": "x" * (10 * 1024 * 1024), "max_tokens": 2}).encode()


def bad_input_table(d):
    ids_over = [3 + i % 500 for i in range(CTX + 10)]
    long_text = "Once upon a time there was a little girl. " * 300
    msgs = [{"role": "user", "content": "Hi"}]
    deep = b"[" * 100000 + b"]" * 100000
    C, CH = "/v1/completions", "/v1/chat/completions"
    # (name, method, path, body (bytes or JSON-able), status, param or ..., message regex or None)
    return [
        ("malformed JSON", "POST", C, b'{"prompt": "x", "max_tokens": ', 400, None, "JSON"),
        ("empty body", "POST", C, b"", 400, None, None),
        ("body is not an object", "POST", C, b"[1, 2, 3]", 400, None, None),
        ("deeply nested JSON", "POST", C, deep, 400, None, None),
        ("duplicate keys", "POST", C, b'{"prompt": "a", "prompt": "b"}', 400, None, None),
        ("invalid UTF-8 body", "POST", C, b'{"prompt": "Once \xff\xfe upon", "max_tokens": 3}', 400, None, None),
        ("missing prompt", "POST", C, {"max_tokens": 3}, 400, "prompt", None),
        ("prompt wrong type", "POST", C, {"prompt": 5}, 400, "prompt", None),
        ("prompt list of mixed junk", "POST", C, {"prompt": ["a", {"b": 1}]}, 400, "prompt", None),
        ("prompt token id out of vocab", "POST", C, {"prompt": [1, 600], "max_tokens": 2}, 400, "prompt", None),
        ("max_tokens wrong type", "POST", C, {"prompt": "a", "max_tokens": "10"}, 400, "max_tokens", None),
        ("max_tokens negative", "POST", C, {"prompt": "a", "max_tokens": -5}, 400, "max_tokens", None),
        ("max_tokens zero", "POST", C, {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", None),
        ("max_tokens huge", "POST", C, {"prompt": "a", "max_tokens": 10 ** 12}, 400, "max_tokens", None),
        ("max_tokens float", "POST", C, {"prompt": "a", "max_tokens": 1e30}, 400, "max_tokens", None),
        ("max_tokens over the context", "POST", C, {"prompt": "a", "max_tokens": 4000}, 400, ..., "2048"),
        ("temperature wrong type", "POST", C, {"prompt": "a", "temperature": "hot"}, 400, "temperature", None),
        ("temperature out of range", "POST", C, {"prompt": "a", "temperature": 2.5}, 400, "temperature", None),
        ("top_p zero", "POST", C, {"prompt": "a", "top_p": 0}, 400, "top_p", None),
        ("n zero", "POST", C, {"prompt": "a", "n": 0}, 400, "n", None),
        ("n over max_n", "POST", C, {"prompt": "a", "n": 1000}, 400, "n", None),
        ("stream wrong type", "POST", C, {"prompt": "a", "stream": "yes"}, 400, "stream", None),
        ("stop wrong type", "POST", C, {"prompt": "a", "stop": 5}, 400, "stop", None),
        ("stop too many", "POST", C, {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ("logprobs over 20", "POST", C, {"prompt": "a", "logprobs": 50}, 400, "logprobs", None),
        ("logit_bias bad key", "POST", C, {"prompt": "a", "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
        ("stream_options wrong type", "POST", C, {"prompt": "a", "stream_options": 3}, 400, "stream_options", None),
        ("prompt over the context (ids)", "POST", C, {"prompt": ids_over, "max_tokens": 4}, 400, ..., "2048"),
        ("prompt over the context (text)", "POST", C, {"prompt": long_text, "max_tokens": 4}, 400, ..., "2048"),
        ("unknown model", "POST", C, {"model": "gpt-17", "prompt": "a"}, 404, "model", "gpt-17"),
        ("chat: messages missing", "POST", CH, {"max_tokens": 3}, 400, "messages", None),
        ("chat: empty messages", "POST", CH, {"messages": []}, 400, "messages", None),
        ("chat: messages wrong type", "POST", CH, {"messages": "hi"}, 400, "messages", None),
        ("chat: message not an object", "POST", CH, {"messages": [5]}, 400, "messages", None),
        ("chat: unknown role", "POST", CH, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", None),
        ("chat: content wrong type", "POST", CH, {"messages": [{"role": "user", "content": 5}]}, 400, "messages", None),
        ("chat: top_logprobs without logprobs", "POST", CH, {"messages": msgs, "top_logprobs": 2}, 400, "top_logprobs", None),
        ("chat: unknown model", "POST", CH, {"model": "nope", "messages": msgs}, 404, "model", None),
        ("chat: over the context", "POST", CH, {"messages": [{"role": "user", "content": long_text}]}, 400, ..., "2048"),
        ("10 MB body", "POST", C, BIG, 413, ..., None),
        ("unknown route", "GET", "/v1/nope", None, 404, ..., None),
        ("unknown route (POST)", "POST", "/v2/completions", {"prompt": "a"}, 404, ..., None),
        ("wrong method", "GET", C, None, 405, ..., None),
        ("detokenize bad ids", "POST", "/detokenize", {"tokens": [1, -3]}, 400, "tokens", None),
        ("tokenize wrong type", "POST", "/tokenize", {"prompt": 3}, 400, "prompt", None),
    ]


def test_bad_inputs(d):
    for name, method, path, body, status, param, msg in bad_input_table(d):
        try:
            if isinstance(body, bytes) and len(body) > 4 << 20:
                st, _, b = raw_request(d, method, path, body)
            else:
                st, _, b = req(d, method, path, body, timeout=30)
        except (OSError, http.client.HTTPException) as ex:
            check(f"bad input: {name} -> {status}", False, f"{type(ex).__name__}: {ex}")
            continue
        try:
            j = json.loads(b)
        except ValueError:
            j = {"_raw": b[:200]}
        ok = st == status and is_openai_error(j)
        if ok and param is not ...:
            ok = j["error"]["param"] == param
        if ok and msg:
            ok = re.search(msg, j["error"]["message"]) is not None
        check(f"bad input: {name} -> {status}", ok, f"status {st} body {b[:300]!r}")
    # A body over the limit sent chunked (no Content-Length) is cut off too.
    c = socket.create_connection((HOST, d.port), timeout=30)
    try:
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: application/json\r\n\r\n")
        chunk = b"x" * 65536
        try:
            for _ in range(40):  # 2.5 MB > the 1 MB default limit
                c.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            c.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < 200:
                x = c.recv(65536)
                if not x:
                    break
                data += x
        except OSError:
            pass
        check("bad input: chunked body over the limit -> 413", data.startswith(b"HTTP/1.1 413"), data[:200])
    finally:
        c.close()
    st, j = completion(d, "Once upon a time", 8)
    check("daemon still serves after the bad inputs", st == 200 and j["choices"][0]["text"], j)
    st, _, b = req(d, "GET", "/health")
    check("/health still 200 after the bad inputs", st == 200, b)
    st, m, _ = metrics(d)
    check("/metrics counts the 4xx answers", (metric(m, "d2od:http_4xx_total") or 0) >= 40, metric(m, "d2od:http_4xx_total"))


def test_tokenize(d):
    st, j = post(d, "/tokenize", {"prompt": "Once upon a time"})
    check("/tokenize", st == 200 and j.get("tokens") and j["count"] == len(j["tokens"]), j)
    if st == 200:
        st2, j2 = post(d, "/detokenize", {"tokens": j["tokens"]})
        check("/detokenize round trip", st2 == 200 and j2.get("prompt", "").strip().endswith("Once upon a time"), j2)


def test_auth(tmp):
    d = Daemon("auth", ["--api-key", "sekrit-123"], tmp)
    try:
        body = {"prompt": "Once", "max_tokens": 2}
        for name, hdr in (("missing", {}), ("wrong", {"Authorization": "Bearer sekrit-124"}),
                          ("prefix of the key", {"Authorization": "Bearer sekrit-12"}),
                          ("not Bearer", {"Authorization": "Basic c2Vrcml0LTEyMw=="}),
                          ("empty", {"Authorization": "Bearer "})):
            st, h, b = req(d, "POST", "/v1/completions", body, headers=hdr)
            try:
                j = json.loads(b)
            except ValueError:
                j = None
            check(f"auth: {name} key -> 401", st == 401 and is_openai_error(j) and j["error"]["type"] == "authentication_error",
                  (st, b[:200]))
        st, _, b = req(d, "GET", "/v1/models")
        check("auth: /v1/models without the key -> 401", st == 401, st)
        st, _, b = req(d, "POST", "/v1/completions", body, headers={"Authorization": "Bearer sekrit-123"})
        check("auth: the key -> 200", st == 200, b[:200])
        st, _, b = req(d, "GET", "/health")
        check("auth: /health needs no key by default", st == 200, st)
        return d
    except Exception:
        d.stop()
        raise


def test_sighup_reload(tmp):
    """SIGHUP re-reads the config file: a live directive (api_key) takes effect
    at once, RELOADING=1 then READY=1 reach systemd, a directive that needs a
    restart (max_seqs) is reported and left as it was, and a broken file keeps the
    old settings."""
    conf = os.path.join(tmp, "reload.conf")
    with open(conf, "w") as f:
        f.write('api_key "first-key"\n')
    d = Daemon("reload", ["--config", conf], tmp, notify=True)
    try:
        d.notify.wait_for("READY=1", 10)
        body = {"prompt": "Once", "max_tokens": 2}
        st, _, _ = req(d, "POST", "/v1/completions", body, headers={"Authorization": "Bearer first-key"})
        check("reload: first key accepted", st == 200, st)
        with open(conf, "w") as f:
            f.write('api_key "second-key"\nmax_seqs 3\n')
        d.notify.msgs.clear()
        d.proc.send_signal(signal.SIGHUP)
        got = d.notify.wait_for("RELOADING=1", 10)
        check("reload: RELOADING=1 sent on SIGHUP", got, "no RELOADING=1")
        check("reload: READY=1 after the reload", d.notify.wait_for("READY=1", 10), "no READY=1")
        st1, _, _ = req(d, "POST", "/v1/completions", body, headers={"Authorization": "Bearer first-key"})
        st2, _, _ = req(d, "POST", "/v1/completions", body, headers={"Authorization": "Bearer second-key"})
        check("reload: api_key changed live (old 401, new 200)", st1 == 401 and st2 == 200, (st1, st2))
        log = d.log_text()
        check("reload: a restart-only change (max_seqs) is reported, not applied", "max_seqs changed but needs a restart" in log,
              log[-600:])
        with open(conf, "w") as f:
            f.write('api_key "third-key"\nmax_queue -5\n')
        d.notify.msgs.clear()
        d.proc.send_signal(signal.SIGHUP)
        d.notify.wait_for("READY=1", 10)
        st3, _, _ = req(d, "POST", "/v1/completions", body, headers={"Authorization": "Bearer second-key"})
        check("reload: a broken file keeps the old settings", st3 == 200 and "reload failed" in d.log_text(), st3)
        rc = d.stop()
        check("reload: SIGTERM exits 0", rc == 0, rc)
    except Exception:
        d.stop()
        raise


def test_queue_limit(tmp):
    d = Daemon("queue", ["--max-seqs", "1", "--max-queue", "1", "--ctx-len", "8192", "--kv-mem-mb", "64",
                         "--max-tokens-limit", "8192"], tmp)
    results_ = [None] * 6

    def client(i):
        try:
            results_[i] = post(d, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2500,
                                                      "ignore_eos": True, "temperature": 0}, timeout=90)
        except Exception as ex:  # noqa: BLE001
            results_[i] = (None, str(ex))

    th = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in th:
        t.start()
    for t in th:
        t.join(120)
    sts = [r[0] if r else None for r in results_]
    limited = [r[1] for r in results_ if r and r[0] == 429]
    okd = [r[1] for r in results_ if r and r[0] == 200]
    check("queue limit: some concurrent requests get 429, the rest complete",
          len(limited) >= 1 and len(okd) >= 2 and len(limited) + len(okd) == 6, sts)
    check("queue limit: 429 is OpenAI-shaped rate_limit_error",
          bool(limited) and all(is_openai_error(j) and j["error"]["type"] == "rate_limit_error" for j in limited), limited[:1])
    check("queue limit: accepted requests are complete",
          all(j["usage"]["completion_tokens"] == 2500 and j["choices"][0]["finish_reason"] == "length" for j in okd),
          [j.get("usage") for j in okd])
    return d


def wait_pages_free(d, timeout):
    end = time.time() + timeout
    m = {}
    while time.time() < end:
        _, m, _ = metrics(d)
        if metric(m, "d2od:kv_pages_free") == metric(m, "d2od:kv_pages_total") and metric(m, "d2od:num_requests_running") == 0:
            return True, m
        time.sleep(0.05)
    return False, m


def test_disconnect(d):
    _, m0, _ = metrics(d)
    aborted0 = metric(m0, "d2od:request_success_total", finished_reason="abort") or 0
    gen0 = metric(m0, "d2od:generation_tokens_total") or 0
    for kind, path, body in (
            ("completions", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 7000, "ignore_eos": True,
                                                "stream": True}),
            ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story"}],
                                              "max_tokens": 7000, "ignore_eos": True, "stream": True})):
        s = Stream(d, path, body)
        got = 0
        while got < 5 and s.read_one():
            got += 1
        _, m1, _ = metrics(d)
        in_use = metric(m1, "d2od:kv_pages_total") - metric(m1, "d2od:kv_pages_free")
        s.resp.close()
        s.conn.sock and s.conn.sock.close()
        s.close()
        t0 = time.time()
        ok, m2 = wait_pages_free(d, 2.0)
        check(f"disconnect mid-stream ({kind}): kv_pages_free == kv_pages_total within 2 s",
              got == 5 and in_use > 0 and ok, f"events {got}, in use before {in_use}, after {metric(m2, 'd2od:kv_pages_free')}"
              f"/{metric(m2, 'd2od:kv_pages_total')}")
        print(f"     (pages back {time.time() - t0:.2f} s after the disconnect)", flush=True)
    # A non-streamed request whose client goes away while it waits for the engine.
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 7000, "ignore_eos": True}).encode()
    c = socket.create_connection((HOST, d.port), timeout=10)
    c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(0.3)
    _, m1, _ = metrics(d)
    in_use = metric(m1, "d2od:kv_pages_total") - metric(m1, "d2od:kv_pages_free")
    c.close()
    t0 = time.time()
    ok, m2 = wait_pages_free(d, 2.0)
    check("disconnect while waiting (non-streamed): kv_pages_free == kv_pages_total within 2 s", in_use > 0 and ok,
          f"in use before {in_use}, after {metric(m2, 'd2od:kv_pages_free')}/{metric(m2, 'd2od:kv_pages_total')}")
    print(f"     (pages back {time.time() - t0:.2f} s after the disconnect)", flush=True)
    _, m3, _ = metrics(d)
    check("disconnect: the generations were cancelled, not run to the end",
          (metric(m3, "d2od:request_success_total", finished_reason="abort") or 0) >= aborted0 + 3
          and (metric(m3, "d2od:generation_tokens_total") or 0) - gen0 < 3 * 7000,
          (metric(m3, "d2od:request_success_total", finished_reason="abort"), metric(m3, "d2od:generation_tokens_total") - gen0))


def test_sigterm(d, drain_timeout):
    """SIGTERM with streams in flight: short ones complete, long ones end cleanly
    (finish_reason "abort", [DONE]) at the drain timeout; exit 0."""
    shorts, longs = 10, 3
    streams = [None] * (shorts + longs)
    nonstream = [None]
    started = threading.Semaphore(0)

    def client(i):
        n = 100 if i < shorts else 7000
        try:
            s = Stream(d, "/v1/completions", {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": n, "ignore_eos": True,
                                              "temperature": 0, "stream": True,
                                              "stream_options": {"include_usage": True}}, timeout=60)
            streams[i] = s
            s.read_one()
            started.release()
            s.read_all()
        except Exception as ex:  # noqa: BLE001
            started.release()
            streams[i] = ex

    def nonstream_client():
        try:
            nonstream[0] = post(d, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 7000,
                                                       "ignore_eos": True}, timeout=60)
        except Exception as ex:  # noqa: BLE001
            nonstream[0] = (None, str(ex))

    th = [threading.Thread(target=client, args=(i,)) for i in range(shorts + longs)]
    th.append(threading.Thread(target=nonstream_client))
    for t in th:
        t.start()
    for _ in range(shorts + longs):
        started.acquire(timeout=30)
    # A client that stops reading (tiny receive buffer, never drained): the
    # drain must not wait for it forever.
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect((HOST, d.port))
    sbody = json.dumps({"prompt": "Once upon a time", "max_tokens": 7000, "ignore_eos": True, "n": 4,
                        "stream": True, "logprobs": 20}).encode()
    stuck.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(sbody), sbody))
    stuck.recv(100)
    time.sleep(0.05)
    t_sig = time.time()
    d.proc.send_signal(signal.SIGTERM)
    check("SIGTERM: STOPPING=1 on the notify socket", d.notify.wait_for("STOPPING=1", 3), d.notify.msgs)
    try:
        st, j = post(d, "/v1/completions", {"prompt": "a", "max_tokens": 2}, timeout=5)
        check("SIGTERM: a new request while draining gets 503", st == 503 and is_openai_error(j), (st, j))
    except OSError as ex:
        check("SIGTERM: a new request while draining gets 503 (or the listener is closed)", True, ex)
    try:
        rc = d.proc.wait(drain_timeout + 5)
    except subprocess.TimeoutExpired:
        rc = None
    elapsed = time.time() - t_sig
    for t in th:
        t.join(30)
    # drain timeout, then up to 2 s for the cancellations and stalled responses
    check(f"SIGTERM: exit code 0 within the drain timeout ({elapsed:.2f} s)", rc == 0 and elapsed < drain_timeout + 3.5,
          f"rc={rc}\n{d.log_text()[-1500:]}")
    bad_short = [(i, getattr(s, "error", s), getattr(s, "finish", None)) for i, s in enumerate(streams[:shorts])
                 if not isinstance(s, Stream) or not s.ok() or s.finish.get(0) != "length"
                 or (s.usage or {}).get("completion_tokens") != 100]
    check("SIGTERM: short in-flight streams complete (100 tokens, finish length, [DONE])", not bad_short, bad_short)
    bad_long = [(i, getattr(s, "error", s), getattr(s, "finish", None)) for i, s in enumerate(streams[shorts:])
                if not isinstance(s, Stream) or not s.ok() or s.finish.get(0) not in ("length", "abort")]
    check("SIGTERM: long streams end cleanly (finish_reason, [DONE])", not bad_long, bad_long)
    stuck.close()
    st, j = nonstream[0] or (None, None)
    print(f"     (long non-streamed request during the drain: {st} {str(j)[-160:]})", flush=True)
    check("SIGTERM: long non-streamed request gets what was generated, finish_reason abort",
          st == 200 and j["choices"][0]["finish_reason"] in ("length", "abort") and j["choices"][0]["text"]
          and j["usage"]["completion_tokens"] > 0, (st, str(j)[:300]))


def test_timeout(tmp):
    """--request-timeout-s: a request past it gets what was generated with
    finish_reason "length", streamed or not (a non-streamed one used to get a
    503 that discarded the text); pages return."""
    d = Daemon("timeout", ["--request-timeout-s", "1", "--ctx-len", "8192", "--kv-mem-mb", "64",
                           "--max-tokens-limit", "8192"], tmp)
    try:
        t0 = time.time()
        st, j = post(d, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8000, "ignore_eos": True})
        el = time.time() - t0
        check(f"timeout: non-streamed request -> 200, its text, finish_reason length after ~1 s ({el:.2f} s)",
              st == 200 and j["choices"][0]["finish_reason"] == "length" and j["choices"][0]["text"]
              and 0 < j["usage"]["completion_tokens"] < 8000 and el < 2.5, (st, str(j)[:300]))
        t0 = time.time()
        s = Stream(d, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8000, "ignore_eos": True,
                                          "stream": True}).read_all()
        el = time.time() - t0
        check(f"timeout: stream ends with finish_reason length and [DONE] ({el:.2f} s)",
              s.ok() and s.finish.get(0) == "length" and s.texts.get(0) and el < 2.5, (s.error, s.finish))
        ok, m = wait_pages_free(d, 1.0)
        check("timeout: every page back in the pool", ok, m.get("d2od:kv_pages_free"))
    finally:
        rc = d.stop()
    check("timeout: SIGTERM when idle exits 0", rc == 0, rc)


def test_double_sigterm(tmp):
    """A second SIGTERM cancels everything at once: clients still get clean
    answers (finish_reason abort, [DONE]) and the process exits 0 promptly
    (it used to abort: libmicrohttpd refuses to stop with suspended connections)."""
    d = Daemon("twice", ["--ctx-len", "8192", "--kv-mem-mb", "64", "--max-tokens-limit", "8192"], tmp)
    body = {"prompt": "Once upon a time", "max_tokens": 7000, "ignore_eos": True}
    answers, streams = [None] * 3, [None] * 2
    started = threading.Semaphore(0)

    def ns(i):
        try:
            answers[i] = post(d, "/v1/completions", body, timeout=30)
        except Exception as ex:  # noqa: BLE001
            answers[i] = (None, str(ex))

    def st_(i):
        try:
            s = Stream(d, "/v1/completions", dict(body, stream=True), timeout=30)
            streams[i] = s
            s.read_one()
            started.release()
            s.read_all()
        except Exception as ex:  # noqa: BLE001
            started.release()
            streams[i] = ex

    th = [threading.Thread(target=ns, args=(i,)) for i in range(3)] + [threading.Thread(target=st_, args=(i,)) for i in range(2)]
    for t in th:
        t.start()
    started.acquire(timeout=10)
    started.acquire(timeout=10)
    time.sleep(0.1)
    t0 = time.time()
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    d.proc.send_signal(signal.SIGTERM)
    try:
        rc = d.proc.wait(10)
    except subprocess.TimeoutExpired:
        rc = None
    el = time.time() - t0
    for t in th:
        t.join(20)
    d.stop()
    check(f"second SIGTERM: exit 0 within ~1 s ({el:.2f} s)", rc == 0 and el < 2.5, f"rc={rc} {d.log_text()[-600:]}")
    check("second SIGTERM: non-streamed requests answered (200, finish_reason abort)",
          all(a and a[0] == 200 and a[1]["choices"][0]["finish_reason"] == "abort" for a in answers), answers)
    check("second SIGTERM: streams end cleanly (abort, [DONE])",
          all(isinstance(s, Stream) and s.ok() and s.finish.get(0) == "abort" for s in streams),
          [getattr(s, "error", s) for s in streams])


def test_preemption(tmp):
    """A KV pool too small for the batch: sequences are preempted and
    recomputed, and every stream still equals its lone greedy text."""
    d = Daemon("tight", ["--kv-mem-mb", "1"], tmp)
    try:
        want = {}
        for p in PROMPTS:
            st, j = completion(d, p, 160, ignore_eos=True)
            want[p] = j["choices"][0]["text"] if st == 200 else None
        streams = [None] * 16

        def client(i):
            streams[i] = Stream(d, "/v1/completions", {"prompt": PROMPTS[i % 8], "max_tokens": 160, "ignore_eos": True,
                                                       "temperature": 0, "stream": True}, timeout=60).read_all()

        th = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in th:
            t.start()
        for t in th:
            t.join(60)
        bad = [i for i, s in enumerate(streams) if s is None or not s.ok() or s.texts.get(0) != want[PROMPTS[i % 8]]]
        _, m, _ = metrics(d)
        pre = metric(m, "d2od:num_preemptions_total") or 0
        check(f"tiny KV pool: 16 streams preempted ({pre:.0f} preemptions) and still equal to lone greedy",
              pre > 0 and not bad and None not in want.values(), f"bad {bad} pages {metric(m, 'd2od:kv_pages_total')}")
        ok, m = wait_pages_free(d, 1.0)
        check("tiny KV pool: every page back afterwards", ok, m.get("d2od:kv_pages_free"))
    finally:
        rc = d.stop()
    check("tiny KV pool: SIGTERM exits 0", rc == 0, f"rc={rc} {d.log_text()[-800:]}")


def run_js(main, auth, queue, greedy_path):
    js = os.path.join("tests", "js", "openai_client.test.mjs")
    if not os.path.isdir(os.path.join("tests", "js", "node_modules", "openai")):
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=os.path.join("tests", "js"),
                       capture_output=True, timeout=120)
    try:
        subprocess.run(["node", "--version"], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        skip("openai npm client tests", "node is not installed")
        return
    if not os.path.isdir(os.path.join("tests", "js", "node_modules", "openai")):
        skip("openai npm client tests", "tests/js/node_modules/openai missing (cd tests/js && npm install)")
        return
    env = dict(os.environ, D2_BASE_URL=f"http://{HOST}:{main.port}/v1", D2_MODEL="stories260K", D2_GREEDY=greedy_path,
               D2_AUTH_URL=f"http://{HOST}:{auth.port}/v1", D2_AUTH_KEY="sekrit-123",
               D2_QUEUE_URL=f"http://{HOST}:{queue.port}/v1")
    try:
        r = subprocess.run(["node", js], capture_output=True, timeout=120, env=env)
        out = r.stdout.decode("utf-8", "replace")
        rc = r.returncode
    except subprocess.TimeoutExpired as ex:
        out = (ex.stdout or b"").decode("utf-8", "replace") + "\nFAIL js: timed out"
        rc = -1
    n_ok = n_fail = 0
    for line in out.splitlines():
        if line.startswith("ok   "):
            n_ok += 1
            print(f"ok   js: {line[5:]}", flush=True)
        elif line.startswith("FAIL "):
            n_fail += 1
            print(f"FAIL js: {line[5:]}", flush=True)
    results["passed"] += n_ok
    results["failed"] += n_fail
    if rc != 0 and n_fail == 0:
        check("js: node exited 0", False, out[-1000:] + r.stderr.decode("utf-8", "replace")[-1000:])
    elif n_ok == 0:
        check("js: ran checks", False, out[-1000:])


def main():
    if not os.path.exists(GGUF):
        print(f"skip: {GGUF} missing")
        print("api: 0 passed, 0 failed, 1 skipped")
        return 0
    with tempfile.TemporaryDirectory(prefix="d2od-api-") as tmp:
        daemons = []
        try:
            main_d = Daemon("main", [], tmp, notify=True)
            daemons.append(main_d)
            test_ready_health_metrics(main_d)
            greedy_path = test_greedy_parity(main_d, tmp)
            test_stream_usage(main_d)
            test_tokenize(main_d)
            test_bad_inputs(main_d)
            test_concurrent(main_d, 64)
            r = subprocess.run([sys.executable, "loadtest/load.py", "--port", str(main_d.port), "-c", "8", "-n", "16",
                                "--max-tokens", "64", "--time-limit", "60", "--json"], capture_output=True, timeout=90)
            try:
                rep = json.loads(r.stdout)
            except ValueError:
                rep = {}
            check("loadtest/load.py runs (8 clients, 16 requests)", r.returncode == 0 and rep.get("requests") == 16
                  and rep.get("output_tokens") == 16 * 64 and rep.get("ttft_p50_ms") is not None,
                  r.stdout.decode()[-300:] + r.stderr.decode()[-300:])
            auth = test_auth(tmp)
            daemons.append(auth)
            queue = test_queue_limit(tmp)
            daemons.append(queue)
            run_js(main_d, auth, queue, greedy_path)
            _, m, _ = metrics(main_d)
            check("main: every page back in the pool at the end",
                  metric(m, "d2od:kv_pages_free") == metric(m, "d2od:kv_pages_total"), m.get("d2od:kv_pages_free"))
            rc = main_d.stop()
            check("main: SIGTERM when idle exits 0", rc == 0, f"rc={rc} {main_d.log_text()[-500:]}")
            for x in (auth, queue):
                rc = x.stop()
                check(f"{x.name}: SIGTERM exits 0", rc == 0, f"rc={rc} {x.log_text()[-800:]}")
            test_sighup_reload(tmp)
            test_timeout(tmp)
            test_preemption(tmp)
            test_double_sigterm(tmp)
            drain = 3
            long_d = Daemon("long", ["--ctx-len", "8192", "--kv-mem-mb", "128", "--max-tokens-limit", "8192",
                                     "--drain-timeout-s", str(drain)], tmp, notify=True)
            daemons.append(long_d)
            test_disconnect(long_d)
            test_sigterm(long_d, drain)
        except Exception as ex:  # noqa: BLE001 - a crash of the driver is a failure, not a traceback
            import traceback
            check("driver", False, traceback.format_exc())
            for x in daemons:
                print(f"--- {x.name} log tail:\n{x.log_text()[-1500:]}")
        finally:
            for x in daemons:
                x.kill()
                if x.notify:
                    x.notify.close()
    print(f"api: {results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped"
          f" ({time.time() - T0:.1f} s)")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
