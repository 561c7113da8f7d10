/* common/status.c — names and messages generated from D2_STATUS_MAP. */
#include "status.h"

#include <stdio.h>
#include <stdlib.h>

const char *d2_status_name(int status) {
    switch (status) {
#define D2_STATUS_NAME_(name, val, msg) case val: return "D2_" #name;
        D2_STATUS_MAP(D2_STATUS_NAME_)
#undef D2_STATUS_NAME_
    }
    return "D2_UNKNOWN";
}

const char *d2_strerror(int status) {
    switch (status) {
#define D2_STATUS_MSG_(name, val, msg) case val: return msg;
        D2_STATUS_MAP(D2_STATUS_MSG_)
#undef D2_STATUS_MSG_
    }
    return "unknown status";
}

void d2_assert_fail(const char *expr, const char *file, int line, const char *func) {
    fprintf(stderr, "d2od: assertion failed: %s at %s:%d in %s()\n", expr, file, line, func);
    fflush(stderr);
    abort();
}
