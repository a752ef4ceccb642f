"""The anetrain C ABI from Python through ctypes: generate with a streaming callback, train a
few updates and save a checkpoint, run a MIL program through the Neural Engine bridge (the
fp16 simulator off macOS), and see misuse come back as status codes.

    python3 examples/python/anetrain_demo.py target/release/libanetrain_capi.so MODEL SCRATCH_DIR

MODEL is any model anetrain reads that has a tokenizer. Exits non-zero on any failure.
"""

import ctypes as C
import math
import os
import sys

# AnetrainStatus values (include/anetrain.h); checked against anetrain_status_name below.
OK, NULL_POINTER, BAD_LENGTH, BAD_HANDLE, BAD_ARGUMENT = 0, 1, 2, 3, 4
BRIDGE_KIND_SIMULATOR = 1


class Handle(C.Structure):
    _fields_ = [("id", C.c_uint64)]


class ModelInfo(C.Structure):
    _fields_ = [
        ("vocab_size", C.c_size_t),
        ("dim", C.c_size_t),
        ("n_layers", C.c_size_t),
        ("max_seq_len", C.c_size_t),
        ("param_count", C.c_size_t),
        ("has_tokenizer", C.c_bool),
        ("bos", C.c_int64),
        ("eos", C.c_int64),
    ]


class Sampling(C.Structure):
    _fields_ = [("temperature", C.c_float), ("top_k", C.c_size_t), ("top_p", C.c_float), ("seed", C.c_uint64)]


class TrainerConfig(C.Structure):
    _fields_ = [
        ("batch", C.c_size_t),
        ("seq", C.c_size_t),
        ("lr", C.c_double),
        ("min_lr", C.c_double),
        ("warmup", C.c_size_t),
        ("steps", C.c_size_t),
        ("weight_decay", C.c_double),
        ("grad_clip", C.c_double),
        ("seed", C.c_uint64),
    ]


class Weight(C.Structure):
    _fields_ = [("name", C.c_char_p), ("data", C.POINTER(C.c_uint8)), ("len", C.c_size_t)]


TOKEN_CALLBACK = C.CFUNCTYPE(C.c_int32, C.c_uint32, C.c_char_p, C.c_void_p)


class AnetrainError(Exception):
    def __init__(self, status, message):
        super().__init__(f"{status}: {message}")
        self.status = status


def load(path):
    lib = C.CDLL(path)
    P, S = C.POINTER, C.c_size_t
    sigs = {
        "anetrain_version": ([], C.c_char_p),
        "anetrain_last_error": ([], C.c_char_p),
        "anetrain_status_name": ([C.c_int32], C.c_char_p),
        "anetrain_model_open": ([C.c_char_p, P(Handle)], C.c_int),
        "anetrain_model_free": ([Handle], C.c_int),
        "anetrain_model_info": ([Handle, P(ModelInfo)], C.c_int),
        "anetrain_tokenize": ([Handle, C.c_char_p, C.c_int32, P(C.c_uint32), S, P(S)], C.c_int),
        "anetrain_detokenize": ([Handle, P(C.c_uint32), S, C.c_char_p, S, P(S)], C.c_int),
        "anetrain_generate": (
            [Handle, P(C.c_uint32), S, S, P(Sampling), TOKEN_CALLBACK, C.c_void_p, P(S)],
            C.c_int,
        ),
        "anetrain_model_loss": ([Handle, P(C.c_uint32), S, S, P(C.c_double)], C.c_int),
        "anetrain_trainer_config_default": ([P(TrainerConfig)], C.c_int),
        "anetrain_trainer_from_model": ([Handle, P(TrainerConfig), P(Handle)], C.c_int),
        "anetrain_trainer_update": ([Handle, P(C.c_uint32), S, P(C.c_double)], C.c_int),
        "anetrain_trainer_save": ([Handle, C.c_char_p], C.c_int),
        "anetrain_trainer_free": ([Handle], C.c_int),
        "anetrain_bridge_open": ([C.c_int32, P(Handle)], C.c_int),
        "anetrain_bridge_free": ([Handle], C.c_int),
        "anetrain_bridge_compile_count": ([Handle, P(S)], C.c_int),
        "anetrain_bridge_compile": ([Handle, C.c_char_p, P(Weight), S, P(Handle)], C.c_int),
        "anetrain_bridge_weight_blob": ([P(C.c_float), S, P(C.c_uint8), S, P(S)], C.c_int),
        "anetrain_program_free": ([Handle], C.c_int),
        "anetrain_program_write_input": ([Handle, S, P(C.c_float), S], C.c_int),
        "anetrain_program_eval": ([Handle], C.c_int),
        "anetrain_program_read_output": ([Handle, S, P(C.c_float), S], C.c_int),
    }
    for name, (args, res) in sigs.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = args, res
    for code, name in [(OK, "OK"), (NULL_POINTER, "NULL_POINTER"), (BAD_LENGTH, "BAD_LENGTH"),
                       (BAD_HANDLE, "BAD_HANDLE"), (BAD_ARGUMENT, "BAD_ARGUMENT")]:
        assert lib.anetrain_status_name(code).decode() == "ANETRAIN_STATUS_" + name, name
    return lib


def call(lib, name, *args):
    status = getattr(lib, name)(*args)
    if status != OK:
        raise AnetrainError(lib.anetrain_status_name(status).decode(), lib.anetrain_last_error().decode())


def expect(lib, want, name, *args):
    status = getattr(lib, name)(*args)
    message = lib.anetrain_last_error().decode()
    got = lib.anetrain_status_name(status).decode()
    print(f"{name}: {got}: {message}")
    assert status == want and message, f"{name} returned {got}, expected status {want}"


def u32s(values):
    return (C.c_uint32 * len(values))(*values)


def main(lib_path, model_path, scratch):
    lib = load(lib_path)
    print("anetrain", lib.anetrain_version().decode())

    model = Handle()
    call(lib, "anetrain_model_open", model_path.encode(), C.byref(model))
    info = ModelInfo()
    call(lib, "anetrain_model_info", model, C.byref(info))
    print(f"model: V={info.vocab_size} C={info.dim} L={info.n_layers} tokenizer={info.has_tokenizer}")

    # Tokenize: ask for the count, then fill a buffer of that size.
    text = "Once upon a time".encode()
    n = C.c_size_t()
    call(lib, "anetrain_tokenize", model, text, 1, None, 0, C.byref(n))
    prompt = (C.c_uint32 * n.value)()
    call(lib, "anetrain_tokenize", model, text, 1, prompt, n.value, C.byref(n))

    # Generate greedily, streaming pieces; the callback stops after 6 tokens.
    got, pieces = [], []

    def on_token(token, piece, user):
        got.append(token)
        pieces.append(piece.decode() if piece is not None else "")
        return 1 if len(got) == 6 else 0

    callback = TOKEN_CALLBACK(on_token)  # kept alive for the call
    produced = C.c_size_t()
    call(lib, "anetrain_generate", model, prompt, n.value, 20, None, callback, None, C.byref(produced))
    assert produced.value == len(got) == 6, (produced.value, got)
    length = C.c_size_t()
    call(lib, "anetrain_detokenize", model, u32s(got), len(got), None, 0, C.byref(length))
    buf = C.create_string_buffer(length.value + 1)
    call(lib, "anetrain_detokenize", model, u32s(got), len(got), buf, len(buf), C.byref(length))
    assert buf.value.decode() == "".join(pieces), (buf.value, pieces)
    print("generated:", got, repr("".join(pieces)))

    # Train: 6 updates on one row of seq + 1 tokens; the loss falls; save a checkpoint.
    cfg = TrainerConfig()
    call(lib, "anetrain_trainer_config_default", C.byref(cfg))
    cfg.batch, cfg.seq, cfg.lr, cfg.min_lr = 1, 12, 3e-3, 3e-3
    trainer = Handle()
    call(lib, "anetrain_trainer_from_model", model, C.byref(cfg), C.byref(trainer))
    row = u32s([(7 * i + 3) % info.vocab_size for i in range(13)])
    losses = []
    for _ in range(6):
        loss = C.c_double()
        call(lib, "anetrain_trainer_update", trainer, row, 13, C.byref(loss))
        losses.append(loss.value)
    print("losses:", ["%.3f" % x for x in losses])
    assert losses[-1] < losses[0] - 0.1 and all(math.isfinite(x) for x in losses), losses
    ckpt = os.path.join(scratch, "py-ckpt")
    call(lib, "anetrain_trainer_save", trainer, ckpt.encode())
    trained = Handle()
    call(lib, "anetrain_model_open", ckpt.encode(), C.byref(trained))
    after = C.c_double()
    call(lib, "anetrain_model_loss", trained, row, 13, 12, C.byref(after))
    print("checkpoint loss on the row: %.3f" % after.value)
    assert after.value < losses[0] - 0.1

    # The bridge: y = x + b on the simulator.
    mil = (
        "program(1.3)\n[buildInfo = dict<string, string>({})]\n{\n"
        "    func main<ios18>(tensor<fp16, [1, 2, 1, 16]> i0_x, tensor<fp16, [1, 2, 1, 16]> i1_b) {\n"
        '        tensor<fp16, [1, 2, 1, 16]> y = add(x = i0_x, y = i1_b)[name = string("y")];\n'
        "    } -> (y);\n}\n"
    ).encode()
    bridge, prog = Handle(), Handle()
    call(lib, "anetrain_bridge_open", BRIDGE_KIND_SIMULATOR, C.byref(bridge))
    call(lib, "anetrain_bridge_compile", bridge, mil, None, 0, C.byref(prog))
    xs = [0.25 * i for i in range(32)]
    bs = [1.0 - 0.5 * i for i in range(32)]
    call(lib, "anetrain_program_write_input", prog, 0, (C.c_float * 32)(*xs), 32)
    call(lib, "anetrain_program_write_input", prog, 1, (C.c_float * 32)(*bs), 32)
    call(lib, "anetrain_program_eval", prog)
    out = (C.c_float * 32)()
    call(lib, "anetrain_program_read_output", prog, 0, out, 32)
    assert list(out) == [x + b for x, b in zip(xs, bs)], list(out)  # exact in fp16
    count = C.c_size_t()
    call(lib, "anetrain_bridge_compile_count", bridge, C.byref(count))
    assert count.value == 1
    print("bridge: y = x + b ok, compiles", count.value)

    # Misuse: statuses, never crashes.
    call(lib, "anetrain_program_free", prog)
    expect(lib, BAD_HANDLE, "anetrain_program_eval", prog)
    expect(lib, BAD_HANDLE, "anetrain_program_free", prog)
    call(lib, "anetrain_trainer_free", trainer)
    expect(lib, BAD_HANDLE, "anetrain_trainer_update", trainer, row, 13, None)
    expect(lib, BAD_HANDLE, "anetrain_model_info", Handle(987654321), C.byref(info))
    expect(lib, NULL_POINTER, "anetrain_model_open", None, C.byref(Handle()))
    expect(lib, BAD_ARGUMENT, "anetrain_bridge_open", 9, C.byref(Handle()))
    expect(lib, BAD_LENGTH, "anetrain_tokenize", model, text, 1, prompt, 1, C.byref(n))
    call(lib, "anetrain_bridge_free", bridge)
    call(lib, "anetrain_model_free", trained)
    call(lib, "anetrain_model_free", model)
    expect(lib, BAD_HANDLE, "anetrain_model_free", model)
    print("python example: ok")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
