/* util.c - error reporting shared by engine/. */
#include "util.h"

#include <stdarg.h>
#include <stdio.h>

int cm_err_set(cm_err *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        err->code = code;
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}
