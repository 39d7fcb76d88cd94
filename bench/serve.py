"""A bounded load on loopback against `cifar10 serve`: throughput, latency, errors, CPU and memory per process.

Starts `cifar10 serve` in its own process group (or `--command`, any server whose port is `{port}`), then,
for each concurrency level, keeps that many clients busy for `--seconds` seconds, each sending one test
image (a 32×32 PNG, as a client would) per request and waiting for the answer. Per level it prints
requests per second (one image each), the 50th/95th/99th latency percentiles, errors, and the CPU time
each server process spent per request (where the time goes). Then the memory (RSS) of each server
process and their total. With `--soak N` it also sends N requests at concurrency 16, a tenth of them
malformed, and counts wrong answers (a top class other than the one the same image got alone), 5xx
answers and the memory growth. The last line is `p99_ms_c8: <number>`.

    python bench/serve.py --checkpoint_name RUN [--backend openvino] [--seconds 10] [--soak 5000] [-- SERVE FLAGS]
"""
import argparse
import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import psutil
from PIL import Image

from cifar10.serve import wait_until_healthy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tests'))
from conftest import free_port  # noqa: E402  (the tests' own helper: one way to find a port)


async def load(url: str, bodies: list, concurrency: int, seconds: float = None, count: int = None) -> dict:
    """Keep `concurrency` clients sending `bodies` (body, content type) in turn, for `seconds` or until `count`
    requests; the latencies in ms of the answers with status 200, and (status, answer) of every request by index."""
    latencies, answers, deadline = [], {}, time.perf_counter() + (seconds or 1e9)
    issued = iter(range(count if count is not None else 1 << 60))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def client():
            for i in issued:
                if time.perf_counter() > deadline: return
                body, content_type = bodies[i % len(bodies)]
                start = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={'Content-Type': content_type}) as r:
                        answers[i] = r.status, await r.json(content_type=None)
                except (aiohttp.ClientError, ValueError) as e: answers[i] = 0, str(e)
                if answers[i][0] == 200: latencies.append((time.perf_counter() - start) * 1000)
        begin = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - begin
    latencies = np.array(latencies or [np.nan])
    return {'rps': len(answers) / elapsed, 'p50': np.percentile(latencies, 50), 'p95': np.percentile(latencies, 95),
            'p99': np.percentile(latencies, 99), 'errors': sum(s != 200 for s, _ in answers.values()),
            'requests': len(answers), 'answers': answers}


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO(); Image.fromarray(image.transpose(1, 2, 0)).save(buffer, 'PNG'); return buffer.getvalue()


def server_processes(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def label(p: psutil.Process) -> str:
    "A process's id, name and the start of its command line."
    try: return f'{p.pid} {p.name()[:15]} {" ".join(p.cmdline()[1:4])[:50]}'
    except psutil.Error: return f'{p.pid} (ended)'


def cpu_seconds(processes) -> dict:
    times = {}
    for p in processes:
        try: t = p.cpu_times(); times[p.pid] = t.user + t.system
        except psutil.Error: pass
    return times


def memory(processes) -> dict:
    rss = {}
    for p in processes:
        try: rss[label(p)] = p.memory_info().rss / 2**20
        except psutil.Error: pass
    return rss


MALFORMED = [(b'', 'image/png', 400), (b'not an image at all', 'image/png', 400),
             (None, 'image/png', 400), (b'{"image": 1}', 'application/json', 415)]  # None: a truncated PNG


def soak(url, samples, reference, count) -> dict:
    "`count` requests at concurrency 16, every tenth malformed; wrong answers, 5xx, and statuses that differ."
    good = [(png(x), 'image/png') for x in samples]
    malformed = [(body if body is not None else good[0][0][:60], kind) for body, kind, _ in MALFORMED]
    bodies = [malformed[(i // 10) % len(malformed)] if i % 10 == 9 else good[i % len(good)] for i in range(count)]
    result = asyncio.run(load(url, bodies, 16, count=count))
    wrong = server_errors = unexpected = 0
    for i, (status, answer) in result['answers'].items():
        server_errors += status >= 500
        if i % 10 == 9: unexpected += status != MALFORMED[(i // 10) % len(MALFORMED)][2]
        elif status != 200: unexpected += 1
        else: wrong += answer['predictions'][0]['top_k'][0]['class'] != reference[i % len(good)]
    return {'requests': len(result['answers']), 'wrong': wrong, '5xx': server_errors, 'unexpected_status': unexpected,
            'rps': result['rps']}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint_name', default='cpu-preset')
    parser.add_argument('--models_dir', default='models')
    parser.add_argument('--data_dir', default='data')
    parser.add_argument('--backend', default='openvino')
    parser.add_argument('--command', help='a server to measure instead of cifar10 serve, e.g. "python app.py {port}"')
    parser.add_argument('--seconds', type=float, default=10)
    parser.add_argument('--levels', default='1,8,32')
    parser.add_argument('--soak', type=int, default=0, help='requests of the soak test (0: none)')
    args, serve_flags = parser.parse_known_args()
    from cifar10.data import load_split
    samples = np.array(load_split(args.data_dir, 'test')[0][:200])
    port, bin = free_port(), Path(sys.executable).parent
    if args.command: command = args.command.format(port=port).split()
    else:
        command = [str(bin/'cifar10'), 'serve', '--checkpoint_name', args.checkpoint_name, '--models_dir',
                   args.models_dir, '--backend', args.backend, '--port', str(port),
                   *[f for f in serve_flags if f != '--']]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, 'PATH': f'{bin}:{os.environ["PATH"]}'})
    base = f'http://127.0.0.1:{port}'
    try:
        if not wait_until_healthy(f'{base}/health', 300, server):
            raise SystemExit(f'{" ".join(command)}: did not come up')
        url, bodies = f'{base}/predict', [(png(x), 'image/png') for x in samples]
        print(f'load average {os.getloadavg()[0]:.2f}; serving: {" ".join(command[1:])}', flush=True)
        reference = [a[1]['predictions'][0]['top_k'][0]['class']
                     for _, a in sorted(asyncio.run(load(url, bodies, 1, count=len(bodies)))['answers'].items())]
        asyncio.run(load(url, bodies, 8, 2))  # warm up
        processes, results = server_processes(server.pid), {}
        names = {p.pid: ' '.join(label(p).split()[:2]) for p in processes}
        for concurrency in map(int, args.levels.split(',')):
            before = cpu_seconds(processes)
            r = results[concurrency] = asyncio.run(load(url, bodies, concurrency, args.seconds))
            after = cpu_seconds(processes)
            cpu = ', '.join(f'{names[pid]} {(after[pid] - before[pid]) * 1000 / r["requests"]:.2f}'
                            for pid in after if pid in before)
            print(f'concurrency {concurrency:3d}: {r["rps"]:7.0f} requests/s (1 image each)  p50 {r["p50"]:6.1f} ms  '
                  f'p95 {r["p95"]:6.1f} ms  p99 {r["p99"]:6.1f} ms  errors {r["errors"]}/{r["requests"]}  '
                  f'CPU ms per request: {cpu}', flush=True)
        rss = memory(processes)
        for name, mb in rss.items(): print(f'memory {mb:7.1f} MB  {name}')
        print(f'memory_total_mb: {sum(rss.values()):.0f} ({len(rss)} processes)', flush=True)
        if args.soak:
            s = soak(url, samples, reference, args.soak)
            grown = sum(memory(processes).values()) - sum(rss.values())
            print(f'soak: {s["requests"]} requests (a tenth malformed) at concurrency 16, {s["rps"]:.0f}/s: '
                  f'{s["wrong"]} wrong answers, {s["5xx"]} 5xx, {s["unexpected_status"]} unexpected statuses, '
                  f'memory {grown:+.0f} MB')
    finally:
        if server.poll() is None: os.killpg(server.pid, signal.SIGTERM)
        try: server.wait(timeout=60)
        except subprocess.TimeoutExpired: os.killpg(server.pid, signal.SIGKILL)
    if 8 in results: print(f'p99_ms_c8: {results[8]["p99"]:.1f}')


if __name__ == '__main__':
    main()
