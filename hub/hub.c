/*
 * hub/hub.c — resolves `org/name[@revision]` through the Hugging Face cache,
 * downloading what is missing with libcurl. Contract, layout and environment:
 * hub/hub.h. Callers: daemon/ only.
 *
 * Flow of hub_resolve():
 *   1. parse and validate the id; find the cache root and the repo folder;
 *   2. revision -> commit: online, the revision API (and refs/<rev> is
 *      written); offline or when the endpoint is unreachable, refs/<rev>;
 *   3. choose the files serving needs from the repository's file list
 *      (online: siblings; offline: what the snapshot holds);
 *   4. for each file not already in snapshots/<commit>/: HEAD the resolve URL
 *      (no redirect) for its etag and size; reuse blobs/<etag> if another
 *      revision brought it; else download to blobs/<etag>.incomplete
 *      (resuming), verify, rename, link.
 */
#include "hub/hub.h"

#include <ctype.h>
#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/status.h"
#include "common/util.h"

#define HUB_PATH 4096
#define HUB_MAX_FILES 4096
#define HUB_MAX_JSON (64u << 20) /* largest API answer or index file read */
#define HUB_ATTEMPTS 5           /* tries of one download (each resumes) */

typedef struct repo_ref {
    char org[128], name[128], rev[256];
    char repo[260];          /* "org/name" */
    char dir[HUB_PATH];      /* <root>/models--org--name */
    char locks[HUB_PATH];    /* <root>/.locks/models--org--name */
    char endpoint[1024];
    char auth[1100];         /* "Authorization: Bearer ..." or "" */
    int progress;
} repo_ref;

typedef struct name_list { char **v; int n; } name_list;

static void names_free(name_list *l) {
    for (int i = 0; i < l->n; i++) free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

static int names_add(name_list *l, const char *s) {
    if (l->n >= HUB_MAX_FILES) return D2_ERANGE;
    char **nv = realloc(l->v, sizeof(char *) * (size_t)(l->n + 1));
    if (!nv) return D2_ENOMEM;
    l->v = nv;
    if (!(l->v[l->n] = strdup(s))) return D2_ENOMEM;
    l->n++;
    return D2_OK;
}

static bool names_has(const name_list *l, const char *s) {
    for (int i = 0; i < l->n; i++)
        if (!strcmp(l->v[i], s)) return true;
    return false;
}

/* snprintf through a va_list, so that GCC's -Wformat-truncation does not flag
 * every path join: each caller that can overflow checks the count itself,
 * and a truncated path only ever names a file that does not exist. */
static int fmt_to(char *out, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fmt_to(char *out, size_t n, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(out, n, fmt, ap);
    va_end(ap);
    return w;
}

static void set_err(char *err, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t n, const char *fmt, ...) {
    if (!err || !n) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, n, fmt, ap);
    va_end(ap);
}

static bool env_true(const char *name) {
    const char *v = getenv(name);
    if (!v) return false;
    return !strcmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes") || !strcasecmp(v, "on");
}

static bool is_hex(const char *s, size_t n) {
    if (strlen(s) != n) return false;
    for (size_t i = 0; i < n; i++)
        if (!isxdigit((unsigned char)s[i])) return false;
    return true;
}

static bool ends_with_ci(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcasecmp(s + a - b, suf);
}

/* ---- ids and paths ------------------------------------------------------------ */

static bool id_part_ok(const char *s, size_t n) {
    if (n == 0 || n > 96 || s[0] == '.' || s[0] == '-') return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!(isalnum((unsigned char)c) || c == '.' || c == '_' || c == '-')) return false;
    }
    for (size_t i = 0; i + 1 < n; i++)
        if (s[i] == '.' && s[i + 1] == '.') return false;
    return true;
}

/* A revision: branch, tag or commit; may contain '/' (refs/pr/1) but no "..",
 * no leading '/', nothing outside [A-Za-z0-9._/-]. */
static bool rev_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 200 || s[0] == '/' || s[n - 1] == '/' || strstr(s, "..") || strstr(s, "//")) return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!(isalnum((unsigned char)c) || c == '.' || c == '_' || c == '-' || c == '/')) return false;
    }
    return true;
}

bool hub_is_repo_id(const char *s) {
    if (!s) return false;
    const char *slash = strchr(s, '/');
    if (!slash) return false;
    const char *at = strchr(slash, '@');
    const char *end = at ? at : s + strlen(s);
    if (memchr(slash + 1, '/', (size_t)(end - slash - 1))) return false;
    if (!id_part_ok(s, (size_t)(slash - s)) || !id_part_ok(slash + 1, (size_t)(end - slash - 1))) return false;
    return !at || rev_ok(at + 1);
}

int hub_cache_root(const hub_options *opt, char *out, size_t n) {
    const char *v;
    int w;
    if (opt && opt->cache_dir && opt->cache_dir[0]) w = fmt_to(out, n, "%s", opt->cache_dir);
    else if ((v = getenv("HF_HUB_CACHE")) && v[0]) w = fmt_to(out, n, "%s", v);
    else if ((v = getenv("HF_HOME")) && v[0]) w = fmt_to(out, n, "%s/hub", v);
    else if ((v = getenv("XDG_CACHE_HOME")) && v[0]) w = fmt_to(out, n, "%s/huggingface/hub", v);
    else if ((v = getenv("HOME")) && v[0]) w = fmt_to(out, n, "%s/.cache/huggingface/hub", v);
    else return D2_ENOENT;
    return w < 0 || (size_t)w >= n ? D2_ERANGE : D2_OK;
}

static int mkdir_p(const char *path) {
    char tmp[HUB_PATH];
    if (fmt_to(tmp, sizeof tmp, "%s", path) >= (int)sizeof tmp) return D2_ERANGE;
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(tmp, 0755) && errno != EEXIST) return D2_EIO;
        *p = '/';
    }
    if (mkdir(tmp, 0755) && errno != EEXIST) return D2_EIO;
    return D2_OK;
}

static int mkdir_parent(const char *path) {
    char tmp[HUB_PATH];
    if (fmt_to(tmp, sizeof tmp, "%s", path) >= (int)sizeof tmp) return D2_ERANGE;
    char *s = strrchr(tmp, '/');
    if (!s || s == tmp) return D2_OK;
    *s = '\0';
    return mkdir_p(tmp);
}

/* A regular file (through symlinks). */
static bool file_exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* Writes text to path through path.tmp.<pid> + rename. */
static int write_atomic(const char *path, const char *text) {
    char tmp[HUB_PATH + 32];
    fmt_to(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    if (mkdir_parent(path)) return D2_EIO;
    FILE *f = fopen(tmp, "wb");
    if (!f) return D2_EIO;
    bool ok = fputs(text, f) >= 0;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path)) {
        unlink(tmp);
        return D2_EIO;
    }
    return D2_OK;
}

/* Percent-encodes s into out; '/' kept when keep_slash. */
static int url_escape(const char *s, bool keep_slash, char *out, size_t n) {
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        bool plain = isalnum(*p) || *p == '.' || *p == '_' || *p == '-' || *p == '~' || (keep_slash && *p == '/');
        if (o + 4 >= n) return D2_ERANGE;
        if (plain) out[o++] = (char)*p;
        else o += (size_t)fmt_to(out + o, n - o, "%%%02X", *p);
    }
    out[o] = '\0';
    return D2_OK;
}

/* ---- HTTP ------------------------------------------------------------------------ */

typedef struct http_resp {
    long status;             /* of the last response seen */
    char etag[160], linked_etag[160], repo_commit[64], location[2048];
    long long linked_size, content_length;
    /* body capture (API calls) */
    char *body;
    size_t body_len;
    bool body_too_big;
    /* file download */
    int fd;
    long long offset;        /* bytes already in the file when this request began */
    long long written;       /* bytes written by this request */
    bool restarted;          /* the server ignored Range: the file was truncated */
    bool bad_status;
    /* progress */
    const char *label;
    long long total;         /* expected size of the whole file (-1 unknown) */
    double t_start, t_draw;
    int progress;
} http_resp;

static void trim_value(const char *v, size_t n, char *out, size_t cap) {
    while (n && (v[0] == ' ' || v[0] == '\t')) { v++; n--; }
    while (n && (v[n - 1] == '\r' || v[n - 1] == '\n' || v[n - 1] == ' ')) n--;
    if (n >= cap) n = cap - 1;
    memcpy(out, v, n);
    out[n] = '\0';
}

static size_t on_header(char *data, size_t sz, size_t nm, void *user) {
    http_resp *r = user;
    size_t n = sz * nm;
    if (n >= 5 && !strncmp(data, "HTTP/", 5)) { /* a new response in a redirect chain */
        const char *sp = memchr(data, ' ', n);
        r->status = sp ? strtol(sp + 1, NULL, 10) : 0;
        r->content_length = -1;
        r->location[0] = '\0';
        return n;
    }
    const char *colon = memchr(data, ':', n);
    if (!colon) return n;
    size_t kl = (size_t)(colon - data);
    const char *v = colon + 1;
    size_t vl = n - kl - 1;
    char val[2048];
    trim_value(v, vl, val, sizeof val);
#define HDR(name) (kl == strlen(name) && !strncasecmp(data, name, kl))
    if (HDR("etag")) fmt_to(r->etag, sizeof r->etag, "%s", val);
    else if (HDR("x-linked-etag")) fmt_to(r->linked_etag, sizeof r->linked_etag, "%s", val);
    else if (HDR("x-repo-commit")) fmt_to(r->repo_commit, sizeof r->repo_commit, "%s", val);
    else if (HDR("x-linked-size")) r->linked_size = strtoll(val, NULL, 10);
    else if (HDR("content-length")) r->content_length = strtoll(val, NULL, 10);
    else if (HDR("location")) fmt_to(r->location, sizeof r->location, "%s", val);
#undef HDR
    return n;
}

static size_t on_body(char *data, size_t sz, size_t nm, void *user) {
    http_resp *r = user;
    size_t n = sz * nm;
    if (r->body_len + n > HUB_MAX_JSON) { r->body_too_big = true; return 0; }
    char *nb = realloc(r->body, r->body_len + n + 1);
    if (!nb) return 0;
    r->body = nb;
    memcpy(r->body + r->body_len, data, n);
    r->body_len += n;
    r->body[r->body_len] = '\0';
    return n;
}

static void draw_progress(http_resp *r, bool final) {
    if (r->progress <= 0) return;
    double t = d2_now();
    if (!final && t - r->t_draw < 0.1) return;
    r->t_draw = t;
    long long done = r->offset + r->written;
    double rate = t > r->t_start ? (double)r->written / (t - r->t_start) : 0;
    int width = 30, fill = r->total > 0 ? (int)((double)done / (double)r->total * width) : 0;
    if (fill > width) fill = width;
    char name[41];
    size_t ln = strlen(r->label);
    fmt_to(name, sizeof name, "%s", ln > 40 ? r->label + ln - 40 : r->label);
    if (r->total > 0)
        fprintf(stderr, "\r%-40s [%.*s%*s] %3d%% %8.1f/%.1f MB %6.1f MB/s", name, fill,
                "##############################", width - fill, "", (int)(100.0 * (double)done / (double)r->total),
                (double)done / 1e6, (double)r->total / 1e6, rate / 1e6);
    else
        fprintf(stderr, "\r%-40s %8.1f MB %6.1f MB/s", name, (double)done / 1e6, rate / 1e6);
    if (final) fputc('\n', stderr);
    fflush(stderr);
}

static size_t on_file(char *data, size_t sz, size_t nm, void *user) {
    http_resp *r = user;
    size_t n = sz * nm;
    if (r->status != 200 && r->status != 206) { r->bad_status = true; return 0; }
    if (r->status == 200 && r->offset > 0 && r->written == 0 && !r->restarted) {
        /* Range ignored: start over */
        if (ftruncate(r->fd, 0) || lseek(r->fd, 0, SEEK_SET) < 0) return 0;
        r->offset = 0;
        r->restarted = true;
    }
    size_t done = 0;
    while (done < n) {
        ssize_t w = write(r->fd, data + done, n - done);
        if (w < 0) {
            if (errno == EINTR) continue;
            return 0;
        }
        done += (size_t)w;
    }
    r->written += (long long)n;
    draw_progress(r, false);
    return n;
}

static CURL *http_handle(const repo_ref *rr, const char *url, http_resp *r, struct curl_slist **hdrs) {
    CURL *c = curl_easy_init();
    if (!c) return NULL;
    r->linked_size = -1;
    r->content_length = -1;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "d2od-hub/1 (libcurl)");
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 10L);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);   /* a stalled transfer fails after 60 s */
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, 60L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    *hdrs = NULL;
    if (rr->auth[0]) *hdrs = curl_slist_append(*hdrs, rr->auth); /* curl drops it on a redirect to another host */
    if (*hdrs) curl_easy_setopt(c, CURLOPT_HTTPHEADER, *hdrs);
    return c;
}

/* Transport failures worth a resumed retry. */
static bool retryable(CURLcode cc) {
    return cc == CURLE_PARTIAL_FILE || cc == CURLE_RECV_ERROR || cc == CURLE_SEND_ERROR || cc == CURLE_GOT_NOTHING ||
           cc == CURLE_OPERATION_TIMEDOUT || cc == CURLE_COULDNT_CONNECT || cc == CURLE_HTTP2 ||
           cc == CURLE_HTTP2_STREAM;
}

/* Could not reach the endpoint at all (fall back to the cache). */
static bool unreachable(CURLcode cc) {
    return cc == CURLE_COULDNT_CONNECT || cc == CURLE_COULDNT_RESOLVE_HOST || cc == CURLE_COULDNT_RESOLVE_PROXY ||
           cc == CURLE_OPERATION_TIMEDOUT || cc == CURLE_SSL_CONNECT_ERROR || cc == CURLE_GOT_NOTHING;
}

static int status_error(long st, const repo_ref *rr, const char *what, char *err, size_t errlen) {
    if (st == 401 || st == 403) {
        set_err(err, errlen, "%s: HTTP %ld from %s: the repository %s is gated, private or does not exist%s", what, st,
                rr->endpoint, rr->repo, rr->auth[0] ? " (HF_TOKEN was sent)" : "; set HF_TOKEN if it is gated or private");
        return D2_EAUTH;
    }
    if (st == 404) {
        set_err(err, errlen, "%s: not found on %s (HTTP 404)", what, rr->endpoint);
        return D2_ENOTFOUND;
    }
    set_err(err, errlen, "%s: HTTP %ld from %s", what, st, rr->endpoint);
    return D2_EIO;
}

/* ---- hashes ------------------------------------------------------------------------ */

/* sha256 of the file (etag of LFS files), or the git blob id (etag of small
 * files: sha1 of "blob <size>\0" + content), as lowercase hex. */
static int hash_file(const char *path, bool git_sha1, char *hex, size_t hexcap) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return D2_EIO;
    struct stat st;
    if (fstat(fd, &st)) { close(fd); return D2_EIO; }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int rc = D2_OK;
    if (!ctx || !EVP_DigestInit_ex(ctx, git_sha1 ? EVP_sha1() : EVP_sha256(), NULL)) rc = D2_EINTERNAL;
    if (rc == D2_OK && git_sha1) {
        char head[64];
        int hl = fmt_to(head, sizeof head, "blob %lld", (long long)st.st_size);
        if (!EVP_DigestUpdate(ctx, head, (size_t)hl + 1)) rc = D2_EINTERNAL; /* with the NUL */
    }
    static _Thread_local unsigned char chunk[1 << 16];
    while (rc == D2_OK) {
        ssize_t r = read(fd, chunk, sizeof chunk);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { rc = D2_EIO; break; }
        if (r == 0) break;
        if (!EVP_DigestUpdate(ctx, chunk, (size_t)r)) rc = D2_EINTERNAL;
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdl = 0;
    if (rc == D2_OK && !EVP_DigestFinal_ex(ctx, md, &mdl)) rc = D2_EINTERNAL;
    EVP_MD_CTX_free(ctx);
    close(fd);
    if (rc != D2_OK) return rc;
    if (hexcap < 2 * (size_t)mdl + 1) return D2_ERANGE;
    for (unsigned i = 0; i < mdl; i++) fmt_to(hex + 2 * i, 3, "%02x", md[i]);
    return D2_OK;
}

/* "W/\"abc\"" -> "abc" (lowercased). */
static void norm_etag(const char *in, char *out, size_t n) {
    if (!strncmp(in, "W/", 2)) in += 2;
    size_t o = 0;
    for (; *in && o + 1 < n; in++)
        if (*in != '"') out[o++] = (char)tolower((unsigned char)*in);
    out[o] = '\0';
}

/* ---- revision and file list --------------------------------------------------------- */

/* GET the revision API. On success *commit is set and siblings filled.
 * *unreach is set when the endpoint could not be reached at all. */
static int fetch_revision(const repo_ref *rr, char *commit, name_list *siblings, bool *unreach, char *err,
                          size_t errlen) {
    char rev_esc[800], url[4096];
    if (url_escape(rr->rev, false, rev_esc, sizeof rev_esc)) return D2_ERANGE;
    fmt_to(url, sizeof url, "%s/api/models/%s/revision/%s", rr->endpoint, rr->repo, rev_esc);
    http_resp r = {0};
    struct curl_slist *h = NULL;
    CURL *c = http_handle(rr, url, &r, &h);
    if (!c) return D2_ENOMEM;
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &r);
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(c, CURLOPT_MAXREDIRS, 5L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 60L);
    CURLcode cc = curl_easy_perform(c);
    long st = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &st);
    curl_easy_cleanup(c);
    curl_slist_free_all(h);
    int rc = D2_OK;
    char what[600];
    fmt_to(what, sizeof what, "revision '%s' of %s", rr->rev, rr->repo);
    if (cc != CURLE_OK) {
        *unreach = unreachable(cc);
        set_err(err, errlen, "%s: cannot reach %s: %s", what, rr->endpoint, curl_easy_strerror(cc));
        rc = D2_EIO;
    } else if (st != 200) {
        rc = status_error(st, rr, what, err, errlen);
    } else {
        json_error_t je;
        json_t *root = json_loadb(r.body ? r.body : "", r.body_len, 0, &je);
        json_t *sha = json_object_get(root, "sha");
        json_t *sib = json_object_get(root, "siblings");
        if (!json_is_string(sha) || !is_hex(json_string_value(sha), 40) || !json_is_array(sib)) {
            set_err(err, errlen, "%s: the answer of %s has no commit 'sha' and 'siblings'", what, url);
            rc = D2_EFORMAT;
        } else {
            fmt_to(commit, 41, "%s", json_string_value(sha));
            for (size_t i = 0; rc == D2_OK && i < json_array_size(sib); i++) {
                json_t *f = json_object_get(json_array_get(sib, i), "rfilename");
                const char *fn = json_string_value(f);
                /* a file name from the server becomes a path under the snapshot: no escapes */
                if (!fn || !fn[0] || fn[0] == '/' || strstr(fn, "..") || strlen(fn) > 512) continue;
                rc = names_add(siblings, fn);
            }
        }
        json_decref(root);
    }
    free(r.body);
    return rc;
}

static void list_snapshot(const char *root, const char *rel, name_list *out, int depth) {
    char path[HUB_PATH];
    if (fmt_to(path, sizeof path, "%s%s%s", root, rel[0] ? "/" : "", rel) >= (int)sizeof path) return;
    DIR *d = opendir(path);
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char sub[HUB_PATH], full[HUB_PATH * 2];
        if (fmt_to(sub, sizeof sub, "%s%s%s", rel, rel[0] ? "/" : "", de->d_name) >= (int)sizeof sub) continue;
        fmt_to(full, sizeof full, "%s/%s", root, sub);
        struct stat st;
        if (stat(full, &st)) continue; /* a dangling link: not there */
        if (S_ISDIR(st.st_mode) && depth < 4) list_snapshot(root, sub, out, depth + 1);
        else if (S_ISREG(st.st_mode)) names_add(out, sub);
    }
    closedir(d);
}

/* ---- choosing files ------------------------------------------------------------------ */

static const char *const HF_SMALL[] = {"config.json", "generation_config.json", "tokenizer.json",
                                       "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"};

/* Picks the GGUF (returns its index in files) or -1 with err. */
static int pick_gguf(const repo_ref *rr, const name_list *files, const char *want, char *err, size_t errlen) {
    int idx[64], n = 0;
    char list[1024] = "";
    for (int i = 0; i < files->n && n < 64; i++) {
        if (!ends_with_ci(files->v[i], ".gguf")) continue;
        const char *base = strrchr(files->v[i], '/');
        base = base ? base + 1 : files->v[i];
        if (want && (!strcmp(files->v[i], want) || !strcmp(base, want))) return i; /* exact name */
        if (want) {
            /* a quantisation name: case-insensitive substring of the base name */
            size_t wl = strlen(want), bl = strlen(base);
            bool hit = false;
            for (size_t k = 0; !hit && k + wl <= bl; k++) hit = !strncasecmp(base + k, want, wl);
            if (!hit) continue;
        }
        idx[n++] = i;
    }
    for (int i = 0, k = 0; i < files->n; i++) {
        if (!ends_with_ci(files->v[i], ".gguf")) continue;
        size_t l = strlen(list);
        if (l + strlen(files->v[i]) + 8 >= sizeof list) { strcat(list, ", ..."); break; }
        fmt_to(list + l, sizeof list - l, "%s%s", k++ ? ", " : "", files->v[i]);
    }
    if (n == 1) return idx[0];
    if (n == 0)
        set_err(err, errlen, "%s@%s: no GGUF file matches '%s' (the repository has: %s)", rr->repo, rr->rev,
                want ? want : "*.gguf", list[0] ? list : "none");
    else
        set_err(err, errlen, "%s@%s: %d GGUF files match%s%s%s; choose one with --gguf-file NAME or a quant name (%s)",
                rr->repo, rr->rev, n, want ? " '" : "", want ? want : "", want ? "'" : "", list);
    return -1;
}

/* ---- one file --------------------------------------------------------------------- */

typedef struct dl_ctx {
    const repo_ref *rr;
    const char *commit;
    char *err;
    size_t errlen;
    int n_downloaded;
} dl_ctx;

static int link_snapshot(const repo_ref *rr, const char *commit, const char *file, const char *etag) {
    char link[HUB_PATH], target[HUB_PATH], tmp[HUB_PATH + 32];
    if (fmt_to(link, sizeof link, "%s/snapshots/%s/%s", rr->dir, commit, file) >= (int)sizeof link) return D2_ERANGE;
    size_t o = 0;
    o += (size_t)fmt_to(target, sizeof target, "../../");
    for (const char *p = file; *p; p++)
        if (*p == '/') o += (size_t)fmt_to(target + o, sizeof target - o, "../");
    fmt_to(target + o, sizeof target - o, "blobs/%s", etag);
    if (mkdir_parent(link)) return D2_EIO;
    fmt_to(tmp, sizeof tmp, "%s.tmp.%ld", link, (long)getpid());
    unlink(tmp);
    if (symlink(target, tmp) || rename(tmp, link)) {
        unlink(tmp);
        return D2_EIO;
    }
    return D2_OK;
}

/* HEAD the resolve URL without following redirects (except relative ones, for
 * renamed repositories) for the etag and size. */
static int head_file(const repo_ref *rr, const char *commit, const char *file, char *etag, size_t etag_n,
                     long long *size, char *err, size_t errlen) {
    char fesc[2048], url[4096];
    if (url_escape(file, true, fesc, sizeof fesc)) return D2_ERANGE;
    fmt_to(url, sizeof url, "%s/%s/resolve/%s/%s", rr->endpoint, rr->repo, commit, fesc);
    char what[800];
    fmt_to(what, sizeof what, "%s (%s@%s)", file, rr->repo, rr->rev);
    for (int hop = 0; hop < 4; hop++) {
        http_resp r = {0};
        struct curl_slist *h = NULL;
        CURL *c = http_handle(rr, url, &r, &h);
        if (!c) return D2_ENOMEM;
        curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
        curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
        curl_easy_setopt(c, CURLOPT_TIMEOUT, 60L);
        CURLcode cc = curl_easy_perform(c);
        long st = 0;
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &st);
        curl_easy_cleanup(c);
        curl_slist_free_all(h);
        if (cc != CURLE_OK) {
            set_err(err, errlen, "%s: cannot reach %s: %s", what, rr->endpoint, curl_easy_strerror(cc));
            return D2_EIO;
        }
        if (st >= 300 && st < 400 && !r.linked_etag[0] && r.location[0] == '/') {
            fmt_to(url, sizeof url, "%s%s", rr->endpoint, r.location); /* relative: same host */
            continue;
        }
        if (st != 200 && !(st >= 300 && st < 400)) return status_error(st, rr, what, err, errlen);
        norm_etag(r.linked_etag[0] ? r.linked_etag : r.etag, etag, etag_n);
        if (!etag[0] || strchr(etag, '/')) {
            set_err(err, errlen, "%s: the server sent no usable ETag", what);
            return D2_EFORMAT;
        }
        *size = r.linked_size >= 0 ? r.linked_size : (st == 200 ? r.content_length : -1);
        return D2_OK;
    }
    set_err(err, errlen, "%s: too many redirects", what);
    return D2_EIO;
}

static int verify_blob(const char *path, const char *etag, long long size, const char *what, char *err,
                       size_t errlen) {
    struct stat st;
    if (stat(path, &st)) return D2_EIO;
    if (size >= 0 && (long long)st.st_size != size) {
        set_err(err, errlen, "%s: downloaded %lld bytes, expected %lld; the partial file was deleted", what,
                (long long)st.st_size, size);
        return D2_EFORMAT;
    }
    bool sha256 = is_hex(etag, 64), sha1 = is_hex(etag, 40);
    if (!sha256 && !sha1) {
        D2_WARN("hub: %s: etag '%s' is not a content hash; checked the size only", what, etag);
        return D2_OK;
    }
    char hex[129];
    int rc = hash_file(path, sha1, hex, sizeof hex);
    if (rc != D2_OK) return rc;
    if (strcmp(hex, etag)) {
        set_err(err, errlen, "%s: corrupt download: %s is %s, expected %s; the file was deleted", what,
                sha256 ? "sha256" : "git blob id", hex, etag);
        return D2_EFORMAT;
    }
    return D2_OK;
}

static int download_file(dl_ctx *dc, const char *file) {
    const repo_ref *rr = dc->rr;
    char snap[HUB_PATH];
    if (fmt_to(snap, sizeof snap, "%s/snapshots/%s/%s", rr->dir, dc->commit, file) >= (int)sizeof snap)
        return D2_ERANGE;
    if (file_exists(snap)) return D2_OK; /* cached */
    char etag[160];
    long long size = -1;
    int rc = head_file(rr, dc->commit, file, etag, sizeof etag, &size, dc->err, dc->errlen);
    if (rc != D2_OK) return rc;
    char blob[HUB_PATH], part[HUB_PATH + 16], lockp[HUB_PATH];
    fmt_to(blob, sizeof blob, "%s/blobs/%s", rr->dir, etag);
    fmt_to(part, sizeof part, "%s.incomplete", blob);
    fmt_to(lockp, sizeof lockp, "%s/%s.lock", rr->locks, etag);
    if (mkdir_parent(blob) || mkdir_p(rr->locks)) {
        set_err(dc->err, dc->errlen, "cannot create %s: %s", rr->dir, strerror(errno));
        return D2_EIO;
    }
    int lfd = open(lockp, O_RDWR | O_CREAT, 0644);
    if (lfd < 0 || flock(lfd, LOCK_EX)) {
        set_err(dc->err, dc->errlen, "cannot lock %s: %s", lockp, strerror(errno));
        if (lfd >= 0) close(lfd);
        return D2_EIO;
    }
    char what[800];
    fmt_to(what, sizeof what, "%s (%s@%s)", file, rr->repo, rr->rev);
    if (file_exists(blob)) goto link; /* another revision (or process) brought it */
    {
        char fesc[2048], url[4096];
        url_escape(file, true, fesc, sizeof fesc);
        fmt_to(url, sizeof url, "%s/%s/resolve/%s/%s", rr->endpoint, rr->repo, dc->commit, fesc);
        int fd = open(part, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd < 0) {
            set_err(dc->err, dc->errlen, "%s: cannot write %s: %s", what, part, strerror(errno));
            rc = D2_EIO;
            goto out;
        }
        CURLcode cc = CURLE_OK;
        long st = 0;
        for (int attempt = 0; attempt < HUB_ATTEMPTS; attempt++) {
            struct stat pst;
            fstat(fd, &pst);
            long long have = (long long)pst.st_size;
            if (size >= 0 && have > size) { /* not a prefix of this file */
                if (ftruncate(fd, 0)) { rc = D2_EIO; break; }
                have = 0;
            }
            if (size >= 0 && have == size) { cc = CURLE_OK; st = 206; break; }
            if (have > 0) {
                if (dc->rr->progress >= 0)
                    fprintf(stderr, "hub: resuming %s at %.1f MB\n", file, (double)have / 1e6);
            } else if (rr->progress == 0) {
                fprintf(stderr, "hub: downloading %s (%.1f MB)\n", file, size >= 0 ? (double)size / 1e6 : 0.0);
            }
            http_resp r = {.fd = fd, .offset = have, .label = file, .total = size, .t_start = d2_now(),
                           .progress = rr->progress};
            struct curl_slist *h = NULL;
            CURL *c = http_handle(rr, url, &r, &h);
            if (!c) { rc = D2_ENOMEM; break; }
            char range[64];
            if (have > 0) {
                fmt_to(range, sizeof range, "%lld-", have);
                curl_easy_setopt(c, CURLOPT_RANGE, range);
            }
            curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
            curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
            curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_file);
            curl_easy_setopt(c, CURLOPT_WRITEDATA, &r);
            cc = curl_easy_perform(c);
            curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &st);
            curl_easy_cleanup(c);
            curl_slist_free_all(h);
            if (r.written > 0 || cc == CURLE_OK) draw_progress(&r, true);
            if (cc == CURLE_OK || r.bad_status || !retryable(cc)) break;
            D2_WARN("hub: %s: %s after %lld bytes; retrying (%d/%d)", what, curl_easy_strerror(cc),
                    r.offset + r.written, attempt + 1, HUB_ATTEMPTS - 1);
            struct timespec ts = {0, 200000000L * (attempt + 1)};
            nanosleep(&ts, NULL);
        }
        if (rc == D2_OK && fsync(fd) != 0 && errno != EINVAL) rc = D2_EIO;
        close(fd);
        if (rc != D2_OK) goto out;
        if (cc != CURLE_OK && st != 0 && st != 200 && st != 206) {
            rc = status_error(st, rr, what, dc->err, dc->errlen);
            goto out;
        }
        if (cc != CURLE_OK) {
            set_err(dc->err, dc->errlen, "%s: download failed: %s (the partial file %s is kept; the next run resumes it)",
                    what, curl_easy_strerror(cc), part);
            rc = D2_EIO;
            goto out;
        }
        rc = verify_blob(part, etag, size, what, dc->err, dc->errlen);
        if (rc != D2_OK) {
            unlink(part);
            goto out;
        }
        if (rename(part, blob)) {
            set_err(dc->err, dc->errlen, "%s: cannot rename %s: %s", what, part, strerror(errno));
            rc = D2_EIO;
            goto out;
        }
        dc->n_downloaded++;
    }
link:
    if (link_snapshot(rr, dc->commit, file, etag) != D2_OK) {
        set_err(dc->err, dc->errlen, "%s: cannot link it into %s/snapshots/%s", what, rr->dir, dc->commit);
        rc = D2_EIO;
    }
out:
    flock(lfd, LOCK_UN);
    close(lfd);
    return rc;
}

/* ---- the files serving needs ------------------------------------------------------------ */

/* Shard names from model.safetensors.index.json (in the snapshot). */
static int index_shards(const char *path, name_list *out, char *err, size_t errlen) {
    char *text = NULL;
    size_t len = 0;
    int rc = d2_read_file(path, &text, &len);
    if (rc != D2_OK) {
        set_err(err, errlen, "cannot read %s", path);
        return rc;
    }
    json_error_t je;
    json_t *root = json_loadb(text, len, 0, &je);
    free(text);
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm)) {
        json_decref(root);
        set_err(err, errlen, "%s: no weight_map", path);
        return D2_EFORMAT;
    }
    const char *k;
    json_t *v;
    json_object_foreach(wm, k, v) {
        const char *s = json_string_value(v);
        if (!s || !s[0] || s[0] == '/' || strstr(s, "..")) continue;
        if (!names_has(out, s) && (rc = names_add(out, s)) != D2_OK) break;
    }
    json_decref(root);
    return rc;
}

/* files: the repository's files (siblings online; the snapshot offline).
 * Fetches (online) and checks what serving needs; *gguf_out set when a GGUF
 * was chosen. */
static int ensure_files(dl_ctx *dc, const name_list *files, const char *gguf_want, bool online, char *gguf_out,
                        size_t gn) {
    const repo_ref *rr = dc->rr;
    gguf_out[0] = '\0';
    bool has_index = names_has(files, "model.safetensors.index.json");
    bool has_single = names_has(files, "model.safetensors");
    bool any_gguf = false;
    for (int i = 0; i < files->n; i++) any_gguf |= ends_with_ci(files->v[i], ".gguf");
    char snapdir[HUB_PATH];
    fmt_to(snapdir, sizeof snapdir, "%s/snapshots/%s", rr->dir, dc->commit);
    const char *where = online ? "the repository" : "the cache";
    if (gguf_want || (!has_index && !has_single && any_gguf)) {
        int gi = pick_gguf(rr, files, gguf_want, dc->err, dc->errlen);
        if (gi < 0) return D2_ENOTFOUND;
        int rc = online ? download_file(dc, files->v[gi]) : D2_OK;
        if (rc != D2_OK) return rc;
        fmt_to(gguf_out, gn, "%s", files->v[gi]);
        return D2_OK;
    }
    if (!has_index && !has_single) {
        set_err(dc->err, dc->errlen, "%s@%s: %s holds no model.safetensors, model.safetensors.index.json or .gguf file%s",
                rr->repo, rr->rev, where,
                online ? "" : " (offline: HF_HUB_OFFLINE=1; run once online to download it)");
        return D2_ENOTFOUND;
    }
    if (!names_has(files, "config.json")) {
        set_err(dc->err, dc->errlen, "%s@%s: config.json is missing from %s%s", rr->repo, rr->rev, where,
                online ? "" : " (offline: HF_HUB_OFFLINE=1)");
        return D2_ENOTFOUND;
    }
    int rc = D2_OK;
    for (size_t i = 0; rc == D2_OK && i < sizeof HF_SMALL / sizeof HF_SMALL[0]; i++)
        if (names_has(files, HF_SMALL[i]) && online) rc = download_file(dc, HF_SMALL[i]);
    if (rc != D2_OK) return rc;
    name_list shards = {0};
    if (has_index) {
        if (online) rc = download_file(dc, "model.safetensors.index.json");
        char ip[HUB_PATH + 64];
        fmt_to(ip, sizeof ip, "%s/model.safetensors.index.json", snapdir);
        if (rc == D2_OK) rc = index_shards(ip, &shards, dc->err, dc->errlen);
    } else {
        rc = names_add(&shards, "model.safetensors");
    }
    for (int i = 0; rc == D2_OK && i < shards.n; i++) {
        if (online) {
            if (!names_has(files, shards.v[i])) {
                set_err(dc->err, dc->errlen, "%s@%s: the index names %s, which the repository does not have", rr->repo,
                        rr->rev, shards.v[i]);
                rc = D2_ENOTFOUND;
            } else {
                rc = download_file(dc, shards.v[i]);
            }
        } else if (!names_has(files, shards.v[i])) {
            set_err(dc->err, dc->errlen,
                    "offline (HF_HUB_OFFLINE=1): %s@%s: %s is not in the cache (%s); run once online to download it",
                    rr->repo, rr->rev, shards.v[i], snapdir);
            rc = D2_ENOTFOUND;
        }
    }
    names_free(&shards);
    return rc;
}

/* ---- entry -------------------------------------------------------------------------------- */

static pthread_once_t g_curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

static int read_ref(const repo_ref *rr, char *commit) {
    if (is_hex(rr->rev, 40)) {
        char p[HUB_PATH];
        fmt_to(p, sizeof p, "%s/snapshots/%s", rr->dir, rr->rev);
        if (d2_is_dir(p)) {
            fmt_to(commit, 41, "%s", rr->rev);
            return D2_OK;
        }
    }
    char p[HUB_PATH];
    fmt_to(p, sizeof p, "%s/refs/%s", rr->dir, rr->rev);
    char *text = NULL;
    size_t len = 0;
    if (d2_read_file(p, &text, &len) != D2_OK) return D2_ENOTFOUND;
    while (len && (text[len - 1] == '\n' || text[len - 1] == '\r' || text[len - 1] == ' ')) text[--len] = '\0';
    int rc = is_hex(text, 40) ? D2_OK : D2_EFORMAT;
    if (rc == D2_OK) fmt_to(commit, 41, "%s", text);
    free(text);
    return rc;
}

int hub_resolve(const char *id, const hub_options *opt, char *out, size_t n, char *err, size_t errlen) {
    hub_options none = {0};
    if (!opt) opt = &none;
    if (!hub_is_repo_id(id)) {
        set_err(err, errlen, "'%s' is not a hub id (org/name or org/name@revision)", id ? id : "");
        return D2_EINVAL;
    }
    repo_ref *rr = calloc(1, sizeof *rr);
    if (!rr) return D2_ENOMEM;
    const char *slash = strchr(id, '/'), *at = strchr(slash, '@');
    fmt_to(rr->org, sizeof rr->org, "%.*s", (int)(slash - id), id);
    fmt_to(rr->name, sizeof rr->name, "%.*s", (int)(at ? at - slash - 1 : (long)strlen(slash + 1)), slash + 1);
    fmt_to(rr->rev, sizeof rr->rev, "%s", at ? at + 1 : "main");
    fmt_to(rr->repo, sizeof rr->repo, "%s/%s", rr->org, rr->name);
    rr->progress = opt->progress;
    char root[HUB_PATH];
    int rc = hub_cache_root(opt, root, sizeof root);
    if (rc != D2_OK) {
        set_err(err, errlen, "no Hugging Face cache directory: set HF_HUB_CACHE, HF_HOME or HOME");
        free(rr);
        return D2_ENOENT;
    }
    fmt_to(rr->dir, sizeof rr->dir, "%s/models--%s--%s", root, rr->org, rr->name);
    fmt_to(rr->locks, sizeof rr->locks, "%s/.locks/models--%s--%s", root, rr->org, rr->name);
    const char *ep = opt->endpoint ? opt->endpoint : getenv("HF_ENDPOINT");
    fmt_to(rr->endpoint, sizeof rr->endpoint, "%s", ep && ep[0] ? ep : "https://huggingface.co");
    size_t el = strlen(rr->endpoint);
    while (el > 0 && rr->endpoint[el - 1] == '/') rr->endpoint[--el] = '\0';
    const char *tok = opt->token ? opt->token : getenv("HF_TOKEN");
    if (tok && tok[0]) fmt_to(rr->auth, sizeof rr->auth, "Authorization: Bearer %s", tok);
    bool offline = opt->offline || env_true("HF_HUB_OFFLINE");

    char commit[41] = "";
    name_list files = {0};
    bool online = !offline;
    if (online) {
        pthread_once(&g_curl_once, curl_init_once);
        bool unreach = false;
        rc = fetch_revision(rr, commit, &files, &unreach, err, errlen);
        if (rc != D2_OK && unreach && read_ref(rr, commit) == D2_OK) {
            D2_WARN("hub: %s; using the cached snapshot %s", err, commit);
            online = false;
            rc = D2_OK;
        }
        if (rc == D2_OK && online && strcmp(rr->rev, commit)) {
            char refp[HUB_PATH + 300], line[64];
            fmt_to(refp, sizeof refp, "%s/refs/%s", rr->dir, rr->rev);
            fmt_to(line, sizeof line, "%s", commit);
            if (write_atomic(refp, line) != D2_OK) {
                set_err(err, errlen, "cannot write %s: %s", refp, strerror(errno));
                rc = D2_EIO;
            }
        }
    } else {
        rc = read_ref(rr, commit);
        if (rc != D2_OK)
            set_err(err, errlen,
                    "offline (HF_HUB_OFFLINE=1): revision '%s' of %s is not in the cache: %s/refs/%s is missing; "
                    "run once online (or with transformers/vLLM) to download it",
                    rr->rev, rr->repo, rr->dir, rr->rev);
    }
    char snapdir[HUB_PATH];
    fmt_to(snapdir, sizeof snapdir, "%s/snapshots/%s", rr->dir, commit);
    if (rc == D2_OK && !online) {
        list_snapshot(snapdir, "", &files, 0);
        if (files.n == 0) {
            set_err(err, errlen, "offline: %s@%s: the snapshot %s is missing or empty", rr->repo, rr->rev, snapdir);
            rc = D2_ENOTFOUND;
        }
    }
    char gguf[1024] = "";
    dl_ctx dc = {.rr = rr, .commit = commit, .err = err, .errlen = errlen};
    if (rc == D2_OK) rc = ensure_files(&dc, &files, opt->gguf_file, online, gguf, sizeof gguf);
    names_free(&files);
    if (rc == D2_OK) {
        int w = gguf[0] ? fmt_to(out, n, "%s/%s", snapdir, gguf) : fmt_to(out, n, "%s", snapdir);
        if (w < 0 || (size_t)w >= n) rc = D2_ERANGE;
        else if (rr->progress >= 0)
            fprintf(stderr, "hub: %s@%s -> %s (%d file%s downloaded)\n", rr->repo, rr->rev, out, dc.n_downloaded,
                    dc.n_downloaded == 1 ? "" : "s");
    }
    free(rr);
    return rc;
}
