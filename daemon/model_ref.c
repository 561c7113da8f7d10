/*
 * daemon/model_ref.c — what a --model argument names: an existing local path
 * (GGUF file or Hugging Face directory) is used as it is; anything else of
 * the shape org/name[@revision] is a hub id, resolved through the Hugging Face
 * cache by hub/ (downloading what is missing). Callers: daemon/ (main.c for
 * every command's --model, serve.c for the configured model).
 */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/status.h"
#include "daemon/cli.h"
#include "hub/hub.h"

/* A hub id, not a path: has the id's shape, does not exist locally, and its
 * first component is not a local directory either ("models/x.gguf" with a
 * typo stays a path, so the error is "no such file", not a download). */
static bool is_hub_ref(const char *arg) {
    if (!arg || access(arg, F_OK) == 0 || !hub_is_repo_id(arg)) return false;
    char org[256];
    size_t k = strcspn(arg, "/");
    if (k >= sizeof org) return true;
    memcpy(org, arg, k);
    org[k] = '\0';
    return access(org, F_OK) != 0;
}

int d2_model_resolve(const char *arg, const char *gguf_file, char *out, size_t n) {
    if (!is_hub_ref(arg)) {
        if (!arg || snprintf(out, n, "%s", arg) >= (int)n) return D2_ERANGE;
        return D2_OK;
    }
    hub_options o = {.gguf_file = gguf_file && gguf_file[0] ? gguf_file : NULL,
                     .progress = isatty(STDERR_FILENO) ? 1 : 0};
    char err[1024] = "";
    int rc = hub_resolve(arg, &o, out, n, err, sizeof err);
    if (rc != D2_OK) fprintf(stderr, "d2od: model %s: %s\n", arg, err[0] ? err : d2_strerror(rc));
    return rc;
}

/* Rewrites "--model ID" (and "--model=ID") in argv to the resolved local path
 * and removes "--gguf-file NAME", so every command loads hub ids the same
 * way. The new strings live until exit. 0 ok, else an exit code (1). */
int d2_cli_resolve_model(int *argc, char **argv) {
    static char resolved[4096];
    const char *gguf = NULL;
    int w = 0;
    for (int i = 0; i < *argc; i++) {
        if (!strcmp(argv[i], "--gguf-file") && i + 1 < *argc) { gguf = argv[++i]; continue; }
        if (!strncmp(argv[i], "--gguf-file=", 12)) { gguf = argv[i] + 12; continue; }
        argv[w++] = argv[i];
    }
    *argc = w;
    argv[w] = NULL;
    for (int i = 0; i < *argc; i++) {
        const char *v = NULL;
        bool eq = false;
        if (!strcmp(argv[i], "--model") && i + 1 < *argc) v = argv[i + 1];
        else if (!strncmp(argv[i], "--model=", 8)) { v = argv[i] + 8; eq = true; }
        if (!is_hub_ref(v)) continue;
        if (d2_model_resolve(v, gguf, resolved, sizeof resolved) != D2_OK) return 1;
        if (eq) {
            static char flag[4096 + 16];
            snprintf(flag, sizeof flag, "--model=%s", resolved);
            argv[i] = flag;
        } else {
            argv[i + 1] = resolved;
        }
        break;
    }
    return 0;
}
