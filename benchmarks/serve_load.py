"""Load on the serving apps of serve/config.yaml, over loopback, bounded in count and time.

    python benchmarks/serve_load.py [--llm-model PATH] [--snn-model PATH] [--gp-model PATH]

Starts `serve run` on the config (a local Ray cluster unless RAY_ADDRESS is set) with the given
model folders (default: the ones serve/config.yaml names, which `make demo` trains), then:
- LLM: Poisson arrivals at each rate of `--rates` (requests/s), `--requests` streamed
  completions per rate, each generating exactly `--max-tokens` tokens (EOS ignored, greedy).
  Per rate: TTFT, TPOT and end-to-end latency (p50/p99), output tokens/s, and the count of each
  non-200 status; then an overload burst (`--burst` requests at once) that must be answered
  with 503 + Retry-After rather than queue without bound.
- Classifiers, the SNN (an 8x8 grey image) and the GP ensemble (a 32x32 test-split image of the
  shapes world): `--classify-requests` single-image requests per model at concurrency 1 and 4,
  requests/s and latency p50/p99.
Prints one JSON record; BENCHMARKS.md keeps the latest.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import aiohttp
import yaml

REPO = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT_S = 120
READY_TIMEOUT_S = 300


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p50": round(pick(0.5), 4), "p99": round(pick(0.99), 4)}


async def stream_completion(session, url: str, body: dict) -> dict:
    """One streamed completion: status, TTFT, end-to-end seconds and generated tokens."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            await response.read()
            return {"status": response.status, "retry_after": response.headers.get("Retry-After")}
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"status": "stream-error"}
            if event["choices"]:
                first = first or time.perf_counter()
            else:  # the usage chunk, last before [DONE]
                tokens = event["usage"]["completion_tokens"]
    return {
        "status": 200,
        "ttft": first - start,
        "e2e": time.perf_counter() - start,
        "tokens": tokens,
    }


async def llm_rate(session, url: str, rate: float, count: int, body: dict, seed: int) -> dict:
    rng = random.Random(seed)
    tasks, start = [], time.perf_counter()
    for _ in range(count):
        tasks.append(asyncio.create_task(stream_completion(session, url, body)))
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    statuses: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    return {
        "rate": rate,
        "requests": count,
        "ok": len(ok),
        "errors": statuses,
        "ttft_s": percentiles([r["ttft"] for r in ok]),
        "tpot_s": percentiles(tpot),
        "e2e_s": percentiles([r["e2e"] for r in ok]),
        "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
    }


async def burst(session, url: str, count: int, body: dict) -> dict:
    results = await asyncio.gather(*(stream_completion(session, url, body) for _ in range(count)))
    rejected = [r for r in results if r["status"] == 503]
    return {
        "requests": count,
        "ok": sum(r["status"] == 200 for r in results),
        "rejected_503": len(rejected),
        "rejected_with_retry_after": sum(r["retry_after"] is not None for r in rejected),
        "other": sum(r["status"] not in (200, 503) for r in results),
    }


async def classify_load(session, url: str, model: str, count: int, concurrency: int, image) -> dict:
    latencies, statuses = [], []
    queue = asyncio.Queue()
    for _ in range(count):
        queue.put_nowait(None)

    async def worker():
        while not queue.empty():
            queue.get_nowait()
            start = time.perf_counter()
            async with session.post(f"{url}/v1/classify/{model}", json={"images": [image]}) as r:
                await r.read()
                statuses.append(r.status)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {
        "model": model,
        "concurrency": concurrency,
        "requests": count,
        "errors": {str(code): statuses.count(code) for code in set(statuses) - {200}},
        "requests_per_s": round(count / wall, 1),
        "latency_s": percentiles(latencies),
    }


async def measure(url: str, key: str | None, args) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)
    body = {
        "model": "kiln-tiny",
        "prompt": "12+7=",
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as s:
        llm = [
            await llm_rate(s, url, rate, args.requests, body, seed=i)
            for i, rate in enumerate(args.rates)
        ]
        overload = await burst(s, url, args.burst, body)
        images = {"snn": [[0.5] * 8 for _ in range(8)], "gp": shapes_image()}
        classify = [
            await classify_load(s, url, model, args.classify_requests, c, image)
            for model, image in images.items()
            for c in (1, 4)
        ]
    return {"llm": llm, "overload_burst": overload, "classify": classify}


def shapes_image() -> list:
    """The first test-split image of the default shapes world, [3][32][32] in [0, 1]."""
    from kiln.worlds.shapes import ShapesWorld

    world = ShapesWorld()
    pixels = world.images(world.scenes("test", 1))[0]  # [32, 32, 3] uint8
    return (pixels.transpose(2, 0, 1) / 255).round(4).tolist()


def ready(url: str) -> bool:
    import urllib.request

    try:
        for route in ("/ready", "/v1/classify/ready"):
            with urllib.request.urlopen(f"{url}{route}", timeout=5) as response:
                if response.status != 200:
                    return False
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm-model", help="default: serve/config.yaml's")
    parser.add_argument("--snn-model", help="default: serve/config.yaml's")
    parser.add_argument("--snn-levels", type=int, default=16)
    parser.add_argument("--gp-model", help="default: serve/config.yaml's")
    parser.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=24, help="LLM requests per rate")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--burst", type=int, default=160)
    parser.add_argument("--classify-requests", type=int, default=100)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    config = yaml.safe_load((REPO / "serve/config.yaml").read_text())
    config["http_options"]["port"] = args.port
    llm, classify = config["applications"]
    models = classify["args"]["models"]
    for section, key, given in [
        (llm["args"], "model", args.llm_model),
        (models["snn"], "path", args.snn_model),
        (models["gp"], "path", args.gp_model),
    ]:
        section[key] = str(Path(given).resolve() if given else REPO / section[key])
    models["snn"]["options"]["levels"] = args.snn_levels
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as config_file:
        yaml.safe_dump(config, config_file)
        serve_cli = str(Path(sys.executable).parent / "serve")
        # Our own local cluster (token authentication on, as everywhere) unless RAY_ADDRESS
        # names one: never someone else's that happens to run on this machine.
        address = os.environ.get("RAY_ADDRESS", "local")
        env = dict(os.environ)
        if address == "local":
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        command = [serve_cli, "run", "--address", address, config_file.name]
        server = subprocess.Popen(command, cwd=REPO, env=env)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not ready(url):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("serve run did not become ready")
                time.sleep(2)
            results = asyncio.run(measure(url, os.environ.get("KILN_API_KEY"), args))
        finally:
            server.terminate()
            server.wait(timeout=120)
    record = {
        "benchmark": "serve_load",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "args": vars(args),
        **results,
    }
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
