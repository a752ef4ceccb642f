/* What the C examples share: CHECK(call) runs an anetrain call and, unless it returns
 * ANETRAIN_STATUS_OK, prints the call, its status name and anetrain_last_error() to stderr
 * and exits with status 1.
 *
 * Included as "common.h", so the compiler finds it next to the including file: the examples
 * build with only `-Iinclude` (for anetrain.h), from any directory. */
#ifndef ANETRAIN_EXAMPLES_COMMON_H
#define ANETRAIN_EXAMPLES_COMMON_H

#include "anetrain.h"

#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                                          \
    do {                                                                                     \
        AnetrainStatus s_ = (call);                                                          \
        if (s_ != ANETRAIN_STATUS_OK) {                                                      \
            fprintf(stderr, "%s failed: %s: %s\n", #call, anetrain_status_name(s_),          \
                    anetrain_last_error());                                                  \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

#endif
