/*
 * daemon/notify.h — systemd service notification (sd_notify protocol) without
 * libsystemd.
 *
 * With Type=notify, systemd passes $NOTIFY_SOCKET: an AF_UNIX datagram socket,
 * either a filesystem path ("/run/systemd/notify") or an abstract name written
 * with a leading '@'. Each call sends one datagram of newline-separated
 * "KEY=VALUE" assignments. When NOTIFY_SOCKET is unset or empty (not started by
 * systemd, or tests) every call is a successful no-op, so callers never need
 * to check whether they run under systemd.
 *
 * The daemon's sequence: READY=1 once the model is loaded and the socket
 * listens; STATUS=... whenever useful; WATCHDOG=1 every watchdog_usec/2 from
 * the thread that proves liveness (the scheduler loop); RELOADING=1 (with
 * MONOTONIC_USEC, as systemd 253+ requires for Type=notify-reload) at SIGHUP,
 * then READY=1 when the reload is done; STOPPING=1 when draining starts.
 *
 * Thread-safe: each call opens, uses and closes its own socket and only reads
 * the environment. Callers: daemon/ only.
 */
#ifndef D2_DAEMON_NOTIFY_H
#define D2_DAEMON_NOTIFY_H

#include <stdint.h>

/* Sends state (e.g. "READY=1\nSTATUS=serving"). D2_OK also when
 * NOTIFY_SOCKET is unset; D2_EINVAL for a NOTIFY_SOCKET that is neither an
 * absolute path nor '@name' (or too long); D2_EIO when the send fails. */
int dmn_notify(const char *state);

/* printf-style STATUS=... (the text shown by "systemctl status"). */
int dmn_notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

int dmn_notify_ready(void);     /* READY=1 */
int dmn_notify_watchdog(void);  /* WATCHDOG=1 */
int dmn_notify_stopping(void);  /* STOPPING=1 */
int dmn_notify_reloading(void); /* RELOADING=1 + MONOTONIC_USEC=<CLOCK_MONOTONIC in us> */

/* True when NOTIFY_SOCKET is set (non-empty). */
int dmn_notify_enabled(void);

/* The watchdog interval systemd expects pings within, in microseconds: the
 * value of WATCHDOG_USEC, or 0 when the watchdog is off — WATCHDOG_USEC unset
 * or not a positive integer, or WATCHDOG_PID set to a pid other than ours
 * (then the variables were meant for a parent process). Ping every half of it. */
uint64_t dmn_notify_watchdog_usec(void);

#endif
