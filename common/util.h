/*
 * common/util.h — small host helpers shared by every module: whole-file
 * reads, read-only memory maps, monotonic time, half-precision conversion.
 *
 * Leaf module. All functions are thread-safe.
 */
#ifndef D2_COMMON_UTIL_H
#define D2_COMMON_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Reads a whole file into a new NUL-terminated buffer.
 * On success *out is malloc'd (caller frees) and *len excludes the NUL.
 * Returns D2_OK, D2_ENOENT, D2_EIO or D2_ENOMEM. */
int d2_read_file(const char *path, char **out, size_t *len);

/* A read-only private memory map of a whole file. */
typedef struct d2_mmap {
    const uint8_t *data; /* owned by the map; valid until d2_mmap_close */
    size_t size;
} d2_mmap;
int d2_mmap_open(const char *path, d2_mmap *m);
void d2_mmap_close(d2_mmap *m); /* accepts a zeroed map */
/* Replaces the pages of map [off, off + len) (page-aligned off) by anonymous
 * memory holding the same bytes, at the same address: pointers into the map
 * stay valid, and the file may afterwards be truncated, rewritten or deleted
 * without affecting it (a file mapping would SIGBUS on truncation). The map
 * stays read-only; d2_mmap_close still unmaps it. Reading the file while it
 * is being truncated can still fault, so call it right after loading.
 * D2_OK, or D2_ENOMEM when no anonymous memory is left (the map is unchanged). */
int d2_mmap_detach(d2_mmap *m, size_t off, size_t len);

/* CPUs this process may really use: the CPUs in its affinity mask
 * (sched_getaffinity, e.g. taskset or a cpuset), lowered to the cgroup CPU
 * quota rounded up (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us/period_us).
 * At least 1. Default of every "threads 0". */
int d2_usable_cpus(void);
/* The CPU count a cgroup v2 cpu.max text ("max 100000", "150000 100000")
 * allows, rounded up; 0 when unlimited or unparsable. */
int d2_cpu_max_parse(const char *text);

/* Monotonic seconds. */
double d2_now(void);

/* IEEE half and bfloat16 <-> float. Exact for every finite value and inf/NaN. */
float d2_f16_to_f32(uint16_t h);
uint16_t d2_f32_to_f16(float f);      /* round to nearest even */
float d2_bf16_to_f32(uint16_t h);
uint16_t d2_f32_to_bf16(float f);     /* round to nearest even */

/* True when path is an existing directory. */
int d2_is_dir(const char *path);

/* Joins dir and name into buf (size n) with one '/'; returns D2_OK or D2_ERANGE. */
int d2_path_join(char *buf, size_t n, const char *dir, const char *name);

#endif
