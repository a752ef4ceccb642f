/* Train a model through the C ABI: a few updates on caller-supplied tokens, then a
 * checkpoint that `anetrain generate --model DIR` and anetrain_model_open read.
 *
 *   ./train MODEL CKPT_DIR
 *
 * MODEL must have a tokenizer (the tokens come from tokenizing a short text). Exits non-zero
 * unless the loss on the training batch falls and the saved checkpoint gives the trained
 * model's loss. */
#include "common.h" /* anetrain.h, CHECK */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define B 2
#define T 16

static const char *TEXT =
    "Once upon a time there was a little fox who liked to run in the forest. "
    "Every day the fox ran to the river and drank the cold water. "
    "One day the fox met a bear, and the bear said hello to the fox.";

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL CKPT_DIR\n", argv[0]);
        return 2;
    }
    AnetrainModel model;
    CHECK(anetrain_model_open(argv[1], &model));

    /* B rows of T + 1 tokens from the text. */
    uint32_t ids[1024];
    size_t n = 0;
    CHECK(anetrain_tokenize(model, TEXT, 1, ids, sizeof ids / sizeof ids[0], &n));
    if (n < B * (T + 1)) {
        fprintf(stderr, "the text gives only %zu tokens\n", n);
        return 1;
    }
    uint32_t batch[B * (T + 1)];
    for (size_t i = 0; i < B * (T + 1); i++) batch[i] = ids[i];

    AnetrainTrainerConfig cfg;
    CHECK(anetrain_trainer_config_default(&cfg));
    cfg.batch = B;
    cfg.seq = T;
    cfg.lr = 3e-3;
    cfg.min_lr = 3e-3;
    cfg.steps = 8;
    cfg.seed = 3;
    AnetrainTrainer trainer;
    CHECK(anetrain_trainer_from_model(model, &cfg, &trainer));

    double first = 0, last = 0;
    for (int step = 0; step < 8; step++) {
        double loss;
        CHECK(anetrain_trainer_update(trainer, batch, B * (T + 1), &loss));
        printf("update %d: loss %.4f\n", step + 1, loss);
        if (step == 0) first = loss;
        last = loss;
    }
    size_t steps = 0;
    CHECK(anetrain_trainer_steps(trainer, &steps));
    if (steps != 8 || !(last < first - 0.1)) {
        fprintf(stderr, "after %zu updates the loss went from %.4f to %.4f\n", steps, first, last);
        return 1;
    }
    CHECK(anetrain_trainer_save(trainer, argv[2]));
    printf("saved %s\n", argv[2]);

    /* The checkpoint holds the trained weights: its loss on the batch is below the
     * original model's. Row 0 is scored as one window of T. */
    AnetrainModel trained;
    CHECK(anetrain_model_open(argv[2], &trained));
    double before, after;
    CHECK(anetrain_model_loss(model, batch, T + 1, T, &before));
    CHECK(anetrain_model_loss(trained, batch, T + 1, T, &after));
    printf("loss on row 0: %.4f before, %.4f after training\n", before, after);
    if (!(after < before - 0.1) || !isfinite(after)) {
        fprintf(stderr, "the checkpoint does not hold the trained weights\n");
        return 1;
    }

    /* A trainer from a preset starts from seeded random weights. */
    AnetrainTrainer fresh;
    cfg.batch = 1;
    cfg.seq = 8;
    CHECK(anetrain_trainer_from_preset("stories260k", &cfg, &fresh));
    uint32_t row[9] = {1, 5, 9, 13, 17, 21, 25, 29, 33};
    double loss;
    CHECK(anetrain_trainer_update(fresh, row, 9, &loss));
    printf("stories260k from scratch: loss %.4f (ln 512 = %.4f)\n", loss, log(512.0));
    if (fabs(loss - log(512.0)) > 0.5) {
        fprintf(stderr, "a freshly initialised model should start near ln V\n");
        return 1;
    }

    CHECK(anetrain_trainer_free(fresh));
    CHECK(anetrain_trainer_free(trainer));
    CHECK(anetrain_model_free(trained));
    CHECK(anetrain_model_free(model));
    printf("train example: ok\n");
    return 0;
}
