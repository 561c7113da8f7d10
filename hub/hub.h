/*
 * hub/hub.h — the public header of hub/: models by Hugging Face hub id, through
 * the standard Hugging Face cache.
 *
 * `org/name[@revision]` resolves to a local path the engine can load (a
 * snapshot directory in HF layout, or one GGUF file inside it):
 *
 *   cache root   $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
 *   layout       models--org--name/blobs/<etag>            file contents
 *                models--org--name/snapshots/<commit>/<f>  relative symlinks to blobs
 *                models--org--name/refs/<revision>         the commit a branch/tag points at
 *
 * the layout that huggingface_hub (transformers, vLLM) writes, so a cache they
 * filled is reused without a download, and what this module downloads they
 * reuse. Online, the revision is resolved with GET {endpoint}/api/models/
 * {repo}/revision/{rev} (commit `sha`, `siblings[].rfilename`) and each missing
 * file with GET {endpoint}/{repo}/resolve/{commit}/{file} (redirects followed;
 * X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size read from the first
 * response). Only what serving needs is fetched: config, generation config,
 * tokenizer files, the chat template and the safetensors weights (the shards
 * the index names), or one GGUF file.
 *
 * A download goes to blobs/<etag>.incomplete, resumes with a Range request
 * when that file already holds a prefix (an earlier interrupted run, or a
 * retry after a dropped connection in this one), is verified — sha256 for LFS
 * files (the etag is the sha256), the git blob id for small files (the etag is
 * the git sha1), the size against X-Linked-Size / Content-Length — and only
 * then renamed to blobs/<etag>; the snapshot link and refs/<rev> are written
 * through a temporary name and rename() too, so a crash never leaves a file
 * that looks complete. Concurrent processes are serialised per blob with
 * flock on .locks/models--org--name/<etag>.lock (huggingface_hub's place).
 *
 * Environment: HF_ENDPOINT (default https://huggingface.co), HF_TOKEN (sent as
 * a Bearer token to the endpoint, never to a redirect target on another host),
 * HF_HUB_OFFLINE=1 (no network: the cache must hold the revision and every
 * file, else the error names what is missing). When the endpoint cannot be
 * reached at all, a complete cached snapshot is used with a warning.
 *
 * Callers: daemon/ (resolving --model before the engine loads it). Depends on
 * common/, libcurl, jansson and libcrypto (hashes). Not thread-safe per call
 * (uses one curl handle at a time); calls from different threads are fine.
 */
#ifndef D2_HUB_HUB_H
#define D2_HUB_HUB_H

#include <stdbool.h>
#include <stddef.h>

typedef struct hub_options {
    const char *endpoint;  /* NULL: $HF_ENDPOINT, else https://huggingface.co */
    const char *token;     /* NULL: $HF_TOKEN (may be unset) */
    const char *cache_dir; /* NULL: $HF_HUB_CACHE / $HF_HOME/hub / ~/.cache/huggingface/hub */
    bool offline;          /* also forced by HF_HUB_OFFLINE=1 (or true/yes/on) */
    /* Which GGUF to take from a repository that has several: an exact file name,
     * or a quantisation name matched case-insensitively inside the file names
     * (e.g. "Q8_0", "f16"). NULL: the repository's safetensors if it has them,
     * else its only GGUF (an error lists them when there are several). */
    const char *gguf_file;
    int progress;          /* 1: progress bar (use on a terminal), 0: one line per file, -1: silent */
} hub_options;

/* True when s has the shape of a hub id: "org/name" or "org/name@rev", with
 * org and name of [A-Za-z0-9._-] (not starting with '.' or '-'). The caller
 * decides first whether s is an existing local path (that wins). */
bool hub_is_repo_id(const char *s);

/* Resolves id to a local path (out, size n) the engine can load: the snapshot
 * directory, or the chosen GGUF file in it. Downloads what is missing unless
 * offline. Returns D2_OK, or an error with err (size errlen) holding one line
 * that names the repository, revision and file concerned:
 *   D2_EINVAL     malformed id or revision
 *   D2_ENOTFOUND  repository, revision or a needed file does not exist
 *                 (online), or is not in the cache (offline)
 *   D2_EAUTH      401/403: gated or private (set HF_TOKEN)
 *   D2_EIO        network or file-system failure
 *   D2_EFORMAT    a download did not match its etag/size (the partial file
 *                 is deleted, nothing is placed in the cache) */
int hub_resolve(const char *id, const hub_options *opt, char *out, size_t n, char *err, size_t errlen);

/* The cache root the options and environment select (for messages). */
int hub_cache_root(const hub_options *opt, char *out, size_t n);

#endif
