#!/usr/bin/env python3
"""tests/integration/test_loadtest.py — the benchmark tool loadtest/load.py:
  1. its statistics (loadtest/benchstats.py) against hand-computed values:
     linear-interpolated percentiles, vLLM's TPOT / ITL definitions, goodput;
  2. its HTTP client against a scripted SSE server on 127.0.0.1 (chunked
     HTTP/1.1 with keep-alive, known gaps between events): TTFT, ITL, TPOT and
     connection reuse come out as defined; a kept-alive connection the server
     closed before answering is retried once on a fresh one (counted in
     `retries`), a fresh connection closed unanswered or a response cut off
     after it started is a failure, never retried;
  3. the tool against a real `d2od serve` (stories260K, bounded runs): the
     vLLM JSON keys and sane values for fixed concurrency, random-token and
     ShareGPT prompts, Poisson arrivals, non-streamed, A/B comparison, and
     the /metrics gauge sampling.

Usage: test_loadtest.py path/to/d2od   (run from the repo root; D2_SHARED locates ../shared)
Prints one line per check and a closing "N passed, N failed" line.
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "loadtest"))
import benchstats  # noqa: E402

D2OD = sys.argv[1] if len(sys.argv) > 1 else "build/d2od"
SHARED = os.environ.get("D2_SHARED", "../shared")
GGUF = os.path.join(SHARED, "assets/models/stories260K/stories260K.gguf")
LOAD = os.path.join(ROOT, "loadtest/load.py")
results = {"passed": 0, "failed": 0, "skipped": 0}


def check(name, cond, detail=""):
    if cond:
        results["passed"] += 1
        print(f"ok   {name}")
    else:
        results["failed"] += 1
        print(f"FAIL {name} {detail}")


def close(a, b, tol=1e-9):
    return a is not None and b is not None and abs(a - b) <= tol * max(1.0, abs(b))


def free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


# ---- 1. statistics -----------------------------------------------------------------

def test_stats():
    P = benchstats.percentile
    check("percentile: median of 1..4 is 2.5", close(P([4, 1, 3, 2], 50), 2.5))
    check("percentile: p99 of 1..4 is 3.97 (linear)", close(P([1, 2, 3, 4], 99), 3.97))
    check("percentile: p0 / p100 are min / max", P([3, 1, 2], 0) == 1 and P([3, 1, 2], 100) == 3)
    check("percentile: one sample, empty", P([5], 99) == 5 and P([], 50) is None)
    check("std is the population std", close(benchstats.std([1, 2, 3, 4]), math.sqrt(1.25)))
    recs = [
        # TPOT (1.1-0.1)/(11-1) = 0.1
        {"prompt_tokens": 10, "output_tokens": 11, "ttft": 0.1, "e2el": 1.1, "itl": [0.05, 0.15, 0.1]},
        # one output token: no TPOT sample; TPOT 0 for goodput
        {"prompt_tokens": 20, "output_tokens": 1, "ttft": 0.3, "e2el": 0.3, "itl": []},
        # TPOT (2.2-0.2)/(5-1) = 0.5
        {"prompt_tokens": 30, "output_tokens": 5, "ttft": 0.2, "e2el": 2.2, "itl": [0.5, 0.5, 0.5, 0.5]},
    ]
    s = benchstats.summarize(recs, 2.0, benchstats.parse_slos("ttft:250 tpot:200"))
    check("completed / token totals", s["completed"] == 3 and s["total_input_tokens"] == 60
          and s["total_output_tokens"] == 17, s)
    check("request_throughput = 3 / 2 s", close(s["request_throughput"], 1.5))
    check("output_throughput = 17 / 2 s", close(s["output_throughput"], 8.5))
    check("total_token_throughput = 77 / 2 s", close(s["total_token_throughput"], 38.5))
    check("TTFT mean / median / p99", close(s["mean_ttft_ms"], 200) and close(s["median_ttft_ms"], 200)
          and close(s["p99_ttft_ms"], 298), (s["mean_ttft_ms"], s["median_ttft_ms"], s["p99_ttft_ms"]))
    check("TPOT = (E2EL - TTFT) / (out - 1), 1-token request excluded",
          close(s["mean_tpot_ms"], 300) and close(s["median_tpot_ms"], 300) and close(s["p99_tpot_ms"], 496),
          (s["mean_tpot_ms"], s["median_tpot_ms"], s["p99_tpot_ms"]))
    check("ITL pools every gap of every request", close(s["mean_itl_ms"], 2300 / 7) and close(s["median_itl_ms"], 500)
          and close(s["p99_itl_ms"], 500), (s["mean_itl_ms"], s["median_itl_ms"]))
    check("E2EL mean / median / p99", close(s["mean_e2el_ms"], 1200) and close(s["median_e2el_ms"], 1100)
          and close(s["p99_e2el_ms"], 2178), (s["mean_e2el_ms"], s["p99_e2el_ms"]))
    check("goodput ttft:250 tpot:200 = 1 good / 2 s", close(s["request_goodput"], 0.5), s["request_goodput"])
    s2 = benchstats.summarize(recs, 2.0, benchstats.parse_slos("tpot:200"))
    check("goodput: a 1-token request counts as TPOT 0", close(s2["request_goodput"], 1.0), s2["request_goodput"])
    s3 = benchstats.summarize(recs, 2.0, benchstats.parse_slos("e2el:1100"))
    check("goodput: the SLO bound is inclusive", close(s3["request_goodput"], 1.0), s3["request_goodput"])
    check("no SLO: request_goodput is None", benchstats.summarize(recs, 2.0)["request_goodput"] is None)
    check("parse_slos: ms -> s, comma form", benchstats.parse_slos("ttft:250,e2el:1000") == {"ttft": 0.25, "e2el": 1.0})
    try:
        benchstats.parse_slos("latency:5")
        bad = False
    except ValueError:
        bad = True
    check("parse_slos rejects an unknown metric", bad)
    e = benchstats.summarize([], 1.0)
    check("nothing completed: counts 0, latencies None", e["completed"] == 0 and e["mean_ttft_ms"] is None
          and e["output_throughput"] == 0)


# ---- 2. the client against a scripted server --------------------------------------

GAP = 0.15  # seconds between scripted events


class LoopbackServer:
    """Listens on 127.0.0.1 (a free port), serves each accepted connection on
    its own thread with self.serve(conn), counts the connections."""

    def __init__(self):
        self.connections, self.alive = 0, True
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while self.alive:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def stop(self):
        self.alive = False
        self.sock.close()


class ScriptedServer(LoopbackServer):
    """A tiny HTTP/1.1 server: every POST gets an SSE stream, chunked, keep-alive:
    4 choice events GAP apart, one usage event (choices []), [DONE]. Counts
    the connections it accepted."""

    def serve(self, c):
        f = c.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    return
                n = 0
                while True:
                    h = f.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode().partition(":")
                    if k.lower() == "content-length":
                        n = int(v)
                f.read(n)
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")

                def chunk(data):
                    c.sendall(b"%x\r\n%s\r\n" % (len(data), data))
                for i in range(4):
                    time.sleep(GAP)
                    chunk(b'data: {"choices":[{"index":0,"text":"t%d"}]}\n\n' % i)
                chunk(b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":4}}\n\n')
                chunk(b"data: [DONE]\n\n")
                c.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        finally:
            c.close()


def run_load(args, timeout=120):
    r = subprocess.run([sys.executable, LOAD] + args, capture_output=True, timeout=timeout)
    try:
        rep = json.loads(r.stdout)
    except ValueError:
        rep = {}
    return r, rep


def test_scripted():
    srv = ScriptedServer()
    try:
        r, rep = run_load(["--port", str(srv.port), "-c", "1", "-n", "3", "--json"], timeout=60)
        detail = r.stdout.decode()[-400:] + r.stderr.decode()[-400:]
        check("scripted: 3 requests complete over chunked HTTP/1.1", r.returncode == 0 and rep.get("completed") == 3,
              detail)
        if rep.get("completed") != 3:
            return
        check("scripted: usage counts (7 prompt, 4 output tokens each)",
              rep["total_input_tokens"] == 21 and rep["total_output_tokens"] == 12, detail)
        check("scripted: TTFT ~ one gap", GAP * 0.9 <= rep["mean_ttft_ms"] / 1000 <= GAP + 1.0, rep["mean_ttft_ms"])
        check("scripted: ITL = the gaps between choice events (3 per request)",
              GAP * 0.9 <= rep["median_itl_ms"] / 1000 <= GAP + 1.0 and rep["itl_p50_ms"] is not None,
              rep["median_itl_ms"])
        tp = (rep["mean_e2el_ms"] - rep["mean_ttft_ms"]) / 3
        check("scripted: TPOT = (E2EL - TTFT) / (4 - 1)", abs(rep["mean_tpot_ms"] - tp) < 1e-6 * max(1, tp),
              (rep["mean_tpot_ms"], tp))
        check("scripted: one keep-alive connection for 3 sequential requests", srv.connections == 1, srv.connections)
        before = srv.connections
        r, rep = run_load(["--port", str(srv.port), "-c", "2", "-n", "4", "--no-keepalive", "--json"], timeout=60)
        check("scripted: --no-keepalive opens one connection per request",
              rep.get("completed") == 4 and srv.connections - before == 4, srv.connections - before)
    finally:
        srv.stop()


class ClosingServer(LoopbackServer):
    """A tiny HTTP/1.1 server for the retry rules. Every connection answers at
    most its first request (a short SSE body with Content-Length and no
    `Connection: close`, so the client keeps it), then, by mode:
      'after_first'  closes it (an idle keep-alive timeout, as llama-server does);
      'cut_second'   reads the second request, sends only a status line, closes;
      'never'        closes without answering even the first request.
    Counts the connections it accepted."""

    BODY = (b'data: {"choices":[{"index":0,"text":"t"}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
            b"data: [DONE]\n\n")

    def __init__(self, mode):
        self.mode = mode
        super().__init__()

    @staticmethod
    def read_request(f):
        line = f.readline()
        n = 0
        while line:
            h = f.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode().partition(":")
            if k.lower() == "content-length":
                n = int(v)
        f.read(n)
        return bool(line)

    def serve(self, c):
        f = c.makefile("rb")
        try:
            if not self.read_request(f) or self.mode == "never":
                return
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(self.BODY), self.BODY))
            if self.mode == "cut_second" and self.read_request(f):
                c.sendall(b"HTTP/1.1 200 OK\r\n")
        except OSError:
            pass
        finally:
            f.close()
            c.close()


def test_retry():
    srv = ClosingServer("after_first")
    try:
        r, rep = run_load(["--port", str(srv.port), "-c", "1", "-n", "2", "--json"], timeout=60)
        detail = r.stdout.decode()[-400:] + r.stderr.decode()[-400:]
        check("retry: a kept-alive connection closed before the status line is retried once on a new one",
              r.returncode == 0 and rep.get("completed") == 2 and rep.get("failed") == 0
              and rep.get("retries") == 1 and srv.connections == 2, (srv.connections, detail))
    finally:
        srv.stop()
    srv = ClosingServer("never")
    try:
        r, rep = run_load(["--port", str(srv.port), "-c", "1", "-n", "2", "--json"], timeout=60)
        check("retry: a fresh connection closed unanswered fails, not retried",
              r.returncode == 1 and rep.get("failed") == 2 and rep.get("retries") == 0 and srv.connections == 2,
              (srv.connections, rep.get("retries"), rep.get("errors")))
    finally:
        srv.stop()
    srv = ClosingServer("cut_second")
    try:
        r, rep = run_load(["--port", str(srv.port), "-c", "1", "-n", "2", "--json"], timeout=60)
        check("retry: a response cut off after its status line fails, not retried",
              r.returncode == 1 and rep.get("completed") == 1 and rep.get("failed") == 1
              and rep.get("retries") == 0 and srv.connections == 1,
              (srv.connections, rep.get("retries"), rep.get("errors")))
    finally:
        srv.stop()


# ---- 3. a real d2od serve ----------------------------------------------------------

class Serve:
    def __init__(self, tmp, extra=()):
        self.log = open(os.path.join(tmp, "serve.log"), "w+")
        for _ in range(3):
            self.port = free_port()
            self.proc = subprocess.Popen([D2OD, "serve", "--model", GGUF, "--host", "127.0.0.1", "--port",
                                          str(self.port), "--threads", "1", "--max-seqs", "8",
                                          "--log-requests", "false"] + list(extra),
                                         stdout=self.log, stderr=subprocess.STDOUT)
            end = time.time() + 30
            while time.time() < end and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
                        if resp.status == 200:
                            return
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError("d2od serve did not come up")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


VLLM_KEYS = ["request_throughput", "output_throughput", "total_token_throughput", "request_goodput", "goodput",
             "completed", "duration", "total_input_tokens", "total_output_tokens"] + \
            [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p99")]


def test_serve(tmp):
    d = Serve(tmp)
    try:
        port = str(d.port)
        res_file = os.path.join(tmp, "res.json")
        r, rep = run_load(["--port", port, "-c", "4", "-n", "12", "--max-tokens", "16", "--warmup", "2",
                           "--goodput", "ttft:60000", "tpot:60000", "--json", "--result-file", res_file])
        detail = r.stdout.decode()[-400:] + r.stderr.decode()[-400:]
        check("serve: fixed concurrency run exits 0", r.returncode == 0, detail)
        check("serve: every vLLM key present", all(k in rep for k in VLLM_KEYS),
              [k for k in VLLM_KEYS if k not in rep])
        check("serve: --result-file holds the same JSON", os.path.exists(res_file)
              and json.load(open(res_file)).get("completed") == rep.get("completed"))
        if rep.get("completed") != 12:
            check("serve: 12 requests completed", False, detail)
            return
        check("serve: 12 x 16 output tokens", rep["total_output_tokens"] == 192 and rep["failed"] == 0)
        check("serve: throughputs consistent", rep["output_throughput"] > 0
              and close(rep["output_throughput"], 192 / rep["duration"], 1e-6)
              and rep["total_token_throughput"] > rep["output_throughput"])
        check("serve: TTFT <= E2EL, TPOT and ITL > 0", 0 < rep["mean_ttft_ms"] <= rep["mean_e2el_ms"]
              and rep["mean_tpot_ms"] > 0 and rep["mean_itl_ms"] > 0)
        check("serve: percentiles ordered", all(rep[f"median_{m}_ms"] <= rep[f"p99_{m}_ms"]
                                                for m in ("ttft", "tpot", "itl", "e2el")))
        check("serve: generous SLOs -> goodput = request throughput",
              close(rep["request_goodput"], rep["request_throughput"], 1e-9))
        check("serve: client CPU time reported", 0 < rep["client_cpu_s"] and 0 < rep["client_cpu_frac"] < 4)
        check("serve: compatibility keys", rep["requests"] == 12 and rep["output_tokens"] == 192
              and rep["ttft_p50_ms"] is not None and abs(rep["output_tok_s"] - rep["output_throughput"]) <= 0.05)
        # long enough (8 x 400 tokens) for the 10 ms poller to see the batch
        r, rep = run_load(["--port", port, "-c", "4", "-n", "8", "--max-tokens", "400", "--metrics-gauge",
                           "d2od:num_requests_running", "--metrics-interval", "0.01", "--json"])
        g = (rep.get("server_gauges") or {}).get("d2od:num_requests_running") or {}
        check("serve: /metrics gauge sampled, 1..4 running", g.get("samples", 0) > 1 and 1 <= (g.get("max") or 0) <= 4,
              g)

        r, rep = run_load(["--port", port, "-c", "3", "-n", "6", "--input-len", "uniform:20:40", "--output-len",
                           "uniform:4:8", "--seed", "5", "--json"])
        check("serve: random token prompts, uniform lengths",
              rep.get("completed") == 6 and 6 * 20 <= rep["total_input_tokens"] <= 6 * 41
              and 6 * 4 <= rep["total_output_tokens"] <= 6 * 8, r.stdout.decode()[-300:] + r.stderr.decode()[-300:])
        _, rep2 = run_load(["--port", port, "-c", "3", "-n", "6", "--input-len", "uniform:20:40", "--output-len",
                            "uniform:4:8", "--seed", "5", "--json"])
        check("serve: same seed, same request lengths", rep2.get("total_input_tokens") == rep.get("total_input_tokens")
              and rep2.get("total_output_tokens") == rep.get("total_output_tokens"))

        share = os.path.join(tmp, "sharegpt.json")
        convs = [{"id": str(i), "conversations": [
            {"from": "human", "value": f"Tell me a story about a cat and a dog number {i} please."},
            {"from": "gpt", "value": "Once upon a time there was a cat. " * (1 + i % 3)}]} for i in range(6)]
        convs.append({"id": "short", "conversations": [{"from": "human", "value": "hi"}]})
        json.dump(convs, open(share, "w"))
        r, rep = run_load(["--port", port, "-c", "2", "-n", "4", "--dataset-path", share, "--max-model-len", "500",
                           "--json"])
        check("serve: ShareGPT prompts, reply lengths from /tokenize", rep.get("completed") == 4
              and rep["total_output_tokens"] >= 4 * 4 and rep["total_input_tokens"] >= 4 * 4,
              r.stdout.decode()[-300:] + r.stderr.decode()[-300:])

        t0 = time.time()
        r, rep = run_load(["--port", port, "-c", "8", "-n", "8", "--request-rate", "20", "--max-tokens", "4", "--json"])
        check("serve: Poisson arrivals at 20 req/s", rep.get("completed") == 8 and rep.get("request_rate") == 20
              and time.time() - t0 < 60, r.stderr.decode()[-300:])

        r, rep = run_load(["--port", port, "-c", "2", "-n", "4", "--max-tokens", "8", "--no-stream", "--json"])
        check("serve: non-streamed: E2EL only", rep.get("completed") == 4 and rep["total_output_tokens"] == 32
              and rep["mean_ttft_ms"] is None and rep["mean_e2el_ms"] > 0, r.stderr.decode()[-300:])

        r, rep = run_load(["--port", port, "-c", "2", "-n", "4", "--max-tokens", "8", "--chat", "--json"])
        check("serve: chat endpoint", rep.get("completed") == 4 and rep["total_output_tokens"] == 32,
              r.stderr.decode()[-300:])

        r, rep = run_load(["--port", port, "--port-b", port, "--rounds", "2", "-c", "2", "-n", "4", "--max-tokens",
                           "8", "--label-a", "x", "--label-b", "y", "--json"])
        ok = (r.returncode == 0 and rep.get("mode") == "compare" and rep.get("order") == ["A", "B", "B", "A"]
              and len(rep.get("rounds_a", [])) == 2 and rep["ratio_b_over_a"].get("output_throughput", 0) > 0
              and rep["a"]["output_throughput_range"][0] <= rep["a"]["output_throughput"])
        check("serve: A/B comparison interleaves rounds and reports ratios", ok,
              r.stdout.decode()[-300:] + r.stderr.decode()[-300:])
        r = subprocess.run([sys.executable, LOAD, "--port", port, "--port-b", port, "--rounds", "1", "-c", "1", "-n",
                            "2", "--max-tokens", "4"], capture_output=True, timeout=60)
        out = r.stdout.decode()
        check("serve: comparison table prints B/A", r.returncode == 0 and "B/A" in out and "output_throughput" in out,
              out[-300:])

        r = subprocess.run([sys.executable, LOAD, "--port", port, "-c", "2", "-n", "4", "--max-tokens", "4",
                            "--goodput", "ttft:1"], capture_output=True, timeout=60)
        out = r.stdout.decode()
        check("serve: terminal table with vLLM's labels", r.returncode == 0 and "Mean TTFT (ms):" in out
              and "Output token throughput (tok/s):" in out and "Request goodput (req/s):" in out, out[-400:])

        r, _ = run_load(["--port", port, "--input-len", "0"])
        check("serve: bad arguments exit 2", r.returncode == 2)
        r, rep = run_load(["--port", port, "-c", "1", "-n", "1", "--max-tokens", "4", "--extra-body",
                           '{"kv_compression": {"method": "bogus"}}', "--json"])
        check("serve: server errors count as failed (exit 1)", r.returncode == 1 and rep.get("failed") == 1
              and "HTTP 400" in (rep.get("errors") or [""])[0], rep.get("errors"))
    finally:
        rc = d.stop()
        check("serve: daemon exits 0 on SIGTERM", rc == 0, rc)


def main():
    test_stats()
    test_scripted()
    test_retry()
    if not os.path.exists(GGUF) or not os.access(D2OD, os.X_OK):
        print(f"skip: {GGUF} or {D2OD} missing")
        results["skipped"] += 1
    else:
        with tempfile.TemporaryDirectory(prefix="d2od-loadtest-") as tmp:
            test_serve(tmp)
    print(f"loadtest: {results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped")
    return 0 if results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
