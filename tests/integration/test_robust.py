#!/usr/bin/env python3
"""tests/integration/test_robust.py — the daemon as a hostile client and an
operator see it (issue 14, /work/shared/design/reviews/reliability-probe.md):
each check reproduces a defect the reliability probe found. Starts the real
`d2od serve` on 127.0.0.1 (free ports) with stories260K; raw sockets where
HTTP libraries would hide the framing.

Usage: test_robust.py path/to/d2od   (from the repo root; D2_SHARED locates ../shared)
Prints one line per check and a closing "robust: N passed, N failed, N skipped" line.
"""
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_api as T  # noqa: E402  (Daemon, req, post, Stream, metrics, check)

HOST = T.HOST
results = T.results
check = T.check
T0 = time.time()


def raw(d, data, timeout=10, shut_wr=False):
    """Sends raw bytes, reads until the server closes: (status or None, whole reply bytes)."""
    c = socket.create_connection((HOST, d.port), timeout=timeout)
    try:
        c.sendall(data)
        if shut_wr:
            c.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while True:
                x = c.recv(65536)
                if not x:
                    break
                out += x
        except OSError:
            pass
    finally:
        c.close()
    st = None
    if out.startswith(b"HTTP/1."):
        try:
            st = int(out.split(b" ", 2)[1])
        except ValueError:
            pass
    return st, out


def body_of(reply):
    head, _, rest = reply.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        out = b""
        while rest:
            line, _, rest = rest.partition(b"\r\n")
            n = int(line.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            out += rest[:n]
            rest = rest[n + 2:]
        return out
    return rest


def jbody(reply):
    try:
        return json.loads(body_of(reply))
    except ValueError:
        return None


def err_param(j):
    return (j or {}).get("error", {}).get("param") if isinstance(j, dict) else None


# ---- request-level checks on one daemon -------------------------------------------------


def test_params(d):
    # W2: context error on /v1/completions names prompt, with OpenAI's code
    st, j = T.post(d, "/v1/completions", {"prompt": "Once", "max_tokens": T.CTX + 10})
    check("context error on completions: param 'prompt', code context_length_exceeded",
          st == 400 and err_param(j) == "prompt" and j["error"].get("code") == "context_length_exceeded", (st, j))
    st, j = T.post(d, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": T.CTX})
    check("context error on chat: param 'messages', code context_length_exceeded",
          st == 400 and err_param(j) == "messages" and j["error"].get("code") == "context_length_exceeded", (st, j))
    # W3: top_p that is 0 as a float is the parser's 400 naming top_p
    st, j = T.post(d, "/v1/completions", {"prompt": "Once", "max_tokens": 2, "top_p": 1e-300})
    check("top_p 1e-300: 400 naming top_p", st == 400 and err_param(j) == "top_p", (st, j))
    st, j = T.post(d, "/tokenize", {"prompt": "a", "add_special_tokens": "no"})
    check("/tokenize add_special_tokens 'no': 400 naming add_special_tokens",
          st == 400 and err_param(j) == "add_special_tokens", (st, j))
    # K8: logit_bias keys must be plain decimal ids
    for key in (" 5", "+5", "5 ", "0x5"):
        st, j = T.post(d, "/v1/completions", {"prompt": "Once", "max_tokens": 2, "logit_bias": {key: 1}})
        check(f"logit_bias key {key!r}: 400", st == 400 and err_param(j) == "logit_bias", (st, j))
    st, j = T.post(d, "/v1/completions", {"prompt": "Once", "max_tokens": 2, "logit_bias": {"5": 1}})
    check("logit_bias key '5': 200", st == 200, (st, j))


def test_chat_content(d):
    # D3: text parts are joined, as a plain string would be
    base = {"max_tokens": 8, "temperature": 0}
    st1, a = T.post(d, "/v1/chat/completions", dict(base, messages=[{"role": "user", "content": "Hi there"}]))
    st2, b = T.post(d, "/v1/chat/completions", dict(base, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]))
    check("chat content parts: same prompt and text as the joined string",
          st1 == st2 == 200 and a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
          and a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"], (a, b))
    st, j = T.post(d, "/v1/chat/completions", dict(base, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]))
    msg = (j or {}).get("error", {}).get("message", "")
    check("chat content part image_url: 400 naming the type", st == 400 and "image_url" in msg, (st, j))
    # K6: assistant content null is not a template failure
    st, j = T.post(d, "/v1/chat/completions", dict(base, messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "Go"}]))
    check("assistant content null: 200", st == 200, (st, j))


def test_routes(d):
    st, h, b = T.req(d, "GET", "/v1/models")
    first = json.loads(b)["data"][0]
    time.sleep(1.1)
    st2, _, b2 = T.req(d, "GET", "/v1/models")
    check("/v1/models created is stable", st == st2 == 200 and json.loads(b2)["data"][0]["created"] == first["created"],
          (b, b2))
    st, _, b = T.req(d, "GET", "/v1/models/" + first["id"])
    j = json.loads(b) if b else None
    check("GET /v1/models/{id}: the model object", st == 200 and j == first, (st, b[:200]))
    st, _, b = T.req(d, "GET", "/v1/models/nope")
    j = json.loads(b) if b else None
    check("GET /v1/models/{unknown}: 404 model_not_found", st == 404 and T.is_openai_error(j)
          and j["error"]["code"] == "model_not_found", (st, b[:200]))
    st, h, b = T.req(d, "HEAD", "/health")
    check("HEAD /health: 200, no body", st == 200 and b == b"", (st, h, b[:100]))
    st, _, _ = T.req(d, "HEAD", "/v1/models")
    check("HEAD /v1/models: 200", st == 200, st)
    # Content-Type is not checked (documented): what curl -d sends is parsed as JSON
    st, _, b = T.req(d, "POST", "/v1/completions", body=json.dumps({"prompt": "Hi", "max_tokens": 2}).encode(),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    check("form Content-Type with a JSON body: 200 (documented)", st == 200, (st, b[:200]))


def test_echo_stop(d):
    # D4: stop strings are not matched inside the echoed prompt
    body = {"prompt": "Once upon a time", "max_tokens": 10, "echo": True, "stop": ["upon"], "temperature": 0}
    st, j = T.post(d, "/v1/completions", body)
    text = j["choices"][0]["text"] if st == 200 else ""
    check("echo + stop: the prompt is echoed whole", st == 200 and text.startswith("Once upon a time")
          and j["usage"]["completion_tokens"] > 1, (st, j))
    s = T.Stream(d, "/v1/completions", dict(body, stream=True)).read_all()
    check("echo + stop streamed: the prompt is echoed whole", s.ok() and s.texts.get(0, "").startswith(
        "Once upon a time"), (s.error, s.texts))


def test_queue(tmp):
    # H3: max_queue 0 starts, and serves when a slot is free
    d = T.Daemon("q0", ["--max-queue", "0", "--max-seqs", "2"], tmp)
    try:
        st, j = T.post(d, "/v1/completions", {"prompt": "Once", "max_tokens": 4})
        check("max_queue 0: starts and serves on an idle server", st == 200, (st, j))
    finally:
        d.stop()
    # D6: the queue counts requests, not choices; and --max-seqs 1 --max-queue 5 admits 1 + 5
    d = T.Daemon("q5", ["--max-queue", "5", "--max-seqs", "1"], tmp)
    try:
        st, j = T.post(d, "/v1/completions", {"prompt": ["Once"] * 8, "n": 2, "max_tokens": 2})
        check("16 choices with max_queue 5 on an idle server: 200", st == 200 and len(j["choices"]) == 16, (st, j))
        codes = []
        lock = threading.Lock()

        def one():
            s, _ = T.post(d, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True})
            with lock:
                codes.append(s)
        ths = [threading.Thread(target=one) for _ in range(20)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        check("--max-seqs 1 --max-queue 5, 20 at once: 6 x 200, 14 x 429",
              codes.count(200) == 6 and codes.count(429) == 14, sorted(codes))
    finally:
        d.stop()


def test_startup_errors(tmp, d):
    # D1 + K4: a second daemon on the same port is refused, naming the port
    p = subprocess.Popen([T.D2OD, "serve", "--model", T.GGUF, "--host", HOST, "--port", str(d.port), "--threads", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, e = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:  # it started: the kernel now splits the port between two daemons
        p.kill()
        _, e = p.communicate()
    err = e.decode("utf-8", "replace")
    check("second daemon on the same port: refused, 'address in use' naming the port",
          p.returncode not in (0, None, -9) and "address in use" in err and str(d.port) in err, (p.returncode, err[-600:]))
    r = subprocess.run([T.D2OD, "serve", "--model", T.GGUF, "--config", tmp], capture_output=True, timeout=30)
    err = r.stderr.decode("utf-8", "replace")
    check("config path that is a directory: 'is a directory'", r.returncode == 2 and "is a directory" in err,
          (r.returncode, err[-300:]))


def pid_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0


def test_output_fidelity(d):
    # K1: a byte token that is not UTF-8 on its own becomes U+FFFD, not nothing
    st, j = T.post(d, "/detokenize", {"tokens": list(range(3, 259))})
    byte_tok = None
    for t in range(3, 259):  # find a lone byte >= 0x80 (SentencePiece byte fallback <0xNN>)
        s2, j2 = T.post(d, "/detokenize", {"tokens": [t]})
        if s2 == 200 and j2.get("prompt") == "\ufffd":
            byte_tok = t
            break
    if byte_tok is None:
        T.skip("invalid UTF-8 byte token", "no lone-byte token in this vocabulary")
    else:
        st, j = T.post(d, "/v1/completions", {"prompt": "Once", "max_tokens": 6, "logit_bias": {str(byte_tok): 100},
                                              "temperature": 0})
        text = j["choices"][0]["text"] if st == 200 else ""
        check(f"byte token {byte_tok} repeated: U+FFFD in the text, not nothing", st == 200 and "\ufffd" in text
              and j["usage"]["completion_tokens"] == 6, (st, j))
        s = T.Stream(d, "/v1/completions", {"prompt": "Once", "max_tokens": 6, "logit_bias": {str(byte_tok): 100},
                                            "temperature": 0, "stream": True}).read_all()
        check("byte token streamed: U+FFFD too", s.ok() and "\ufffd" in s.texts.get(0, ""), (s.error, s.texts))
    # K2: echo + logprobs: text_offset continues after the echoed prompt; an id prompt echoes no <s>
    prompt = "Once upon a time"
    st, j = T.post(d, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1,
                                          "temperature": 0})
    lp = j["choices"][0]["logprobs"] if st == 200 else {}
    check("echo + logprobs: text_offset starts after the prompt", st == 200 and lp["text_offset"][0] == len(prompt),
          (st, lp))
    s = T.Stream(d, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1,
                                        "temperature": 0, "stream": True})
    offs = []
    s.read_all()
    for ev in s.events:
        for c in ev.get("choices", []):
            if c.get("logprobs"):
                offs += c["logprobs"]["text_offset"]
    check("echo + logprobs streamed: the same offsets", s.ok() and offs == lp.get("text_offset"), (offs, lp))
    st, tj = T.post(d, "/tokenize", {"prompt": prompt})
    st2, j = T.post(d, "/v1/completions", {"prompt": tj["tokens"], "max_tokens": 2, "echo": True, "temperature": 0})
    text = j["choices"][0]["text"] if st2 == 200 else ""
    check("echo of a token-id prompt: no literal <s>", st2 == 200 and "<s>" not in text and text.startswith(prompt),
          (st2, text))


def test_half_close(d):
    # D5: shutdown(SHUT_WR) after the request must not cancel a non-streamed request
    b = json.dumps({"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "temperature": 0}).encode()
    st, out = raw(d, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                  % len(b) + b, timeout=60, shut_wr=True)
    j = jbody(out)
    ok = st == 200 and j and j["choices"][0]["finish_reason"] == "length" and j["usage"]["completion_tokens"] == 300
    check("half-closed client: the whole non-streamed answer", ok, (st, out[:300]))
    # a client that really closed is still cancelled (its pages come back quickly)
    _, m0, _ = T.metrics(d)
    g0 = T.metric(m0, "d2od:generation_tokens_total") or 0
    c = socket.create_connection((HOST, d.port))
    b = json.dumps({"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True}).encode()
    c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(b) + b)
    time.sleep(0.3)
    c.close()
    t0 = time.time()
    freed = False
    while time.time() - t0 < 5:
        _, m, _ = T.metrics(d)
        gen = (T.metric(m, "d2od:generation_tokens_total") or 0) - g0
        if gen > 0 and T.metric(m, "d2od:num_requests_running") == 0 and T.metric(
                m, "d2od:kv_pages_free") == T.metric(m, "d2od:kv_pages_total"):
            freed = True
            break
        time.sleep(0.1)
    check(f"closed client of a non-streamed request: cancelled after {gen:.0f} of 1900 tokens, pages back "
          f"({time.time() - t0:.2f} s)", freed and gen < 1900)


def test_framing(d):
    # W1: two different Content-Length headers; HTTP/1.1 without Host
    b = b'{"prompt":"Hi","max_tokens":3,"temperature":0}'
    st, out = raw(d, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n"
                  b"Content-Length: 5\r\n\r\n" % len(b) + b)
    check("two different Content-Length headers: 400 JSON", st == 400 and T.is_openai_error(jbody(out)), out[:300])
    st, out = raw(d, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
    check("HTTP/1.1 without Host: 400 JSON", st == 400 and T.is_openai_error(jbody(out)), out[:300])
    st, out = raw(d, b"GET /health HTTP/1.0\r\n\r\n")
    check("HTTP/1.0 without Host: 200", st == 200, out[:200])
    # W5: oversized URL / headers answered as JSON; libmicrohttpd's own errors counted
    _, m0, _ = T.metrics(d)
    st, out = raw(d, b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    check("10 KB URL: 414 JSON", st == 414 and T.is_openai_error(jbody(out)), out[:300])
    hdrs = b"".join(b"X-H%d: v\r\n" % i for i in range(400))
    st, out = raw(d, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + hdrs + b"\r\n")
    check("400 headers: 431 JSON", st == 431 and T.is_openai_error(jbody(out)), out[:300])
    st, out = raw(d, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
    check("bad chunk size: 400", st == 400, out[:200])
    _, m1, _ = T.metrics(d)
    d4 = (T.metric(m1, "d2od:http_4xx_total") or 0) - (T.metric(m0, "d2od:http_4xx_total") or 0)
    check("every 4xx counted in http_4xx_total, libmicrohttpd's own too", d4 == 3, d4)
    log = d.log_text()
    lines = [ln for ln in log.splitlines() if "chunk" in ln.lower()]
    check("libmicrohttpd's messages carry a timestamp and level", lines and all(
        ln[:4].isdigit() and " WARN " in ln for ln in lines), lines[:3])


def test_connections(tmp):
    # H2: slowloris and 4096 idle connections must not shut out /health
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    d = T.Daemon("conns", [], tmp)
    try:
        slow = []
        for _ in range(20):
            c = socket.create_connection((HOST, d.port))
            c.sendall(b"GET /health HTTP/1.1\r\n")
            slow.append(c)
        t0 = time.time()
        closed = 0
        while time.time() - t0 < 25 and closed < len(slow):
            closed = 0
            for c in slow:
                try:
                    c.sendall(b"X-a: b\r\n")  # a header line every 0.5 s keeps an idle timeout alive
                except OSError:
                    closed += 1
            time.sleep(0.5)
        el = time.time() - t0
        check(f"slowloris: trickling connections closed by the header deadline ({closed}/20 in {el:.1f} s)",
              closed == len(slow) and el < 20, closed)
        for c in slow:
            c.close()
        idle = []
        refused = 0
        for _ in range(4096):
            try:
                idle.append(socket.create_connection((HOST, d.port), timeout=2))
            except OSError:
                refused += 1
        t0 = time.time()
        try:
            c = http.client.HTTPConnection(HOST, d.port, timeout=5, source_address=("127.0.0.2", 0))
            c.request("GET", "/health")
            st = c.getresponse().status
            c.close()
        except OSError as ex:
            st = str(ex)
        check(f"/health from another address under 4096 idle connections: 200 in {time.time() - t0:.2f} s",
              st == 200 and time.time() - t0 < 3, st)
        for c in idle:
            c.close()
    finally:
        d.stop()


def test_slow_clients(tmp):
    # D2: streaming clients that never read: bounded memory, choices ended and logged
    d = T.Daemon("noread", ["--ctx-len", "8192", "--max-tokens-limit", "8192", "--kv-mem-mb", "128",
                            "--log-requests", "true"], tmp)
    socks = []
    try:
        time.sleep(0.5)
        rss0 = pid_rss_mb(d.proc.pid)
        # top-20 logprobs make each event ~2 KB, so the socket buffers (a few MB) fill
        # after a few hundred tokens; then the lag bound ends each choice
        b = json.dumps({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True,
                        "n": 8, "logprobs": 20}).encode()
        for _ in range(2):
            c = socket.socket()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.connect((HOST, d.port))
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(b) + b)
            socks.append(c)
        t0 = time.time()
        idle = False
        while time.time() - t0 < 90:
            _, m, _ = T.metrics(d)
            if (T.metric(m, "d2od:generation_tokens_total") or 0) > 16 and T.metric(
                    m, "d2od:num_requests_running") == 0 and T.metric(m, "d2od:num_requests_waiting") == 0:
                idle = True
                break
            time.sleep(0.5)
        gen = T.metric(m, "d2od:generation_tokens_total") or 0
        rss1 = pid_rss_mb(d.proc.pid)
        check(f"clients that never read: their choices end early ({gen:.0f} of {16 * 4000} tokens, "
              f"{time.time() - t0:.1f} s), pages back", idle and gen < 16 * 4000 / 2
              and T.metric(m, "d2od:kv_pages_free") == T.metric(m, "d2od:kv_pages_total"), (idle, gen))
        check(f"clients that never read: RSS {rss0:.0f} -> {rss1:.0f} MB (bound 64 MB of growth)",
              rss1 - rss0 < 64, (rss0, rss1))
    finally:
        for c in socks:
            c.close()
    time.sleep(1.0)
    log = d.log_text()
    d.stop()
    n = log.count("outcome=client_not_reading")
    check(f"clients that never read: logged as such ({n} of 2)", n == 2, log[-1500:])


def test_logging(tmp):
    # K3: cancelled requests are logged once each with their true outcome
    d = T.Daemon("logs", ["--log-requests", "true"], tmp)
    try:
        for _ in range(5):
            c = socket.create_connection((HOST, d.port))
            b = json.dumps({"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True}).encode()
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(b) + b)
            time.sleep(0.2)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            c.close()  # RST
        st, j = T.post(d, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        time.sleep(1.0)
    finally:
        d.stop()
    log = d.log_text()
    n_disc = log.count("outcome=disconnected")
    n_ok = log.count("outcome=ok")
    check(f"disconnected requests logged as disconnected ({n_disc} of 5), the others ok ({n_ok})",
          n_disc == 5 and n_ok >= 1, log[-1500:])


def test_model_truncated(tmp):
    # C1: the served model file truncated in place (cp over it) must not SIGBUS the daemon
    path = os.path.join(tmp, "m.gguf")
    shutil.copy(T.GGUF, path)
    gguf, T.GGUF = T.GGUF, path
    try:
        d = T.Daemon("trunc", [], tmp)
    finally:
        T.GGUF = gguf
    try:
        st, _ = T.post(d, "/v1/completions", {"prompt": "Hi", "max_tokens": 4})
        os.truncate(path, 300000)
        st, j = T.post(d, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16})
        check("model file truncated while serving: still 200", st == 200 and d.proc.poll() is None,
              (st, d.proc.poll(), d.log_text()[-400:]))
    except OSError as ex:
        check("model file truncated while serving: still 200", False, (ex, d.proc.poll()))
    finally:
        d.stop()


def test_threads(tmp):
    # H1: the default thread count follows the affinity mask
    if not shutil.which("taskset"):
        T.skip("default threads under taskset", "no taskset")
        return
    p = subprocess.Popen(["taskset", "-c", "0", T.D2OD, "generate", "--model", T.GGUF, "--prompt", "Hi",
                          "--max-tokens", "2", "--temperature", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=60)
    err = err.decode("utf-8", "replace")
    check("under taskset -c 0 the default is 1 worker thread", "1 worker thread " in err or
          "1 worker thread\n" in err or "cpu backend: 1 worker thread" in err, err[-500:])


def main():
    # --quick: the request-level checks on one daemon only (the TSan run uses it)
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory(prefix="d2od-robust-") as tmp:
        daemons = []
        try:
            d = T.Daemon("main", [], tmp)
            daemons.append(d)
            test_params(d)
            test_chat_content(d)
            test_routes(d)
            test_echo_stop(d)
            if quick:
                test_output_fidelity(d)
                test_half_close(d)
                test_framing(d)
                rc = d.stop()
                check("SIGTERM exits 0", rc == 0, (rc, d.log_text()[-3000:]))
                raise StopIteration
            test_startup_errors(tmp, d)
            test_output_fidelity(d)
            test_half_close(d)
            test_framing(d)
            test_queue(tmp)
            test_model_truncated(tmp)
            test_threads(tmp)
            test_logging(tmp)
            test_slow_clients(tmp)
            test_connections(tmp)
        except StopIteration:
            pass
        except Exception:  # noqa: BLE001 - a crash of the driver is a failure, not a traceback
            import traceback
            check("driver", False, traceback.format_exc())
            for x in daemons:
                print(f"--- {x.name} log tail:\n{x.log_text()[-1500:]}")
        finally:
            for x in daemons:
                x.kill()
    print(f"robust: {results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped"
          f" ({time.time() - T0:.1f} s)")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
