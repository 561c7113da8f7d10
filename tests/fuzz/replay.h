/*
 * tests/fuzz/replay.h — the standalone replay main() shared by every fuzz
 * target: include it at the end of a target. Without -DD2_FUZZ_STANDALONE it
 * adds nothing (libFuzzer supplies main). With it, the binary runs the target
 * once on each file named on the command line, from an exact-size copy so
 * ASan sees any read past the end, and prints one line per file.
 */
#ifdef D2_FUZZ_STANDALONE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/status.h"
#include "common/util.h"

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        char *buf = NULL;
        size_t len = 0;
        if (d2_read_file(argv[i], &buf, &len) != D2_OK) {
            fprintf(stderr, "cannot read %s\n", argv[i]);
            return 1;
        }
        uint8_t *copy = malloc(len ? len : 1);
        if (!copy) return 1;
        memcpy(copy, buf, len);
        free(buf);
        LLVMFuzzerTestOneInput(copy, len);
        free(copy);
        printf("ok %s\n", argv[i]);
    }
    return 0;
}
#endif
