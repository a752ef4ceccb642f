#!/usr/bin/env python3
"""Load benchmark of `anetrain serve` with the official `openai` client.

    /work/venv/bin/python tools/bench_serve.py [--model MODEL] [--bin target/release/anetrain]
        [--threads 2] [--concurrency 1 4 16] [--requests 16] [--max-tokens 48] [--rounds 2]

Starts `anetrain serve --model MODEL --port 0` (default: the shared SmolLM2-135M-Instruct
GGUF), then, --rounds times over the levels in turn (1, 4, 16, 1, 4, 16: alternating, so that
a change in the machine's load touches every level alike), sends --requests chat completions
(streamed, greedy, at most --max-tokens tokens each) from C concurrent clients, and prints
one Markdown row per level with the medians over the rounds: requests/s, generated tokens/s,
time to first token (p50, p95), end-to-end latency (p50, p95), errors (must be 0), the
server's peak RSS so far (VmHWM) and the largest batch the engine had decoded by the end of
the level in the first round (GET /health; levels ascend, so it is that level's).
Exits non-zero on any error. About 2-3 minutes on 2 cores. Never needed to build or test.
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

from openai import AsyncOpenAI

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a neural network is in two sentences.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Name a few planets of the solar system.",
    "What is 12 times 7?",
    "Describe a cat to someone who has never seen one.",
]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def one(client, model, i, max_tokens):
    start = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft if ttft is not None else time.perf_counter() - start, time.perf_counter() - start, tokens


async def level(base, model, c, n, max_tokens):
    client = AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    queue = list(range(n))
    results, errors = [], []

    async def worker():
        while queue:
            i = queue.pop()
            try:
                results.append(await one(client, model, i, max_tokens))
            except Exception as e:  # counted, and the first few are shown
                errors.append(repr(e))

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(c)])
    wall = time.perf_counter() - start
    await client.close()
    return results, errors, wall


def health(base):
    with urllib.request.urlopen(base + "/health") as r:
        return json.load(r)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(
        root, "../shared/data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--bin", default=os.path.join(root, "target/release/anetrain"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cmd = [args.bin, "serve", "--model", args.model, "--port", "0", "--threads", str(args.threads),
           "--max-batch", str(args.max_batch), "--ctx", "1024"]
    print("$ " + " ".join(cmd))
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    failed = False
    try:
        line = server.stdout.readline()
        base = next(w for w in line.split() if w.startswith("http://"))
        name = line.split()[1]
        print(f"server: {line.strip()} (pid {server.pid})")
        asyncio.run(level(base, name, 1, 2, 8))  # warm-up
        rows = {c: [] for c in args.concurrency}
        for r in range(args.rounds):
            for c in args.concurrency:
                res, errs, wall = asyncio.run(level(base, name, c, max(args.requests, c), args.max_tokens))
                ttft = [x[0] for x in res] or [float("nan")]
                lat = [x[1] for x in res] or [float("nan")]
                toks = sum(x[2] for x in res)
                row = dict(requests=len(res) + len(errs), rps=len(res) / wall, tps=toks / wall,
                           ttft50=pct(ttft, 50), ttft95=pct(ttft, 95), lat50=pct(lat, 50), lat95=pct(lat, 95),
                           errors=len(errs), rss=peak_rss_mb(server.pid), batch=health(base)["peak_batch"])
                rows[c].append(row)
                print(f"  round {r + 1}, {c} clients: {row['rps']:.2f} req/s, {row['tps']:.1f} tok/s, "
                      f"{len(errs)} errors", file=sys.stderr, flush=True)
                for e in errs[:3]:
                    print("   error:", e, file=sys.stderr)
                failed |= bool(errs)
        med = lambda c, k: statistics.median(x[k] for x in rows[c])
        print(f"\nmedians over {args.rounds} alternating rounds; {args.requests} requests of at most "
              f"{args.max_tokens} tokens per level; --threads {args.threads}")
        print("| clients | requests | requests/s | generated tokens/s | TTFT p50 / p95 (s) | "
              "latency p50 / p95 (s) | errors | peak RSS (MB) | peak batch |")
        print("|---|---|---|---|---|---|---|---|---|")
        for c in args.concurrency:
            print(f"| {c} | {sum(x['requests'] for x in rows[c])} | {med(c, 'rps'):.2f} | {med(c, 'tps'):.1f} | "
                  f"{med(c, 'ttft50'):.2f} / {med(c, 'ttft95'):.2f} | {med(c, 'lat50'):.2f} / {med(c, 'lat95'):.2f} | "
                  f"{sum(x['errors'] for x in rows[c])} | {max(x['rss'] for x in rows[c]):.0f} | "
                  f"{rows[c][0]['batch']} |")
        base_tps = med(args.concurrency[0], "tps")
        print("generated tokens/s relative to " + f"{args.concurrency[0]} client(s): " + ", ".join(
            f"{c}: {med(c, 'tps') / base_tps:.2f}x" for c in args.concurrency))
    finally:
        server.terminate()
        server.wait()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
