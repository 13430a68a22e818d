"""A bounded local load on the search service: N POST /search requests, C at a time.

    python tools/bench_serve.py --index=/tmp/glyphs.index --queries=data/glyphs/train --requests=500 --concurrency=8

Starts `python -m pnpp_tf.serve --port=0` on 127.0.0.1 (or uses --url of one already running),
sends one warm-up request per worker, then the measured requests (raw image bytes, ?k=), cycling
through the query images, and prints p50/p99 latency, requests/s, the errors and the CPU.
"""

import argparse
import concurrent.futures
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pnpp_tf.retrieval.embed import find_images  # noqa: E402  pylint: disable=wrong-import-position


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            found = re.search(r"^model name\s*:\s*(.+)$", file.read(), re.M)
        return f"{found.group(1).strip() if found else 'unknown CPU'}, {os.cpu_count()} logical cores"
    except OSError:
        return f"unknown CPU, {os.cpu_count()} logical cores"


def start_server(index, extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen([sys.executable, "-m", "pnpp_tf.serve", f"--index={index}", "--port=0", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = process.stdout.readline()
    found = re.search(r"at (http://\S+/)", line)
    if not found:
        process.kill()
        sys.exit(f"the service did not start: {line!r}")
    return process, found.group(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", help="catalogue to serve (starts pnpp_tf.serve)")
    parser.add_argument("--url", help="a service already running, instead of --index")
    parser.add_argument("--queries", required=True, help="folder of query images")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    if not (args.index or args.url):
        parser.error("give --index or --url")
    queries = [pathlib.Path(path).read_bytes() for path in find_images(args.queries)]
    process, url = (None, args.url) if args.url else start_server(args.index, [])
    try:
        with httpx.Client(base_url=url, timeout=120,
                          limits=httpx.Limits(max_connections=args.concurrency)) as client:
            def post(i):
                began = time.perf_counter()
                response = client.post(f"/search?k={args.k}", content=queries[i % len(queries)])
                return time.perf_counter() - began, response.status_code

            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(post, range(args.concurrency)))  # warm-up: traces, connections
                began = time.perf_counter()
                results = list(pool.map(post, range(args.requests)))
                wall = time.perf_counter() - began
            info = client.get("/api/info").json()
    finally:
        if process:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
    latencies = np.array([seconds for seconds, _ in results]) * 1000
    errors = sum(status != 200 for _, status in results)
    print(f"index: {info['images']} images, {info['embedding_dim']}-d {info['dtype']}, {info['backend']} search, "
          f"{info['image_size']} px crops; k={args.k}")
    print(f"{args.requests} POST /search, {args.concurrency} concurrent: p50 {np.percentile(latencies, 50):.1f} ms, "
          f"p99 {np.percentile(latencies, 99):.1f} ms, {args.requests / wall:.1f} requests/s, {errors} errors")
    print(f"CPU: {cpu_name()}")


if __name__ == "__main__":
    main()
