/* Every misuse the C ABI can detect returns its documented status with a message, and
 * never crashes: NULL pointers, wrong lengths, freed, never-issued and wrong-kind handles,
 * bad paths, bad text, bad programs, and a callback re-entering the model it generates with.
 *
 *   ./bad_input MODEL SCRATCH_DIR
 *
 * Prints one line per case; exits non-zero if any case returns another status or leaves
 * anetrain_last_error() empty. */
#include "anetrain.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

static void expect(const char *what, AnetrainStatus got, AnetrainStatus want) {
    const char *msg = anetrain_last_error();
    int ok = got == want && msg != NULL && msg[0] != '\0';
    printf("%s %-44s %s: %s\n", ok ? "ok  " : "FAIL", what, anetrain_status_name(got), msg ? msg : "(NULL)");
    if (!ok) {
        if (got != want) printf("     expected %s\n", anetrain_status_name(want));
        failures++;
    }
}

static void must(const char *what, AnetrainStatus got) {
    if (got != ANETRAIN_STATUS_OK) {
        printf("FAIL %s: %s: %s\n", what, anetrain_status_name(got), anetrain_last_error());
        exit(1);
    }
    if (anetrain_last_error()[0] != '\0') {
        printf("FAIL %s succeeded but left a last error\n", what);
        exit(1);
    }
}

static AnetrainModel reentered;
static AnetrainStatus inner = ANETRAIN_STATUS_OK;
static int32_t reenter(uint32_t token, const char *piece, void *user) {
    (void)token, (void)piece, (void)user;
    AnetrainModelInfo info;
    inner = anetrain_model_info(reentered, &info);
    return 1;
}

static const char *MIL =
    "program(1.3)\n[buildInfo = dict<string, string>({})]\n{\n"
    "    func main<ios18>(tensor<fp16, [1, 1, 1, 16]> i0_x) {\n"
    "        tensor<fp16, [1, 1, 1, 16]> y = add(x = i0_x, y = i0_x)[name = string(\"y\")];\n"
    "    } -> (y);\n}\n";

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    char path[4096];
    AnetrainModel m = {0}, model;
    AnetrainModelInfo info;
    uint32_t ids[8];
    size_t n = 0;

    /* Opening models */
    expect("model_open(NULL path)", anetrain_model_open(NULL, &m), ANETRAIN_STATUS_NULL_POINTER);
    expect("model_open(NULL out)", anetrain_model_open(argv[1], NULL), ANETRAIN_STATUS_NULL_POINTER);
    snprintf(path, sizeof path, "%s/no-such-model.gguf", argv[2]);
    expect("model_open(missing file)", anetrain_model_open(path, &m), ANETRAIN_STATUS_IO);
    if (m.id != 0) printf("FAIL a failed open left a non-zero handle\n"), failures++;
    snprintf(path, sizeof path, "%s/garbage.gguf", argv[2]);
    FILE *f = fopen(path, "wb");
    fputs("this is not a GGUF file", f);
    fclose(f);
    expect("model_open(corrupt .gguf)", anetrain_model_open(path, &m), ANETRAIN_STATUS_IO);
    expect("model_open(invalid UTF-8 path)", anetrain_model_open("\xff\xfe", &m), ANETRAIN_STATUS_BAD_ARGUMENT);

    must("model_open", anetrain_model_open(argv[1], &model));

    /* Handles */
    AnetrainModel bogus = {123456789}, zero = {0};
    expect("model_info(never-issued handle)", anetrain_model_info(bogus, &info), ANETRAIN_STATUS_BAD_HANDLE);
    expect("model_info(zero handle)", anetrain_model_info(zero, &info), ANETRAIN_STATUS_BAD_HANDLE);
    expect("model_info(NULL out)", anetrain_model_info(model, NULL), ANETRAIN_STATUS_NULL_POINTER);
    AnetrainModel doomed;
    must("model_open", anetrain_model_open(argv[1], &doomed));
    must("model_free", anetrain_model_free(doomed));
    expect("model_info(freed handle)", anetrain_model_info(doomed, &info), ANETRAIN_STATUS_BAD_HANDLE);
    expect("tokenize(freed handle)", anetrain_tokenize(doomed, "hi", 0, ids, 8, &n), ANETRAIN_STATUS_BAD_HANDLE);
    expect("model_free(freed handle, twice)", anetrain_model_free(doomed), ANETRAIN_STATUS_BAD_HANDLE);

    /* Lengths and values */
    expect("tokenize(NULL text)", anetrain_tokenize(model, NULL, 0, ids, 8, &n), ANETRAIN_STATUS_NULL_POINTER);
    expect("tokenize(invalid UTF-8)", anetrain_tokenize(model, "\xc3\x28", 0, ids, 8, &n),
           ANETRAIN_STATUS_BAD_ARGUMENT);
    expect("tokenize(buffer too small)",
           anetrain_tokenize(model, "a long sentence of many many words to tokenize", 1, ids, 2, &n),
           ANETRAIN_STATUS_BAD_LENGTH);
    if (n <= 2) printf("FAIL tokenize did not report the length it needs (%zu)\n", n), failures++;
    expect("tokenize(NULL ids, cap 5)", anetrain_tokenize(model, "hi", 0, NULL, 5, &n), ANETRAIN_STATUS_NULL_POINTER);
    uint32_t huge[2] = {1, 4000000000u};
    char buf[64];
    expect("detokenize(id outside the vocabulary)", anetrain_detokenize(model, huge, 2, buf, 64, &n),
           ANETRAIN_STATUS_BAD_ARGUMENT);
    expect("detokenize(NULL ids, n 3)", anetrain_detokenize(model, NULL, 3, buf, 64, &n),
           ANETRAIN_STATUS_NULL_POINTER);
    uint32_t word[3] = {40, 41, 42};
    expect("detokenize(text buffer too small)", anetrain_detokenize(model, word, 3, buf, 1, &n),
           ANETRAIN_STATUS_BAD_LENGTH);
    expect("generate(NULL prompt, n 4)", anetrain_generate(model, NULL, 4, 4, NULL, NULL, NULL, NULL),
           ANETRAIN_STATUS_NULL_POINTER);
    expect("generate(empty prompt)", anetrain_generate(model, word, 0, 4, NULL, NULL, NULL, NULL),
           ANETRAIN_STATUS_BAD_ARGUMENT);
    expect("generate(id outside the vocabulary)", anetrain_generate(model, huge, 2, 4, NULL, NULL, NULL, NULL),
           ANETRAIN_STATUS_BAD_ARGUMENT);
    AnetrainSampling nan_temp = {.temperature = 0.0f / 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 1};
    expect("generate(NaN temperature)", anetrain_generate(model, word, 3, 4, &nan_temp, NULL, NULL, NULL),
           ANETRAIN_STATUS_BAD_ARGUMENT);
    expect("model_loss(one token)", anetrain_model_loss(model, word, 1, 0, (double[1]){0}),
           ANETRAIN_STATUS_BAD_LENGTH);
    reentered = model;
    must("generate(re-entering callback)", anetrain_generate(model, word, 3, 4, NULL, reenter, NULL, &n));
    printf("%s a callback calling back into its model: %s\n", inner == ANETRAIN_STATUS_BUSY ? "ok  " : "FAIL",
           anetrain_status_name(inner));
    if (inner != ANETRAIN_STATUS_BUSY) failures++;

    /* Trainers */
    AnetrainTrainerConfig cfg;
    must("trainer_config_default", anetrain_trainer_config_default(&cfg));
    cfg.batch = 1;
    cfg.seq = 4;
    AnetrainTrainer tr;
    expect("trainer_from_preset(unknown)", anetrain_trainer_from_preset("no-such-preset", &cfg, &tr),
           ANETRAIN_STATUS_BAD_ARGUMENT);
    expect("trainer_from_preset(NULL config)", anetrain_trainer_from_preset("stories260k", NULL, &tr),
           ANETRAIN_STATUS_NULL_POINTER);
    cfg.lr = -1;
    expect("trainer_from_model(negative lr)", anetrain_trainer_from_model(model, &cfg, &tr),
           ANETRAIN_STATUS_BAD_ARGUMENT);
    cfg.lr = 1e-3;
    cfg.min_lr = 1e-3;
    cfg.seq = 1u << 20;
    expect("trainer_from_model(seq past the model)", anetrain_trainer_from_model(model, &cfg, &tr),
           ANETRAIN_STATUS_BAD_ARGUMENT);
    cfg.seq = 4;
    must("trainer_from_model", anetrain_trainer_from_model(model, &cfg, &tr));
    AnetrainModel as_model = {tr.id};
    expect("model_info(a trainer's handle)", anetrain_model_info(as_model, &info), ANETRAIN_STATUS_BAD_HANDLE);
    expect("trainer_save(before any update)", anetrain_trainer_save(tr, argv[2]), ANETRAIN_STATUS_BAD_ARGUMENT);
    uint32_t row[5] = {1, 2, 3, 4, 5};
    expect("trainer_update(4 tokens, needs 5)", anetrain_trainer_update(tr, row, 4, NULL), ANETRAIN_STATUS_BAD_LENGTH);
    expect("trainer_update(NULL tokens)", anetrain_trainer_update(tr, NULL, 5, NULL), ANETRAIN_STATUS_NULL_POINTER);
    row[2] = 4000000000u;
    expect("trainer_update(id outside the vocabulary)", anetrain_trainer_update(tr, row, 5, NULL),
           ANETRAIN_STATUS_BAD_ARGUMENT);
    row[2] = 3;
    must("trainer_update", anetrain_trainer_update(tr, row, 5, NULL));
    expect("trainer_save(a path under a file)", anetrain_trainer_save(tr, path /* garbage.gguf */),
           ANETRAIN_STATUS_IO);
    must("trainer_free", anetrain_trainer_free(tr));
    expect("trainer_update(freed trainer)", anetrain_trainer_update(tr, row, 5, NULL), ANETRAIN_STATUS_BAD_HANDLE);
    expect("trainer_free(freed trainer, twice)", anetrain_trainer_free(tr), ANETRAIN_STATUS_BAD_HANDLE);

    /* The bridge */
    AnetrainBridge br;
    expect("bridge_open(kind 7)", anetrain_bridge_open(7, &br), ANETRAIN_STATUS_BAD_ARGUMENT);
#ifndef __APPLE__
    expect("bridge_open(Neural Engine off macOS)", anetrain_bridge_open(ANETRAIN_BRIDGE_KIND_NEURAL_ENGINE, &br),
           ANETRAIN_STATUS_FAILED);
#endif
    must("bridge_open", anetrain_bridge_open(ANETRAIN_BRIDGE_KIND_SIMULATOR, &br));
    AnetrainProgram p;
    expect("bridge_compile(not MIL)", anetrain_bridge_compile(br, "hello", NULL, 0, &p), ANETRAIN_STATUS_BAD_ARGUMENT);
    expect("bridge_compile(NULL weights, n 2)", anetrain_bridge_compile(br, MIL, NULL, 2, &p),
           ANETRAIN_STATUS_NULL_POINTER);
    AnetrainWeight up = {.name = "../w.bin", .data = (const uint8_t *)"x", .len = 1};
    expect("bridge_compile(weight path with ..)", anetrain_bridge_compile(br, MIL, &up, 1, &p),
           ANETRAIN_STATUS_FAILED);
    must("bridge_compile", anetrain_bridge_compile(br, MIL, NULL, 0, &p));
    float x[16] = {0}, y[16];
    expect("program_write_input(15 values, needs 16)", anetrain_program_write_input(p, 0, x, 15),
           ANETRAIN_STATUS_BAD_LENGTH);
    expect("program_write_input(input 1 of 1)", anetrain_program_write_input(p, 1, x, 16),
           ANETRAIN_STATUS_BAD_ARGUMENT);
    expect("program_read_output(NULL data)", anetrain_program_read_output(p, 0, NULL, 16),
           ANETRAIN_STATUS_NULL_POINTER);
    AnetrainProgram as_program = {br.id};
    expect("program_eval(a bridge's handle)", anetrain_program_eval(as_program), ANETRAIN_STATUS_BAD_HANDLE);
    must("program_free", anetrain_program_free(p));
    expect("program_eval(freed program)", anetrain_program_eval(p), ANETRAIN_STATUS_BAD_HANDLE);
    expect("program_read_output(freed program)", anetrain_program_read_output(p, 0, y, 16),
           ANETRAIN_STATUS_BAD_HANDLE);
    expect("bridge_weight_blob(0 values)", anetrain_bridge_weight_blob(x, 0, NULL, 0, &n), ANETRAIN_STATUS_BAD_LENGTH);
    must("bridge_free", anetrain_bridge_free(br));
    expect("bridge_compile(freed bridge)", anetrain_bridge_compile(br, MIL, NULL, 0, &p), ANETRAIN_STATUS_BAD_HANDLE);

    if (strcmp(anetrain_status_name(99), "unknown status") != 0) printf("FAIL status_name(99)\n"), failures++;
    must("model_free", anetrain_model_free(model));
    printf("%d failures\n", failures);
    if (failures == 0) printf("bad input example: ok\n");
    return failures == 0 ? 0 : 1;
}
