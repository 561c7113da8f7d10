/* common/util.c — see util.h. */
#define _GNU_SOURCE
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "status.h"

int d2_read_file(const char *path, char **out, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return errno == ENOENT ? D2_ENOENT : errno == EISDIR ? D2_EISDIR : D2_EIO;
    struct stat st; /* a directory opens for reading; say so rather than fail on its size */
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) { fclose(f); return D2_EISDIR; }
    if (fseek(f, 0, SEEK_END) != 0) { fclose(f); return D2_EIO; }
    long sz = ftell(f);
    if (sz < 0 || fseek(f, 0, SEEK_SET) != 0) { fclose(f); return D2_EIO; }
    char *buf = malloc((size_t)sz + 1);
    if (!buf) { fclose(f); return D2_ENOMEM; }
    if (sz > 0 && fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
        free(buf);
        fclose(f);
        return D2_EIO;
    }
    fclose(f);
    buf[sz] = '\0';
    *out = buf;
    if (len) *len = (size_t)sz;
    return D2_OK;
}

int d2_mmap_open(const char *path, d2_mmap *m) {
    memset(m, 0, sizeof *m);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? D2_ENOENT : D2_EIO;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) { close(fd); return D2_EIO; }
    if (st.st_size == 0) { close(fd); return D2_EFORMAT; }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return D2_EIO;
    m->data = p;
    m->size = (size_t)st.st_size;
    return D2_OK;
}

void d2_mmap_close(d2_mmap *m) {
    if (m && m->data) munmap((void *)m->data, m->size);
    if (m) memset(m, 0, sizeof *m);
}

int d2_mmap_detach(d2_mmap *m, size_t off, size_t len) {
    if (!m->data || off >= m->size) return D2_OK;
    if (len > m->size - off) len = m->size - off;
    long pg = sysconf(_SC_PAGESIZE);
    size_t span = (len + (size_t)pg - 1) / (size_t)pg * (size_t)pg; /* the last page of the map is whole too */
    void *anon = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (anon == MAP_FAILED) return D2_ENOMEM;
    memcpy(anon, m->data + off, len);
    mprotect(anon, span, PROT_READ);
    /* atomically replaces the file pages at that address by the copy */
    void *at = mremap(anon, span, span, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)(m->data + off));
    if (at == MAP_FAILED) {
        munmap(anon, span);
        return D2_ENOMEM;
    }
    return D2_OK;
}

int d2_cpu_max_parse(const char *text) {
    long long quota = 0, period = 0;
    if (!text || sscanf(text, "%lld %lld", &quota, &period) != 2 || quota <= 0 || period <= 0) return 0;
    long long n = (quota + period - 1) / period;
    return n > 1 << 20 ? 1 << 20 : (int)n;
}

/* First line of a small file into buf; false when unreadable. */
static bool read_line(const char *path, char *buf, size_t n) {
    FILE *f = fopen(path, "r");
    if (!f) return false;
    bool ok = fgets(buf, (int)n, f) != NULL;
    fclose(f);
    return ok;
}

int d2_usable_cpus(void) {
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    int n = online > 0 ? (int)online : 1;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0 && CPU_COUNT(&set) < n) n = CPU_COUNT(&set);
    char line[128];
    int q = 0;
    if (read_line("/sys/fs/cgroup/cpu.max", line, sizeof line)) {
        q = d2_cpu_max_parse(line);
    } else {
        char a[64], b[64];
        if (read_line("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", a, sizeof a) &&
            read_line("/sys/fs/cgroup/cpu/cpu.cfs_period_us", b, sizeof b)) {
            char both[160];
            snprintf(both, sizeof both, "%lld %lld", atoll(a), atoll(b));
            q = d2_cpu_max_parse(both);
        }
    }
    if (q > 0 && q < n) n = q;
    return n > 0 ? n : 1;
}

double d2_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

float d2_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400u) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t d2_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t exp = (x >> 23) & 0xffu;
    uint32_t man = x & 0x7fffffu;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000u;
        int shift = 14 - e;
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)e << 10) | (man >> 13);
    uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) half++; /* may carry into exp: correct */
    return (uint16_t)(sign | half);
}

float d2_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t d2_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

int d2_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int d2_path_join(char *buf, size_t n, const char *dir, const char *name) {
    size_t dl = strlen(dir);
    int w = snprintf(buf, n, "%s%s%s", dir, (dl && dir[dl - 1] == '/') ? "" : "/", name);
    return (w < 0 || (size_t)w >= n) ? D2_ERANGE : D2_OK;
}
