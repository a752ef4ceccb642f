/* Generate text from a model through the C ABI, streaming each token through a callback.
 *
 *   cc -Iinclude examples/c/generate.c -Ltarget/release -lanetrain_capi -o generate
 *   LD_LIBRARY_PATH=target/release ./generate MODEL "Once upon a time" [MAX_NEW]
 *
 * Prints the model's shape, the streamed text, then `ids:` with the generated ids, and
 * checks that a callback returning non-zero stops generation after that token. */
#include "common.h" /* anetrain.h, CHECK */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct stream {
    uint32_t ids[4096];
    size_t n;
    size_t stop_after; /* 0: never stop */
    char text[65536];
    size_t text_len;
};

static int32_t on_token(uint32_t token, const char *piece, void *user) {
    struct stream *s = user;
    if (s->n < sizeof s->ids / sizeof s->ids[0]) s->ids[s->n] = token;
    s->n++;
    if (piece != NULL) {
        size_t len = strlen(piece);
        if (s->text_len + len < sizeof s->text) {
            memcpy(s->text + s->text_len, piece, len + 1);
            s->text_len += len;
        }
        fputs(piece, stdout);
        fflush(stdout);
    }
    return s->stop_after != 0 && s->n >= s->stop_after;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL PROMPT [MAX_NEW]\n", argv[0]);
        return 2;
    }
    size_t max_new = argc > 3 ? (size_t)strtoul(argv[3], NULL, 10) : 32;
    printf("anetrain %s (ABI %u)\n", anetrain_version(), anetrain_abi_version());
    if (anetrain_abi_version() != ANETRAIN_ABI_VERSION) {
        fprintf(stderr, "header and library disagree on the ABI version\n");
        return 1;
    }

    AnetrainModel model;
    CHECK(anetrain_model_open(argv[1], &model));
    AnetrainModelInfo info;
    CHECK(anetrain_model_info(model, &info));
    printf("model: V=%zu C=%zu L=%zu positions=%zu params=%zu tokenizer=%d bos=%lld eos=%lld\n", info.vocab_size,
           info.dim, info.n_layers, info.max_seq_len, info.param_count, (int)info.has_tokenizer,
           (long long)info.bos, (long long)info.eos);

    /* Ask for the count first, then tokenize into a buffer of that size. */
    size_t n_prompt = 0;
    CHECK(anetrain_tokenize(model, argv[2], 1, NULL, 0, &n_prompt));
    uint32_t *prompt = malloc(n_prompt * sizeof *prompt);
    CHECK(anetrain_tokenize(model, argv[2], 1, prompt, n_prompt, &n_prompt));
    printf("prompt: %zu tokens\n", n_prompt);

    static struct stream s; /* zeroed */
    size_t produced = 0;
    printf("text: ");
    CHECK(anetrain_generate(model, prompt, n_prompt, max_new, NULL, on_token, &s, &produced));
    printf("\n");
    if (produced != s.n) {
        fprintf(stderr, "generate reported %zu tokens, the callback saw %zu\n", produced, s.n);
        return 1;
    }
    printf("ids:");
    for (size_t i = 0; i < s.n; i++) printf(" %u", s.ids[i]);
    printf("\n");

    /* The streamed pieces add up to the decoding of all ids. */
    size_t len = 0;
    CHECK(anetrain_detokenize(model, s.ids, s.n, NULL, 0, &len));
    char *text = malloc(len + 1);
    CHECK(anetrain_detokenize(model, s.ids, s.n, text, len + 1, &len));
    if (strcmp(text, s.text) != 0) {
        fprintf(stderr, "streamed text %s differs from the decoded %s\n", s.text, text);
        return 1;
    }

    /* A callback that returns non-zero stops generation after its token. */
    static struct stream t;
    t.stop_after = 3;
    AnetrainSampling sampling = {.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .seed = 7};
    printf("sampled: ");
    CHECK(anetrain_generate(model, prompt, n_prompt, max_new, &sampling, on_token, &t, &produced));
    printf("\n");
    if (produced != 3 || t.n != 3) {
        fprintf(stderr, "the callback asked to stop after 3 tokens; got %zu\n", produced);
        return 1;
    }
    printf("stopped after %zu tokens\n", produced);

    free(text);
    free(prompt);
    CHECK(anetrain_model_free(model));
    printf("generate example: ok\n");
    return 0;
}
