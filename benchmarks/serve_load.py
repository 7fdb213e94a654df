"""Load on `minilm serve`: tokens/s and latency with 1, 4 and 16 concurrent clients, and whether the
server stays up with flat memory over a few hundred requests.

    python benchmarks/serve_load.py runs/speedrun-laptop/sft/checkpoint
    python benchmarks/serve_load.py CHECKPOINT --clients 1,4,16 --requests 40,80,160 --max-tokens 32

Starts `python -m minilm serve CHECKPOINT` as a subprocess on a free 127.0.0.1 port, with a queue
(--max-queue) deep enough that no request is refused: this measures latency, and the `429` column
counts refusals anyway. At each concurrency C, C client threads send streamed chat requests (a
different small sum each, temperature 0.7, a fixed max_tokens) until the level's request count or
its --seconds run out. Per level it prints the requests done, tokens/s (completion tokens over the
level's wall time), p50/p95 of the whole reply's latency and p50 of the first token's. One decoding
worker serves the queue in order, so tokens/s stays about flat with C while latency grows with it.

Then the server's resident memory (VmRSS from /proc) after a warm-up and at the end, and whether
it still answers. Exit status 1 if it died or its RSS grew by more than --rss-slack-mb. The
numbers depend on the machine and its load: compare runs made on the same machine.
"""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def start_server(checkpoint: str, port: int, max_queue: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "minilm", "serve", checkpoint, "--host", "127.0.0.1",
                             "--port", str(port), "--max-queue", str(max_queue)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not answers(port):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            sys.exit(f"minilm serve did not start: {proc.stderr.read()}")
        time.sleep(0.2)
    return proc


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def one_request(port: int, max_tokens: int, rng: random.Random) -> dict:
    """One streamed chat request: {status, seconds, first (seconds to the first text), tokens}."""
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    body = {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}], "max_tokens": max_tokens,
            "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start, first, tokens = time.perf_counter(), None, 0
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            for line in response:   # server-sent events, one `data: ...` line each
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
    except urllib.error.HTTPError as e:
        return {"status": e.code, "seconds": time.perf_counter() - start, "first": None, "tokens": 0}
    return {"status": 200, "seconds": time.perf_counter() - start, "first": first, "tokens": tokens}


def run_level(port: int, clients: int, requests: int, seconds: float, max_tokens: int, seed: int) -> dict:
    """`clients` threads share `requests` requests, stopping early after `seconds`."""
    results, lock = [], threading.Lock()
    left = [requests]
    deadline = time.perf_counter() + seconds

    def client(i: int):
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() < deadline:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            result = one_request(port, max_tokens, rng)
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    latencies = sorted(r["seconds"] for r in ok) or [float("nan")]
    firsts = [r["first"] for r in ok if r["first"] is not None] or [float("nan")]
    return {"clients": clients, "done": len(ok), "refused": sum(r["status"] == 429 for r in results),
            "failed": sum(r["status"] not in (200, 429) for r in results),
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "wall": wall,
            "p50": statistics.median(latencies), "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "first_p50": statistics.median(firsts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels")
    parser.add_argument("--requests", default="30,80,200", help="requests per level (a few hundred in all)")
    parser.add_argument("--seconds", type=float, default=120, help="time budget per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--rss-slack-mb", type=float, default=50, help="RSS growth that counts as not flat")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    if len(counts) != len(levels):
        sys.exit("--requests needs one count per --clients level")

    port = free_port()
    proc = start_server(args.checkpoint, port, args.max_queue)
    try:
        run_level(port, 2, 6, 60, args.max_tokens, seed=0)   # warm-up: first-call costs, allocator pools
        rss_start = rss_mb(proc.pid)
        rows = [run_level(port, c, n, args.seconds, args.max_tokens, seed=1 + i)
                for i, (c, n) in enumerate(zip(levels, counts))]
        alive = proc.poll() is None and answers(port)
        rss_end = rss_mb(proc.pid) if alive else float("nan")
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"minilm serve {args.checkpoint}: max_tokens {args.max_tokens}, temperature 0.7, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| clients | requests | tokens/s | p50 latency | p95 latency | p50 first token | 429 | failed |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['done']} | {r['tokens_per_s']:.0f} | {r['p50'] * 1000:.0f} ms | "
              f"{r['p95'] * 1000:.0f} ms | {r['first_p50'] * 1000:.0f} ms | {r['refused']} | {r['failed']} |")
    total = sum(r["done"] + r["refused"] + r["failed"] for r in rows)
    grew = rss_end - rss_start
    print(f"\n{total} requests; server {'still answers' if alive else 'DIED'}; "
          f"RSS {rss_start:.0f} MB after warm-up -> {rss_end:.0f} MB at the end ({grew:+.1f} MB)")
    if not alive or not grew <= args.rss_slack_mb or any(r["failed"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
