/*
 * tests/fuzz/fuzz_config.c — fuzz target for the daemon's config-file parser
 * (dmn_config_parse_buffer in daemon/config.c, with the value readers of
 * daemon/value.c).
 *
 * libFuzzer: `make fuzz` builds build/fuzz/fuzz_config (clang,
 * -fsanitize=fuzzer,address,undefined, with every library source), then
 *   build/fuzz/fuzz_config -max_len=4096 configs/
 * Standalone replay (any compiler; -DD2_FUZZ_STANDALONE adds a main that runs
 * each file named on the command line once, e.g. a crash reproducer): `make`
 * builds build/fuzz-replay/fuzz_config, then
 *   build/fuzz-replay/fuzz_config configs/d2od.conf crash-1234
 *
 * Besides "no crash, no sanitizer report", the target checks invariants:
 * the status is D2_OK or D2_ECONFIG, an error always carries a message
 * starting with the buffer's name, and the string fields stay NUL-terminated.
 * daemon/ is not in libd2od.a, so the module's sources are included.
 */
#include "daemon/config.c"
#include "daemon/value.c"

#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    dmn_config cfg;
    char err[512];
    err[0] = '\0';
    dmn_config_defaults(&cfg);
    int rc = dmn_config_parse_buffer(&cfg, (const char *)data, size, "fuzz.conf", err, sizeof err);
    if (rc != D2_OK && rc != D2_ECONFIG) abort();
    if (rc == D2_ECONFIG && strncmp(err, "fuzz.conf:", 10) != 0) abort();
    if (!memchr(cfg.model, '\0', sizeof cfg.model) || !memchr(cfg.api_key, '\0', sizeof cfg.api_key) ||
        !memchr(cfg.kv_budget, '\0', sizeof cfg.kv_budget))
        abort();
    if (rc == D2_OK) {
        /* Whatever parsed must also finalize or fail cleanly, and dump. */
        if (!cfg.model[0]) memcpy(cfg.model, "m", 2);
        rc = dmn_config_finalize(&cfg, err, sizeof err);
        if (rc != D2_OK && rc != D2_ECONFIG) abort();
        FILE *null = fopen("/dev/null", "w");
        if (null) {
            dmn_config_dump(&cfg, null);
            fclose(null);
        }
    }
    return 0;
}

#include "tests/fuzz/replay.h"
