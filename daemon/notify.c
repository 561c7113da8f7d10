/*
 * daemon/notify.c — sd_notify(3) protocol over a plain AF_UNIX datagram
 * socket; see daemon/notify.h for the contract. Callers: daemon/ only.
 *
 * Why not libsystemd: one dependency less, and the protocol is one sendto().
 * Credentials: systemd attributes the datagram by the sender's pid
 * (SCM_CREDENTIALS are attached by the kernel when systemd enables
 * SO_PASSCRED), which is why the unit sets NotifyAccess=main and the daemon
 * sends from its main process (any thread of it).
 */
#include "daemon/notify.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/status.h"

int dmn_notify_enabled(void) {
    const char *s = getenv("NOTIFY_SOCKET");
    return s && *s;
}

int dmn_notify(const char *state) {
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path) return D2_OK;
    if (!state) return D2_EINVAL;

    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    size_t plen = strlen(path);
    if ((path[0] != '/' && path[0] != '@') || plen < 2 || plen > sizeof sa.sun_path) {
        D2_ERROR("notify: NOTIFY_SOCKET '%s' is not an absolute path or @abstract name", path);
        return D2_EINVAL;
    }
    socklen_t salen;
    if (path[0] == '@') {
        /* Abstract namespace: leading NUL, name not NUL-terminated. */
        sa.sun_path[0] = '\0';
        memcpy(sa.sun_path + 1, path + 1, plen - 1);
        salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen);
    } else {
        if (plen >= sizeof sa.sun_path) {
            D2_ERROR("notify: NOTIFY_SOCKET path too long (%zu bytes)", plen);
            return D2_EINVAL;
        }
        memcpy(sa.sun_path, path, plen + 1);
        salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + 1);
    }

    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        D2_ERROR("notify: socket: %s", strerror(errno));
        return D2_EIO;
    }
    size_t len = strlen(state);
    ssize_t n;
    do n = sendto(fd, state, len, MSG_NOSIGNAL, (const struct sockaddr *)&sa, salen);
    while (n < 0 && errno == EINTR);
    int saved = errno;
    close(fd);
    if (n < 0 || (size_t)n != len) {
        D2_ERROR("notify: send to %s: %s", path, n < 0 ? strerror(saved) : "short write");
        return D2_EIO;
    }
    return D2_OK;
}

int dmn_notify_status(const char *fmt, ...) {
    if (!dmn_notify_enabled()) return D2_OK;
    char buf[512];
    int k = snprintf(buf, sizeof buf, "STATUS=");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + k, sizeof buf - (size_t)k, fmt, ap);
    va_end(ap);
    /* A newline would start a new assignment: keep the status one line. */
    for (char *p = buf + k; *p; p++)
        if (*p == '\n' || *p == '\r') *p = ' ';
    return dmn_notify(buf);
}

int dmn_notify_ready(void) { return dmn_notify("READY=1"); }
int dmn_notify_watchdog(void) { return dmn_notify("WATCHDOG=1"); }
int dmn_notify_stopping(void) { return dmn_notify("STOPPING=1"); }

int dmn_notify_reloading(void) {
    if (!dmn_notify_enabled()) return D2_OK;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    unsigned long long us = (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000ull;
    char buf[64];
    snprintf(buf, sizeof buf, "RELOADING=1\nMONOTONIC_USEC=%llu", us);
    return dmn_notify(buf);
}

/* Parses a whole decimal string as an unsigned 64-bit value; -1 if it is not one. */
static int parse_u64(const char *s, unsigned long long *out) {
    if (!s || *s < '0' || *s > '9') return -1;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno == ERANGE || *end) return -1;
    *out = v;
    return 0;
}

uint64_t dmn_notify_watchdog_usec(void) {
    unsigned long long usec, pid;
    if (parse_u64(getenv("WATCHDOG_USEC"), &usec) < 0 || usec == 0) return 0;
    const char *p = getenv("WATCHDOG_PID");
    if (p && *p) {
        if (parse_u64(p, &pid) < 0 || pid != (unsigned long long)getpid()) return 0;
    }
    return (uint64_t)usec;
}
