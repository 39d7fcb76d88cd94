"""A bounded load on loopback against `cifar10 serve`: throughput, latency and errors at concurrency 1, 8 and 32.

Starts `cifar10 serve` in its own process, then, for each concurrency level, keeps that many clients
busy for `--seconds` seconds, each sending one test image (a PNG, as a client would) per request and
waiting for the answer. It prints requests per second (one image each), the 50th/95th/99th latency
percentiles and the number of errors per level. With `--engine mlflow` it measures MLflow's own scoring
server (`mlflow models serve`) on the same model instead, sent the normalized tensors it expects. The
last line is `p99_ms_c8: <number>`.

    python bench/serve.py --checkpoint_name RUN [--backend openvino] [--workers 1] [--seconds 10]
"""
import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

from cifar10.data import MEAN, STD, load_split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


async def wait_until_up(url: str, process, timeout=180):
    deadline = time.time() + timeout
    async with aiohttp.ClientSession() as session:
        while time.time() < deadline:
            if process.poll() is not None: raise SystemExit(f'the server exited with code {process.returncode}')
            try:
                async with session.get(url) as r:
                    if r.status == 200: return
            except aiohttp.ClientError: pass
            await asyncio.sleep(0.3)
    raise SystemExit(f'{url} did not come up in {timeout} s')


async def load(url: str, bodies: list, headers: dict, concurrency: int, seconds: float) -> dict:
    "Keep `concurrency` clients sending `bodies` in turn for `seconds`; latencies in ms and errors."
    latencies, errors, deadline = [], 0, time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client(k):
            nonlocal errors
            i = k
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError: ok = False
                if ok: latencies.append((time.perf_counter() - start) * 1000)
                else: errors += 1
                i += concurrency
        begin = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - begin
    latencies = np.array(latencies)
    return {'rps': len(latencies) / elapsed, 'p50': np.percentile(latencies, 50), 'p95': np.percentile(latencies, 95),
            'p99': np.percentile(latencies, 99), 'errors': errors, 'requests': len(latencies) + errors}


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO(); Image.fromarray(image.transpose(1, 2, 0)).save(buffer, 'PNG'); return buffer.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint_name', required=True, help='for --engine mlflow: models:/NAME/VERSION')
    parser.add_argument('--engine', choices=['cifar10', 'mlflow'], default='cifar10')
    parser.add_argument('--models_dir', default='models')
    parser.add_argument('--data_dir', default='data')
    parser.add_argument('--backend', default='openvino')
    parser.add_argument('--workers', type=int, default=1)
    parser.add_argument('--api_servers', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--max_batch_size', type=int, default=32)
    parser.add_argument('--batch_timeout', type=float, default=0.001)
    parser.add_argument('--seconds', type=float, default=10)
    parser.add_argument('--levels', default='1,8,32')
    args = parser.parse_args()
    images, _ = load_split(args.data_dir, 'test')
    samples = np.array(images[:200])
    port, bin = free_port(), Path(sys.executable).parent
    if args.engine == 'cifar10':
        command = [bin/'cifar10', 'serve', '--checkpoint_name', args.checkpoint_name, '--models_dir', args.models_dir,
                   '--backend', args.backend, '--workers', str(args.workers), '--api_servers', str(args.api_servers),
                   '--threads', str(args.threads),
                   '--max_batch_size', str(args.max_batch_size), '--batch_timeout', str(args.batch_timeout),
                   '--port', str(port)]
        bodies, headers, path = [png(x) for x in samples], {'Content-Type': 'image/png'}, '/predict'
    else:
        command = [bin/'mlflow', 'models', 'serve', '-m', args.checkpoint_name, '--env-manager', 'local',
                   '--host', '127.0.0.1', '--port', str(port), '--workers', str(args.workers)]
        normalized = (samples / 255 - np.array(MEAN).reshape(1, 3, 1, 1)) / np.array(STD).reshape(1, 3, 1, 1)
        bodies = [json.dumps({'inputs': x[None].astype(np.float32).tolist()}) for x in normalized]
        headers, path = {'Content-Type': 'application/json'}, '/invocations'
    server = subprocess.Popen([str(c) for c in command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, 'PATH': f'{bin}:{os.environ["PATH"]}'}, start_new_session=True)
    try:
        asyncio.run(wait_until_up(f'http://127.0.0.1:{port}/health' if args.engine == 'cifar10'
                                  else f'http://127.0.0.1:{port}/ping', server))
        url = f'http://127.0.0.1:{port}{path}'
        asyncio.run(load(url, bodies, headers, 8, 2))  # warm up
        print(f'{args.engine} serving {args.checkpoint_name}' + (f' ({args.backend}, {args.api_servers} HTTP and '
              f'{args.workers} model process(es), {args.threads} thread(s), batches of up to {args.max_batch_size})'
              if args.engine == 'cifar10' else f' ({args.workers} worker(s))'))
        results = {}
        for concurrency in map(int, args.levels.split(',')):
            r = results[concurrency] = asyncio.run(load(url, bodies, headers, concurrency, args.seconds))
            print(f'concurrency {concurrency:3d}: {r["rps"]:7.0f} requests/s (1 image each)  p50 {r["p50"]:6.1f} ms  '
                  f'p95 {r["p95"]:6.1f} ms  p99 {r["p99"]:6.1f} ms  errors {r["errors"]}/{r["requests"]}', flush=True)
    finally:
        if server.poll() is None: os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    if 8 in results: print(f'p99_ms_c8: {results[8]["p99"]:.1f}')


if __name__ == '__main__':
    main()
