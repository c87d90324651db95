"""Load check of the REST endpoint: N concurrent clients on loopback, requests/s, p50/p99, nothing lost.

    python bench/load_rest.py --model NAME [--models-dir models] [--clients 4] [--requests 200] [--max-seconds 120]

Starts ``fod_app serve``'s app with uvicorn in this process on a free 127.0.0.1 port (never another address),
with a temporary history database, then ``--clients`` threads post real images (sample_data/inspect, plus a
few broken files that must be refused with a status) until ``--requests`` are sent or ``--max-seconds`` pass.
Reports status counts, requests/s, p50/p99 latency, and checks that every answered request is in the history
(same content hash and score) and every other one got a 4xx/5xx status. Asserts that nothing was lost.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    import httpx
    import uvicorn

    from fod_app.bundle import load_bundle
    from fod_app.history import HistoryStore
    from fod_app.serve import MAX_CONCURRENCY, create_app

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--models-dir")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    detector = load_bundle(args.model, root=Path(args.models_dir) if args.models_dir else None, device=args.device)
    store = HistoryStore(Path(tempfile.mkdtemp(prefix="fod-load-rest-")) / "history.sqlite3")
    token = "load-check-token-0123456789"
    app = create_app(detector, token=token, history=store)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           limit_concurrency=MAX_CONCURRENCY))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    good = [(p.name, p.read_bytes()) for p in sorted((REPO / "sample_data" / "inspect").glob("*.png"))]
    bad = [("broken.png", b"not an image"), ("cut.png", good[0][1][:2000])]
    payloads = good[:1] + bad[:1] + good[1:] * 3 + good[:1] * 2 + bad[1:]  # 2 in 50 requests must be refused
    lock = threading.Lock()
    sent = 0
    results: list[tuple[int, float, dict | None, str]] = []  # status, seconds, body, file
    deadline = time.perf_counter() + args.max_seconds

    def client(index: int) -> None:
        nonlocal sent
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          headers={"Authorization": f"Bearer {token}"}) as http:
            while True:
                with lock:
                    if sent >= args.requests or time.perf_counter() > deadline:
                        return
                    name, data = payloads[(sent + index) % len(payloads)]
                    sent += 1
                started = time.perf_counter()
                try:
                    response = http.post("/inspect", files={"file": (name, data, "image/png")})
                    status, body = response.status_code, response.json()
                except httpx.HTTPError as err:
                    status, body = -1, {"detail": str(err)}
                with lock:
                    results.append((status, time.perf_counter() - started, body, name))

    started = time.perf_counter()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    server.should_exit = True
    thread.join(timeout=10)

    statuses = Counter(status for status, *_ in results)
    answered = [(seconds, body) for status, seconds, body, _ in results if status == 200]
    latencies = [1000 * s for s, _ in answered]
    runs = store.runs(source="rest")
    recorded = [img for run in runs for img in store.run(run.run_id).images]
    recorded_keys = Counter((img.content_sha256, round(img.score, 6)) for img in recorded)
    answer_keys = Counter((body["content_sha256"], round(body["score"], 6)) for _, body in answered)
    lost = len(results) != sent or statuses.get(-1, 0) > 0 or recorded_keys != answer_keys
    print(f"\n## REST load check: {args.model}, {args.clients} concurrent clients, loopback, {args.device}\n")
    print(f"sent {sent} requests in {elapsed:.1f} s: {dict(sorted(statuses.items()))} (status: count)")
    if latencies:
        print(f"answered {len(answered)}: {len(answered) / elapsed:.2f} requests/s; latency p50 "
              f"{statistics.median(latencies):.0f} ms, p99 {np.percentile(latencies, 99):.0f} ms")
    print(f"history: {len(recorded)} images recorded for {len(answered)} answers; "
          f"refused with a status: {sum(1 for s, *_ in results if s not in (200, -1))}")
    print("nothing lost" if not lost else "LOST: answers and history do not match, or requests got no status")
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
