/*
 * common/status.h — the one status space of d2od.
 *
 * Every function that can fail returns a d2_status: 0 is success, negative
 * values are errors. Functions that count return the count (>= 0) or an error.
 * The single list D2_STATUS_MAP generates the enum, d2_status_name() and
 * d2_strerror(); add a code here, nowhere else. The API layer maps codes to
 * HTTP statuses (see api/), so back-pressure has codes of its own.
 *
 * Leaf module: may be included from every folder. Thread-safe (pure functions).
 */
#ifndef D2_COMMON_STATUS_H
#define D2_COMMON_STATUS_H

#define D2_STATUS_MAP(XX)                                                      \
    XX(OK, 0, "success")                                                       \
    XX(EINVAL, -1, "invalid argument")                                         \
    XX(ENOMEM, -2, "out of memory")                                            \
    XX(EIO, -3, "input/output error")                                          \
    XX(ENOENT, -4, "no such file or directory")                                \
    XX(EFORMAT, -5, "malformed or corrupt file")                               \
    XX(EUNSUPPORTED, -6, "unsupported feature, architecture or dtype")         \
    XX(ESHAPE, -7, "tensor shape mismatch")                                    \
    XX(EKVFULL, -8, "KV cache pool has no free page")                          \
    XX(EQUEUEFULL, -9, "request queue is full")                                \
    XX(ERANGE, -10, "value out of range")                                      \
    XX(ETOOLONG, -11, "input longer than the context")                         \
    XX(EAGAIN, -12, "try again")                                               \
    XX(ECANCELED, -13, "operation canceled")                                   \
    XX(ECUDA, -14, "CUDA error")                                               \
    XX(EJSON, -15, "malformed JSON")                                           \
    XX(EUTF8, -16, "invalid UTF-8")                                            \
    XX(ECONFIG, -17, "invalid configuration")                                  \
    XX(EAUTH, -18, "missing or invalid API key")                               \
    XX(ENOTFOUND, -19, "not found")                                            \
    XX(EINTERNAL, -20, "internal error")                                      \
    XX(EADDRINUSE, -21, "address already in use")                              \
    XX(EISDIR, -22, "is a directory")

typedef enum d2_status {
#define D2_STATUS_ENUM_(name, val, msg) D2_##name = (val),
    D2_STATUS_MAP(D2_STATUS_ENUM_)
#undef D2_STATUS_ENUM_
} d2_status;

/* "D2_EINVAL" style name; "D2_UNKNOWN" for a value not in the list. */
const char *d2_status_name(int status);
/* Human-readable message; "unknown status" for a value not in the list. */
const char *d2_strerror(int status);

/* Fatal programmer error: logs the expression, file and line, then aborts.
 * Not for conditions that outside input can cause (those return a status). */
#define D2_ASSERT(x)                                                           \
    do {                                                                       \
        if (!(x)) d2_assert_fail(#x, __FILE__, __LINE__, __func__);            \
    } while (0)
_Noreturn void d2_assert_fail(const char *expr, const char *file, int line,
                              const char *func);

#endif
