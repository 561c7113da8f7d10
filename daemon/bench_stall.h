/*
 * daemon/bench_stall.h — `d2od bench` section 5 (daemon/bench_stall.c): the
 * inter-token-latency stall a long compressed prompt imposes on concurrent
 * decoders. Called only from daemon/bench.c.
 */
#ifndef D2_DAEMON_BENCH_STALL_H
#define D2_DAEMON_BENCH_STALL_H

#include <stddef.h>

#include "engine/engine.h"

/* Prints the section and writes its JSON object to json; D2_OK or an error. */
int d2_bench_kv_stall(const char *model, int threads, const eng_kv_config *kv, int n_prompt, int n_decoders,
                      char *json, size_t json_cap);

#endif
