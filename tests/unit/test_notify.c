/*
 * tests/unit/test_notify.c — daemon/notify.c against a real AF_UNIX datagram
 * socket standing in for systemd: path and abstract ('@') NOTIFY_SOCKET, each
 * message kind, the no-op without NOTIFY_SOCKET, bad addresses, and the
 * WATCHDOG_USEC / WATCHDOG_PID rules.
 *
 * daemon/ is not part of libd2od.a, so the module's source is included.
 */
#include "daemon/notify.c"

#include <poll.h>
#include <sys/stat.h>

#include "tests/test.h"

typedef struct listener {
    int fd;
    char dir[64];
    char path[128];
} listener;

/* A datagram socket bound at a path in a fresh temp dir; NOTIFY_SOCKET set. */
static void listen_path(listener *l) {
    snprintf(l->dir, sizeof l->dir, "/tmp/d2od_notify_XXXXXX");
    ASSERT(mkdtemp(l->dir) != NULL);
    snprintf(l->path, sizeof l->path, "%s/notify.sock", l->dir);
    l->fd = socket(AF_UNIX, SOCK_DGRAM, 0);
    ASSERT(l->fd >= 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, l->path, strlen(l->path) + 1);
    ASSERT_EQ(bind(l->fd, (struct sockaddr *)&sa, sizeof sa), 0);
    setenv("NOTIFY_SOCKET", l->path, 1);
}

/* The same in the abstract namespace: NOTIFY_SOCKET="@name". */
static void listen_abstract(listener *l) {
    l->dir[0] = '\0';
    snprintf(l->path, sizeof l->path, "@d2od-test-notify-%ld-%ld", (long)getpid(), (long)time(NULL));
    l->fd = socket(AF_UNIX, SOCK_DGRAM, 0);
    ASSERT(l->fd >= 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t n = strlen(l->path);
    memcpy(sa.sun_path + 1, l->path + 1, n - 1); /* sun_path[0] stays NUL */
    ASSERT_EQ(bind(l->fd, (struct sockaddr *)&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n)), 0);
    setenv("NOTIFY_SOCKET", l->path, 1);
}

static void listener_close(listener *l) {
    close(l->fd);
    if (l->dir[0]) {
        unlink(l->path);
        rmdir(l->dir);
    }
}

/* Receives one datagram (2 s timeout) into buf as a string; returns its length. */
static int recv_msg(const listener *l, char *buf, size_t n) {
    struct pollfd p = {.fd = l->fd, .events = POLLIN};
    if (poll(&p, 1, 2000) != 1) FAIL_("no datagram on %s", l->path);
    ssize_t k = recv(l->fd, buf, n - 1, 0);
    ASSERT(k >= 0);
    buf[k] = '\0';
    return (int)k;
}

/* True when nothing is waiting on the socket. */
static int queue_empty(const listener *l) {
    struct pollfd p = {.fd = l->fd, .events = POLLIN};
    return poll(&p, 1, 0) == 0;
}

static void exercise(listener *l) {
    char buf[1024];
    ASSERT(dmn_notify_enabled());
    ASSERT_EQ(dmn_notify_ready(), D2_OK);
    recv_msg(l, buf, sizeof buf);
    ASSERT_STREQ(buf, "READY=1");
    ASSERT_EQ(dmn_notify_status("serving %s on port %d", "m", 8000), D2_OK);
    recv_msg(l, buf, sizeof buf);
    ASSERT_STREQ(buf, "STATUS=serving m on port 8000");
    ASSERT_EQ(dmn_notify_watchdog(), D2_OK);
    recv_msg(l, buf, sizeof buf);
    ASSERT_STREQ(buf, "WATCHDOG=1");

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ASSERT_EQ(dmn_notify_reloading(), D2_OK);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    recv_msg(l, buf, sizeof buf);
    ASSERT(strncmp(buf, "RELOADING=1\nMONOTONIC_USEC=", 27) == 0);
    unsigned long long us = strtoull(buf + 27, NULL, 10);
    unsigned long long lo = (unsigned long long)t0.tv_sec * 1000000ull + (unsigned long long)t0.tv_nsec / 1000ull;
    unsigned long long hi = (unsigned long long)t1.tv_sec * 1000000ull + (unsigned long long)t1.tv_nsec / 1000ull;
    ASSERT(us >= lo && us <= hi);

    ASSERT_EQ(dmn_notify_stopping(), D2_OK);
    recv_msg(l, buf, sizeof buf);
    ASSERT_STREQ(buf, "STOPPING=1");
    ASSERT_EQ(dmn_notify("READY=1\nSTATUS=multi"), D2_OK);
    recv_msg(l, buf, sizeof buf);
    ASSERT_STREQ(buf, "READY=1\nSTATUS=multi");
    ASSERT(queue_empty(l));
}

TEST(path_socket) {
    listener l;
    listen_path(&l);
    exercise(&l);
    listener_close(&l);
}

TEST(abstract_socket) {
    listener l;
    listen_abstract(&l);
    exercise(&l);
    listener_close(&l);
}

TEST(status_stays_one_line) {
    listener l;
    listen_path(&l);
    char buf[1024];
    ASSERT_EQ(dmn_notify_status("a\nWATCHDOG=1\r\nb"), D2_OK);
    recv_msg(&l, buf, sizeof buf);
    ASSERT_STREQ(buf, "STATUS=a WATCHDOG=1  b");
    /* A long status is cut, not overflowed. */
    char big[2000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    ASSERT_EQ(dmn_notify_status("%s", big), D2_OK);
    ASSERT_EQ(recv_msg(&l, buf, sizeof buf), 511);
    listener_close(&l);
}

TEST(unset_is_noop) {
    unsetenv("NOTIFY_SOCKET");
    ASSERT(!dmn_notify_enabled());
    ASSERT_EQ(dmn_notify_ready(), D2_OK);
    ASSERT_EQ(dmn_notify_stopping(), D2_OK);
    ASSERT_EQ(dmn_notify_reloading(), D2_OK);
    ASSERT_EQ(dmn_notify_status("x %d", 1), D2_OK);
    setenv("NOTIFY_SOCKET", "", 1);
    ASSERT(!dmn_notify_enabled());
    ASSERT_EQ(dmn_notify_watchdog(), D2_OK);
}

TEST(bad_addresses) {
    d2_log_set_level(D2_LOG_OFF); /* the errors below are expected */
    setenv("NOTIFY_SOCKET", "relative/path", 1);
    ASSERT_EQ(dmn_notify_ready(), D2_EINVAL);
    setenv("NOTIFY_SOCKET", "@", 1);
    ASSERT_EQ(dmn_notify_ready(), D2_EINVAL);
    setenv("NOTIFY_SOCKET", "vsock:2:1234", 1);
    ASSERT_EQ(dmn_notify_ready(), D2_EINVAL);
    char longp[200] = "/";
    memset(longp + 1, 'a', 150);
    longp[151] = '\0';
    setenv("NOTIFY_SOCKET", longp, 1);
    ASSERT_EQ(dmn_notify_ready(), D2_EINVAL);
    /* Nobody listening: the send fails with D2_EIO, nothing crashes. */
    setenv("NOTIFY_SOCKET", "/tmp/d2od-no-such-dir/notify.sock", 1);
    ASSERT_EQ(dmn_notify_ready(), D2_EIO);
    char ab[80];
    snprintf(ab, sizeof ab, "@d2od-test-nobody-%ld", (long)getpid());
    setenv("NOTIFY_SOCKET", ab, 1);
    ASSERT_EQ(dmn_notify_stopping(), D2_EIO);
    ASSERT_EQ(dmn_notify(NULL), D2_EINVAL);
}

TEST(watchdog_usec) {
    char pid[32];
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
    ASSERT_EQ(dmn_notify_watchdog_usec(), 0);
    setenv("WATCHDOG_USEC", "30000000", 1);
    ASSERT_EQ(dmn_notify_watchdog_usec(), 30000000);
    snprintf(pid, sizeof pid, "%ld", (long)getpid());
    setenv("WATCHDOG_PID", pid, 1);
    ASSERT_EQ(dmn_notify_watchdog_usec(), 30000000);
    snprintf(pid, sizeof pid, "%ld", (long)getpid() + 1);
    setenv("WATCHDOG_PID", pid, 1); /* meant for another process */
    ASSERT_EQ(dmn_notify_watchdog_usec(), 0);
    setenv("WATCHDOG_PID", "abc", 1);
    ASSERT_EQ(dmn_notify_watchdog_usec(), 0);
    setenv("WATCHDOG_PID", "", 1); /* empty counts as unset */
    ASSERT_EQ(dmn_notify_watchdog_usec(), 30000000);
    unsetenv("WATCHDOG_PID");
    const char *bad[] = {"0", "-5", "", "12x", " 5", "99999999999999999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        setenv("WATCHDOG_USEC", bad[i], 1);
        if (dmn_notify_watchdog_usec() != 0) FAIL_("WATCHDOG_USEC='%s' accepted", bad[i]);
    }
}
