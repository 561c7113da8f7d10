#!/usr/bin/env python3
"""tests/integration/test_hub.py — models by hub id (hub/hub.c) against a mock
Hugging Face hub that this test starts on 127.0.0.1.

The mock speaks the two endpoints the official client uses:
  GET  /api/models/{org}/{name}/revision/{rev}   -> {"sha", "siblings": [{"rfilename"}]}
  HEAD/GET /{org}/{name}/resolve/{rev}/{file}
       small files: 200 with ETag = git blob id, X-Repo-Commit
       LFS files (.safetensors, .gguf): 302 to /cdn/<sha256> with X-Linked-Etag =
       sha256, X-Linked-Size, X-Repo-Commit
  GET  /cdn/<sha256>   the bytes, honouring Range (206)
and can be told to cut a transfer short once, to serve corrupt bytes, or to
require a token. Every request is logged so the tests can count downloads.

Checks: the first run downloads (with a progress bar on a terminal) into the
standard cache layout; a second run downloads nothing; HF_HUB_OFFLINE=1 works
from the cache and fails clearly on an empty one; an interrupted transfer
resumes with a Range request (inside one run, and across runs from a left
.incomplete file); a corrupt download is detected and nothing is cached; a
cache laid out by hand as huggingface_hub does is reused offline; GGUF choice
by --gguf-file; HF_TOKEN; `d2od serve --model org/name`.

Usage: test_hub.py path/to/d2od   (repo root; D2_SHARED locates ../shared)
"""
import hashlib
import http.server
import json
import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

D2OD = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "build/d2od")
SHARED = os.environ.get("D2_SHARED", "../shared")
S260 = os.path.join(SHARED, "assets/models/stories260K")
results = {"passed": 0, "failed": 0}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT2 = "89abcdef0123456789abcdef0123456789abcdef"


def check(name, cond, detail=""):
    if cond:
        results["passed"] += 1
        print(f"ok   {name}")
    else:
        results["failed"] += 1
        print(f"FAIL {name} {detail}")


def git_blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs(name):
    return name.endswith(".safetensors") or name.endswith(".gguf")


class Hub:
    """Repositories: {repo: {"sha": commit, "files": {name: bytes}, "token": None|str}}."""

    def __init__(self):
        self.repos = {}
        self.log = []
        self.cut_once = {}   # sha256 -> bytes to send before dropping the connection (once)
        self.corrupt = set()  # sha256 of blobs served with a flipped byte
        self.lock = threading.Lock()
        hub = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self.handle_any(head=True)

            def do_GET(self):
                self.handle_any(head=False)

            def reply(self, code, headers, body=b"", head=False):
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)

            def handle_any(self, head):
                with hub.lock:
                    hub.log.append((self.command, self.path, self.headers.get("Range"),
                                    self.headers.get("Authorization")))
                parts = self.path.split("?")[0].split("/")
                if self.path.startswith("/api/models/") and len(parts) >= 7:
                    repo = parts[3] + "/" + parts[4]
                    r = hub.repos.get(repo)
                    if not r:
                        return self.reply(404, {}, b'{"error":"Repository not found"}', head)
                    if r.get("token") and self.headers.get("Authorization") != "Bearer " + r["token"]:
                        return self.reply(401, {}, b'{"error":"Invalid credentials"}', head)
                    body = json.dumps({"id": repo, "sha": r["sha"],
                                       "siblings": [{"rfilename": f} for f in r["files"]]}).encode()
                    return self.reply(200, {"Content-Type": "application/json"}, body, head)
                if len(parts) >= 6 and parts[3] == "resolve":
                    repo = parts[1] + "/" + parts[2]
                    fname = "/".join(parts[5:])
                    r = hub.repos.get(repo)
                    if not r or fname not in r["files"]:
                        return self.reply(404, {"X-Error-Code": "EntryNotFound"}, b"", head)
                    if r.get("token") and self.headers.get("Authorization") != "Bearer " + r["token"]:
                        return self.reply(401, {}, b"", head)
                    data = r["files"][fname]
                    if lfs(fname):
                        sha = hashlib.sha256(data).hexdigest()
                        return self.reply(302, {"Location": f"/cdn/{sha}", "X-Repo-Commit": r["sha"],
                                                "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                                "ETag": '"' + git_blob_id(b"pointer" + data[:8]) + '"'}, b"", head)
                    return self.reply(200, {"X-Repo-Commit": r["sha"], "ETag": f'"{git_blob_id(data)}"'}, data, head)
                if len(parts) == 3 and parts[1] == "cdn":
                    sha = parts[2]
                    data = None
                    for r in hub.repos.values():
                        for d in r["files"].values():
                            if hashlib.sha256(d).hexdigest() == sha:
                                data = d
                    if data is None:
                        return self.reply(404, {}, b"", head)
                    if sha in hub.corrupt:
                        data = bytearray(data)
                        data[len(data) // 2] ^= 0xFF
                        data = bytes(data)
                    start = 0
                    rng = self.headers.get("Range")
                    if rng and rng.startswith("bytes=") and rng.endswith("-"):
                        start = int(rng[6:-1])
                    body = data[start:]
                    code = 206 if start else 200
                    hdr = {"Content-Length": str(len(body)), "Content-Type": "application/octet-stream"}
                    if start:
                        hdr["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    cut = None
                    with hub.lock:
                        if sha in hub.cut_once:
                            cut = hub.cut_once.pop(sha)
                    self.send_response(code)
                    for k, v in hdr.items():
                        self.send_header(k, v)
                    self.end_headers()
                    if head:
                        return
                    if cut is not None:
                        self.wfile.write(body[:cut])
                        self.wfile.flush()
                        self.close_connection = True
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        return
                    self.wfile.write(body)
                    return
                return self.reply(404, {}, b"", head)

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def take_log(self):
        with self.lock:
            log, self.log = self.log, []
        return log


def read(p):
    with open(p, "rb") as f:
        return f.read()


def run(args, env, timeout=120, tty=False):
    """Runs d2od; with tty=True its stderr is a pseudo-terminal (progress bars)."""
    if not tty:
        r = subprocess.run([D2OD] + args, env=env, capture_output=True, timeout=timeout)
        return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")
    master, slave = pty.openpty()
    p = subprocess.Popen([D2OD] + args, env=env, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    err = b""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
        elif p.poll() is not None:
            break
    out = p.stdout.read()
    p.wait(timeout=10)
    os.close(master)
    return p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def env_for(hub, cache, **extra):
    e = dict(os.environ)
    for k in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME", "HF_HUB_CACHE"):
        e.pop(k, None)
    e["HF_HUB_CACHE"] = cache
    e["HF_ENDPOINT"] = hub.url()
    e.update(extra)
    return e


GEN = ["generate", "--prompt", "Once upon a time", "--max-tokens", "24", "--temperature", "0", "--threads", "1"]


def main():
    hf = os.path.join(S260, "hf")
    hf_files = {f: read(os.path.join(hf, f)) for f in
                ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors")}
    hf_files["README.md"] = b"# not needed for serving\n"
    hf_files["pytorch_model.bin"] = b"x" * 1000  # never fetched: not what serving needs
    gguf = read(os.path.join(S260, "stories260K.gguf"))
    hub = Hub()
    hub.repos["test-org/stories260K"] = {"sha": COMMIT, "files": hf_files}
    hub.repos["test-org/stories260K-GGUF"] = {"sha": COMMIT2, "files": {
        "stories260K-F32.gguf": gguf, "stories260K-Q8_0.gguf": gguf + b"", "README.md": b"hi"}}
    hub.repos["test-org/private"] = {"sha": COMMIT, "files": hf_files, "token": "hf_secret"}
    st_sha = hashlib.sha256(hf_files["model.safetensors"]).hexdigest()

    r = subprocess.run([D2OD] + GEN + ["--model", hf], capture_output=True, timeout=60)
    want = r.stdout.decode()
    check("reference generation from the local directory", r.returncode == 0 and len(want) > 20, r.stderr.decode())

    tmp = tempfile.mkdtemp(prefix="d2od-hub-")
    try:
        cache = os.path.join(tmp, "cache")
        env = env_for(hub, cache)
        repo_dir = os.path.join(cache, "models--test-org--stories260K")

        # 1. first run downloads, with a progress bar on a terminal
        rc, out, err = run(GEN + ["--model", "test-org/stories260K"], env, tty=True)
        log = hub.take_log()
        check("first run: generates the same text", rc == 0 and out == want, f"rc={rc} out={out!r} err={err[-600:]}")
        gets = [p for (m, p, _, _) in log if m == "GET" and ("/resolve/" in p or p.startswith("/cdn/"))]
        check("first run: downloaded the five serving files only",
              len([p for p in gets if "/resolve/" in p]) == 5 and not any("pytorch_model" in p or "README" in p
                                                                            for (_, p, _, _) in log),
              f"{[p for (_, p, _, _) in log]}")
        check("first run: progress bar on the terminal", "\r" in err and "%" in err and "MB/s" in err, repr(err[-400:]))
        ref = read(os.path.join(repo_dir, "refs/main")).decode().strip()
        check("cache layout: refs/main holds the commit", ref == COMMIT, ref)
        snap = os.path.join(repo_dir, "snapshots", COMMIT)
        link = os.readlink(os.path.join(snap, "model.safetensors"))
        check("cache layout: snapshot links to blobs/<sha256>", link == f"../../blobs/{st_sha}", link)
        cfg_link = os.readlink(os.path.join(snap, "config.json"))
        check("cache layout: small files are named by their git blob id",
              cfg_link == f"../../blobs/{git_blob_id(hf_files['config.json'])}", cfg_link)
        check("cache layout: no .incomplete left",
              not any(f.endswith(".incomplete") for f in os.listdir(os.path.join(repo_dir, "blobs"))))

        # 2. second run downloads nothing
        rc, out, err = run(GEN + ["--model", "test-org/stories260K"], env)
        log = hub.take_log()
        check("second run: same text", rc == 0 and out == want, err[-400:])
        check("second run: only the revision API was asked, no file", [m for (m, p, _, _) in log] == ["GET"]
              and log[0][1].startswith("/api/models/test-org/stories260K/revision/main"), f"{log}")
        check("second run: reports 0 files downloaded", "(0 files downloaded)" in err, err[-300:])

        # 3. offline with the filled cache: no request at all
        rc, out, err = run(GEN + ["--model", "test-org/stories260K"], env_for(hub, cache, HF_HUB_OFFLINE="1"))
        log = hub.take_log()
        check("offline with cache: works without a request", rc == 0 and out == want and not log, f"{log} {err[-300:]}")

        # 4. offline with an empty cache: clear error naming what is missing
        empty = os.path.join(tmp, "empty")
        rc, out, err = run(GEN + ["--model", "test-org/stories260K"], env_for(hub, empty, HF_HUB_OFFLINE="1"))
        log = hub.take_log()
        check("offline, empty cache: fails clearly",
              rc != 0 and "HF_HUB_OFFLINE=1" in err and "test-org/stories260K" in err and "refs/main" in err
              and not log, f"rc={rc} {err[-400:]}")

        # 5. an interrupted transfer resumes with Range (inside one run)
        c2 = os.path.join(tmp, "c2")
        hub.cut_once[st_sha] = 300000
        rc, out, err = run(GEN + ["--model", "test-org/stories260K"], env_for(hub, c2))
        log = hub.take_log()
        ranges = [rg for (m, p, rg, _) in log if p == f"/cdn/{st_sha}" and m == "GET"]
        check("interrupted download resumes with a Range request",
              rc == 0 and out == want and ranges == [None, "bytes=300000-"], f"rc={rc} ranges={ranges} {err[-500:]}")

        # 6. ... and across runs: a left .incomplete file is continued
        c3 = os.path.join(tmp, "c3")
        blobs = os.path.join(c3, "models--test-org--stories260K", "blobs")
        os.makedirs(blobs)
        with open(os.path.join(blobs, st_sha + ".incomplete"), "wb") as f:
            f.write(hf_files["model.safetensors"][:123456])
        rc, out, err = run(GEN + ["--model", "test-org/stories260K"], env_for(hub, c3))
        log = hub.take_log()
        ranges = [rg for (m, p, rg, _) in log if p == f"/cdn/{st_sha}" and m == "GET"]
        check("a partial file from an earlier run is resumed",
              rc == 0 and out == want and ranges == ["bytes=123456-"] and "resuming" in err, f"rc={rc} {ranges} {err[-400:]}")
        check("resumed blob is complete and verified",
              read(os.path.join(blobs, st_sha)) == hf_files["model.safetensors"])

        # 7. a corrupt download is detected; nothing is cached
        c4 = os.path.join(tmp, "c4")
        hub.corrupt.add(st_sha)
        rc, out, err = run(GEN + ["--model", "test-org/stories260K"], env_for(hub, c4))
        hub.corrupt.clear()
        hub.take_log()
        b4 = os.path.join(c4, "models--test-org--stories260K", "blobs")
        check("corrupt download detected", rc != 0 and "corrupt" in err and "sha256" in err and st_sha in err,
              f"rc={rc} {err[-400:]}")
        check("corrupt download: nothing placed in the cache",
              not os.path.exists(os.path.join(b4, st_sha)) and not os.path.exists(os.path.join(b4, st_sha + ".incomplete"))
              and not os.path.exists(os.path.join(c4, "models--test-org--stories260K/snapshots", COMMIT, "model.safetensors")))
        rc, out, err = run(GEN + ["--model", "test-org/stories260K"], env_for(hub, c4))
        check("after a corrupt download the next run fetches it cleanly", rc == 0 and out == want, err[-300:])
        hub.take_log()

        # 8. a cache laid out by hand the way huggingface_hub writes it, used offline
        c5 = os.path.join(tmp, "c5")
        rd = os.path.join(c5, "models--someone--tiny")
        os.makedirs(os.path.join(rd, "blobs"))
        os.makedirs(os.path.join(rd, "refs"))
        os.makedirs(os.path.join(rd, "snapshots", COMMIT2))
        for fn, data in hf_files.items():
            if fn in ("README.md", "pytorch_model.bin"):
                continue
            etag = hashlib.sha256(data).hexdigest() if lfs(fn) else git_blob_id(data)
            with open(os.path.join(rd, "blobs", etag), "wb") as f:
                f.write(data)
            os.symlink(f"../../blobs/{etag}", os.path.join(rd, "snapshots", COMMIT2, fn))
        with open(os.path.join(rd, "refs", "main"), "w") as f:
            f.write(COMMIT2)
        rc, out, err = run(GEN + ["--model", "someone/tiny"], env_for(hub, c5, HF_HUB_OFFLINE="1"))
        check("a huggingface_hub-style cache is reused offline", rc == 0 and out == want and not hub.take_log(),
              err[-300:])
        rc, out, err = run(GEN + ["--model", f"someone/tiny@{COMMIT2}"], env_for(hub, c5, HF_HUB_OFFLINE="1"))
        check("offline by commit id", rc == 0 and out == want, err[-300:])
        os.unlink(os.path.join(rd, "snapshots", COMMIT2, "model.safetensors"))
        rc, out, err = run(GEN + ["--model", "someone/tiny"], env_for(hub, c5, HF_HUB_OFFLINE="1"))
        check("offline: a missing weights file is named", rc != 0 and "model.safetensors" in err and "HF_HUB_OFFLINE" in err,
              err[-300:])

        # 9. GGUF repositories: choice by --gguf-file / quant name
        c6 = os.path.join(tmp, "c6")
        rc, out, err = run(GEN + ["--model", "test-org/stories260K-GGUF"], env_for(hub, c6))
        check("several GGUFs without --gguf-file: the error lists them",
              rc != 0 and "stories260K-F32.gguf" in err and "stories260K-Q8_0.gguf" in err and "--gguf-file" in err,
              err[-300:])
        rc, out, err = run(GEN + ["--model", "test-org/stories260K-GGUF", "--gguf-file", "f32"], env_for(hub, c6))
        log = hub.take_log()
        gets = [p for (m, p, _, _) in log if m == "GET" and "/resolve/" in p]
        check("--gguf-file picks one GGUF by quant name and fetches only it",
              rc == 0 and out == want and len(gets) == 1 and gets[0].endswith("stories260K-F32.gguf"), f"{gets} {err[-300:]}")

        # 10. HF_TOKEN for a private repository
        c7 = os.path.join(tmp, "c7")
        rc, out, err = run(GEN + ["--model", "test-org/private"], env_for(hub, c7))
        check("private repository without HF_TOKEN: 401 names HF_TOKEN", rc != 0 and "HF_TOKEN" in err and "401" in err,
              err[-300:])
        hub.take_log()
        rc, out, err = run(GEN + ["--model", "test-org/private"], env_for(hub, c7, HF_TOKEN="hf_secret"))
        log = hub.take_log()
        check("private repository with HF_TOKEN", rc == 0 and out == want, err[-300:])
        check("the token goes to the endpoint as a Bearer header",
              all(a == "Bearer hf_secret" for (m, p, _, a) in log if not p.startswith("/cdn/")))
        rc, out, err = run(GEN + ["--model", "test-org/missing"], env_for(hub, c7))
        check("unknown repository: clear error", rc != 0 and "test-org/missing" in err, err[-300:])
        hub.take_log()

        # a typo in a local path (its first folder exists) is a missing file, not a download
        rc, out, err = run(GEN + ["--model", "models/no-such-model.gguf"], env_for(hub, c7))
        check("a missing local path is not taken for a hub id", rc != 0 and "no such file" in err and not hub.take_log(),
              err[-300:])

        # 11. serve by hub id (offline, from the filled cache); the served name is org/name
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        p = subprocess.Popen([D2OD, "serve", "--model", "test-org/stories260K", "--port", str(port), "--threads", "1"],
                             env=env_for(hub, cache, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        models = None
        try:
            for _ in range(100):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as resp:
                        models = json.load(resp)
                    break
                except OSError:
                    time.sleep(0.1)
        finally:
            p.terminate()
            p.wait(timeout=30)
        check("serve --model org/name: listed as org/name",
              models is not None and models["data"][0]["id"] == "test-org/stories260K", f"{models}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        hub.srv.shutdown()

    print(f"hub: {results['passed']} passed, {results['failed']} failed")
    return 0 if results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
