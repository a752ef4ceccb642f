/* The Neural Engine bridge through the C ABI: compile a MIL program (a 1x1 convolution with
 * a weight blob, plus a second input added to it), write its inputs, evaluate, read the
 * output, and compare with the same arithmetic done here in double precision.
 *
 *   ./bridge [KIND]     KIND: 0 default (Neural Engine on macOS, simulator elsewhere),
 *                             1 simulator, 2 Neural Engine
 *
 * The program computes in fp16, so the comparison allows fp16 rounding. */
#include "common.h" /* anetrain.h, CHECK */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define C 32 /* channels in and out */
#define S 32 /* spatial positions */

/* y = conv(x, W) + b, x and b [1, C, 1, S], W [C, C, 1, 1] from weights/w.bin. */
static const char *MIL =
    "program(1.3)\n"
    "[buildInfo = dict<string, string>({})]\n"
    "{\n"
    "    func main<ios18>(tensor<fp16, [1, 32, 1, 32]> i0_x, tensor<fp16, [1, 32, 1, 32]> i1_b) {\n"
    "        tensor<int32, [2]> one = const()[name = string(\"one\"), val = tensor<int32, [2]>([1, 1])];\n"
    "        tensor<int32, [4]> pad = const()[name = string(\"pad\"), val = tensor<int32, [4]>([0, 0, 0, 0])];\n"
    "        int32 groups = const()[name = string(\"groups\"), val = int32(1)];\n"
    "        string valid = const()[name = string(\"valid\"), val = string(\"valid\")];\n"
    "        tensor<fp16, [32, 32, 1, 1]> w = const()[name = string(\"w\"), val = tensor<fp16, [32, 32, 1, 1]>"
    "(BLOBFILE(path = string(\"@model_path/weights/w.bin\"), offset = uint64(64)))];\n"
    "        tensor<fp16, [1, 32, 1, 32]> xw = conv(dilations = one, groups = groups, pad = pad, pad_type = valid, "
    "strides = one, weight = w, x = i0_x)[name = string(\"xw\")];\n"
    "        tensor<fp16, [1, 32, 1, 32]> y = add(x = xw, y = i1_b)[name = string(\"y\")];\n"
    "    } -> (y);\n"
    "}\n";

static uint32_t rng = 12345;
static float uniform(void) { /* in [-1, 1) */
    rng = rng * 1664525u + 1013904223u;
    return (float)((rng >> 8) & 0xFFFF) / 32768.0f - 1.0f;
}

int main(int argc, char **argv) {
    int kind = argc > 1 ? atoi(argv[1]) : ANETRAIN_BRIDGE_KIND_DEFAULT;
    AnetrainBridge bridge;
    CHECK(anetrain_bridge_open(kind, &bridge));
    int32_t used;
    CHECK(anetrain_bridge_kind(bridge, &used));
    printf("runtime: %s\n", used == ANETRAIN_BRIDGE_KIND_NEURAL_ENGINE ? "Neural Engine" : "MIL simulator (fp16)");

    static float w[C * C], x[C * S], b[C * S], y[C * S];
    static uint16_t y16[C * S];
    for (int i = 0; i < C * C; i++) w[i] = 0.25f * uniform();
    for (int i = 0; i < C * S; i++) x[i] = uniform();
    for (int i = 0; i < C * S; i++) b[i] = uniform();

    size_t blob_len = 0;
    CHECK(anetrain_bridge_weight_blob(w, C * C, NULL, 0, &blob_len));
    uint8_t *blob = malloc(blob_len);
    CHECK(anetrain_bridge_weight_blob(w, C * C, blob, blob_len, &blob_len));
    AnetrainWeight weights[1] = {{.name = "weights/w.bin", .data = blob, .len = blob_len}};

    size_t before = 0, after = 0;
    CHECK(anetrain_bridge_compile_count(bridge, &before));
    AnetrainProgram prog;
    CHECK(anetrain_bridge_compile(bridge, MIL, weights, 1, &prog));
    CHECK(anetrain_bridge_compile_count(bridge, &after));
    printf("compiles: %zu -> %zu\n", before, after);
    if (after != before + 1) return 1;

    size_t n_in, n_out, shape[4];
    CHECK(anetrain_program_io(prog, &n_in, &n_out));
    CHECK(anetrain_program_shape(prog, 1, 0, shape));
    printf("inputs %zu, outputs %zu, output shape [%zu, %zu, %zu, %zu]\n", n_in, n_out, shape[0], shape[1],
           shape[2], shape[3]);
    if (n_in != 2 || n_out != 1 || shape[1] != C || shape[3] != S) return 1;

    CHECK(anetrain_program_write_input(prog, 0, x, C * S));
    CHECK(anetrain_program_write_input(prog, 1, b, C * S));
    CHECK(anetrain_program_eval(prog));
    CHECK(anetrain_program_read_output(prog, 0, y, C * S));
    CHECK(anetrain_program_read_output_fp16(prog, 0, y16, C * S));

    /* y[o, s] = sum_i W[o, i] x[i, s] + b[o, s]; fp16 keeps about 3 decimal digits. */
    double worst = 0;
    for (int o = 0; o < C; o++) {
        for (int s = 0; s < S; s++) {
            double ref = b[o * S + s], mag = fabs(b[o * S + s]);
            for (int i = 0; i < C; i++) {
                ref += (double)w[o * C + i] * x[i * S + s];
                mag += fabs((double)w[o * C + i] * x[i * S + s]);
            }
            double err = fabs(y[o * S + s] - ref) / (mag + 1e-3);
            if (err > worst) worst = err;
        }
    }
    printf("largest error relative to the sum of magnitudes: %.2e\n", worst);
    if (!(worst < 4e-3)) {
        fprintf(stderr, "the output differs from the reference by more than fp16 rounding\n");
        return 1;
    }
    /* The fp16 read gives the same values as the float read. */
    for (int i = 0; i < C * S; i++) {
        uint16_t h = y16[i];
        int e = (h >> 10) & 0x1F, m = h & 0x3FF;
        double v = e == 0 ? ldexp(m, -24) : ldexp(m + 1024, e - 25);
        if (h & 0x8000) v = -v;
        if (v != y[i]) {
            fprintf(stderr, "fp16 output %d is %g, the float read gave %g\n", i, v, y[i]);
            return 1;
        }
    }
    /* A second evaluation with new inputs. */
    for (int i = 0; i < C * S; i++) b[i] = 0;
    CHECK(anetrain_program_write_input(prog, 1, b, C * S));
    CHECK(anetrain_program_eval(prog));
    float y2[C * S];
    CHECK(anetrain_program_read_output(prog, 0, y2, C * S));
    double ref0 = 0;
    for (int i = 0; i < C; i++) ref0 += (double)w[i] * x[i * S];
    printf("y[0, 0] without the bias: %.4f (reference %.4f)\n", y2[0], ref0);
    if (fabs(y2[0] - ref0) > 0.02) return 1;

    CHECK(anetrain_program_free(prog));
    CHECK(anetrain_bridge_free(bridge));
    free(blob);
    printf("bridge example: ok\n");
    return 0;
}
