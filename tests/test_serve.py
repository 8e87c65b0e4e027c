"""serve/config.yaml on the session's Ray cluster, with tiny random models: every app answers
correctly, streamed text equals non-streamed text and the engine's own, the unchanged `openai`
client works, bad input gets a 4xx that names the field (and fuzzing finds no 5xx), the API
key is enforced and never logged, and a killed engine replica ends its stream with an error
event and comes back. One deployment for the whole module; Serve shuts down at the end.
"""

import base64
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import ray
import requests
import schemathesis
import torch
import yaml
from engine_models import build_tiny_llama
from hypothesis import HealthCheck, given, settings
from PIL import Image
from ray import serve
from ray.util.state import list_actors

from actors.classifier import GPClassifier, SNNClassifier
from jobs.gp_fewshot import class_prompts
from kiln import snn
from kiln.diffusion.base import ClipArch, build_clip, build_tokenizer
from kiln.engine import LLMEngine, SamplingParams
from kiln.gp import FeatureExtractor, FewShotClassifier
from kiln.worlds.shapes import ShapesWorld
from serve.common import API_KEY_ENV

REPO = Path(__file__).resolve().parent.parent
# The key reaches Serve's replicas the production way, through the environment of the Ray
# processes: the session's head starts after collection, so setting it here is early enough.
os.environ.setdefault(API_KEY_ENV, secrets.token_hex(16))
KEY = os.environ[API_KEY_ENV]
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "kiln-tiny"
CONTEXT = 512  # long enough that a stream outlives the kill in the fault test
LEVELS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    llm = build_tiny_llama(tmp_path_factory.mktemp("llm"), max_positions=CONTEXT)
    torch.manual_seed(0)
    config = snn.ViTConfig(image_size=8, patch_size=4, dim=8, depth=1, heads=2, mlp_dim=16)
    qann = snn.ViT(config, LEVELS)
    snn.calibrate(qann, torch.randn(32, 1, 8, 8))
    snn_folder = tmp_path_factory.mktemp("snn")
    snn.save_pretrained(qann, snn_folder)
    return {"llm": llm, "snn": snn_folder, "gp": _fitted_gp(tmp_path_factory.mktemp("gp"))}


def _fitted_gp(folder: Path) -> Path:
    """A GP ensemble over one tiny untrained CLIP, fitted on 30 shapes-world images."""
    torch.manual_seed(0)
    prompts = class_prompts()
    tokenizer = build_tokenizer([p for ps in prompts.values() for p in ps], 16)
    arch = ClipArch(hidden_size=16, num_layers=1, num_heads=2, projection_dim=16)
    build_clip(arch, tokenizer, 32).save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    world = ShapesWorld()
    scenes = world.scenes("validation", 30)
    labels = torch.tensor([list(prompts).index(s.attributes["shape"]) for s in scenes])
    extractor = FeatureExtractor(folder / "clip", {"clip": folder / "clip"}, prompts)
    classifier = FewShotClassifier.fit(extractor, world.images(scenes), labels, iterations=2)
    classifier.save(folder / "classifier")
    return folder / "classifier"


@pytest.fixture(scope="module")
def url(ray_cluster, models, tmp_path_factory):
    """serve/config.yaml with the test models, a free port and CPU shares for 2 cores."""
    config = yaml.safe_load((REPO / "serve/config.yaml").read_text())
    port = _free_port()
    config["http_options"]["port"] = port
    llm, classify = config["applications"]
    llm["args"].update(model=str(models["llm"]), max_num_seqs=8, torch_threads=1)
    classify["args"]["models"]["snn"].update(path=str(models["snn"]), options={"levels": LEVELS})
    classify["args"]["models"]["gp"].update(path=str(models["gp"]))
    classify["args"]["torch_threads"] = 1
    for deployment in llm["deployments"] + classify["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0}
    path = tmp_path_factory.mktemp("serve") / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = str(Path(sys.executable).parent / "serve")
    subprocess.run([serve_cli, "deploy", str(path), "-a", ray_cluster.dashboard_url], check=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while not _ready(base):
        assert time.monotonic() < deadline, f"serve did not become ready: {serve.status()}"
        time.sleep(2)
    yield base
    serve.shutdown()


def _ready(base: str) -> bool:
    try:
        return all(
            requests.get(f"{base}{route}", timeout=5).status_code == 200
            for route in ("/ready", "/v1/classify/ready")
        )
    except requests.RequestException:  # not listening yet, or busy starting the app
        return False


def _post(url: str, path: str, body: dict | str, headers: dict = AUTH, **kwargs):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    headers = {"Content-Type": "application/json", **headers}
    return requests.post(f"{url}{path}", data=data, headers=headers, timeout=60, **kwargs)


def _events(response: requests.Response) -> list:
    """The `data:` payloads of a server-sent-event stream, JSON-decoded ([DONE] kept as is)."""
    payloads = [line[6:] for line in response.iter_lines(decode_unicode=True) if line]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def test_models_health_and_readiness(url):
    models = requests.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{url}/ready", timeout=10).json()
    assert ready["max_model_len"] == CONTEXT and ready["speculation"] == "per-request"


@pytest.mark.parametrize("stop", [None, "STOP-FROM-REFERENCE"])
def test_streamed_equals_non_streamed_equals_engine(url, models, stop):
    prompt = "12+7="
    reference_engine = LLMEngine(models["llm"], block_size=16, max_num_seqs=1)
    [reference] = reference_engine.generate(prompt, SamplingParams(max_tokens=40, temperature=0))
    assert len(reference.text) > 6, "the tiny model should produce some text"
    if stop:  # a stop string from the middle of the text: held back while streaming, trimmed
        stop = reference.text[3:6]
        [reference] = reference_engine.generate(
            prompt, SamplingParams(max_tokens=40, temperature=0, stop=[stop])
        )
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0, "stop": stop}
    response = _post(url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    whole = response.json()
    assert whole["choices"][0]["text"] == reference.text
    usage = whole["usage"]
    assert usage["prompt_tokens"] == len(reference.prompt_token_ids)
    assert usage["completion_tokens"] == len(reference.token_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    streamed = _post(url, "/v1/completions", {**body, "stream": True}, stream=True)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed)
    assert events[-1] == "[DONE]" and len(events) > 2
    chunks = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == reference.text
    assert chunks[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_chat_and_usage_chunk(url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "3+4="}], "temperature": 0}
    whole = _post(url, "/v1/chat/completions", body).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["role"] == "assistant"
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    events = _events(_post(url, "/v1/chat/completions", body, stream=True))
    text = "".join(e["choices"][0]["delta"]["content"] for e in events[:-2])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-2]["usage"] == whole["usage"] and events[-2]["choices"] == []


def test_openai_client_works_unchanged(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == [MODEL]
    completion = client.completions.create(model=MODEL, prompt="5+5=", max_tokens=8, temperature=0)
    assert completion.usage.completion_tokens > 0
    messages = [{"role": "user", "content": "2+2="}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert streamed == chat.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="1", max_tokens=10**9)


def test_per_request_speculation(url):
    # Repeats give the n-gram proposer drafts; greedy speculation is lossless, so every setting
    # yields the same text, and only the ones that speculate propose drafts.
    prompt = [1, *[17, 42, 99, 23] * 6]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0}
    answers = {
        setting: _post(url, "/v1/completions", {**body, "speculation": setting}).json()
        for setting in ("off", 3, "smartspec")
    }
    assert len({a["choices"][0]["text"] for a in answers.values()}) == 1
    assert answers["off"]["speculation"]["proposed"] == 0
    fixed = answers[3]["speculation"]
    assert 0 < fixed["proposed"] <= 3 * fixed["steps"]


def test_engine_metrics_reach_prometheus(url):
    """Ours next to Serve's on the node's Prometheus endpoint (exported every few seconds)."""
    [node] = ray.nodes()
    endpoint = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    ours = {"queue_depth", "generated_tokens", "tokens_per_second", "spec_acceptance_rate"}
    ours |= {"spec_chosen_k", "spec_goodput"}
    deadline = time.monotonic() + 60
    while True:
        text = requests.get(endpoint, timeout=10).text
        missing = {name for name in ours if f"ray_kiln_llm_{name}" not in text}
        if not missing and "ray_serve_num_http_requests" in text:
            break
        assert time.monotonic() < deadline, f"not exported: {missing}"
        time.sleep(3)
    tokens = [line for line in text.splitlines() if line.startswith("ray_kiln_llm_generated")]
    assert float(tokens[0].split()[-1]) > 0


def _png(pixels: torch.Tensor) -> str:
    image = Image.fromarray((pixels * 255).round().byte().numpy(), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_classify_snn_matches_the_model(url, models):
    torch.manual_seed(1)
    pixels = (torch.rand(3, 8, 8) * 255).round() / 255  # exactly representable in a PNG
    body = {"images": [_png(pixels[0]), pixels[1].tolist(), [pixels[2].tolist()]]}
    answer = _post(url, "/v1/classify/snn", body).json()
    direct = SNNClassifier(models["snn"], levels=LEVELS).classify(pixels[:, None] * 2 - 1)
    served = torch.tensor([p["probabilities"] for p in answer["predictions"]])
    torch.testing.assert_close(served, direct.probabilities, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(served.sum(-1), torch.ones(3))
    assert [p["time_steps"] for p in answer["predictions"]] == direct.per_image["time_steps"]
    assert answer["extras"]["spikes"] == direct.per_batch["spikes"] > 0


def test_concurrent_classifications_do_not_interfere(url):
    """The SNN keeps membrane state between steps: parallel requests must not share a run."""
    bodies = [{"images": [[[i / 8] * 8] * 8]} for i in range(8)]
    alone = [_post(url, "/v1/classify/snn", body).json() for body in bodies]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda body: _post(url, "/v1/classify/snn", body).json(), bodies))
    assert together == alone


def test_classify_gp_matches_the_model_and_reports_uncertainty(url, models):
    torch.manual_seed(2)
    pixels = (torch.rand(2, 3, 32, 32) * 255).round() / 255
    answer = _post(url, "/v1/classify/gp", {"images": pixels.tolist()}).json()
    direct = GPClassifier(models["gp"]).classify(pixels * 2 - 1)
    served = torch.tensor([p["probabilities"] for p in answer["predictions"]], dtype=torch.float64)
    torch.testing.assert_close(served, direct.probabilities.double(), rtol=1e-5, atol=1e-6)
    variances = [p["variance"] for p in answer["predictions"]]
    assert variances == pytest.approx(direct.per_image["variance"]) and min(variances) > 0
    assert answer["extras"]["classes"] == list(class_prompts())


BAD_INPUTS = [
    ("/v1/completions", "{not json", 400, "not valid JSON"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 10**6]}, 400, "vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "speculation": 99}, 400, "speculation"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "a" * (2 << 20)}, 413, "limit"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/classify/snn", {"images": ["bm90IGEgcG5n"]}, 400, "PNG"),
    ("/v1/classify/snn", {"images": [[[0.5] * 7] * 8]}, 400, "expected 1x8x8"),
    ("/v1/classify/snn", {"images": [[[2.0] * 8] * 8]}, 400, "images"),
    ("/v1/classify/gp", {"images": [[[0.5] * 8] * 8]}, 400, "expected 3x32x32"),
    ("/v1/classify/resnet", {"images": [[[0.5] * 8] * 8]}, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_INPUTS)
def test_bad_input_gets_a_clear_4xx(url, path, body, status, message):
    response = _post(url, path, body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_api_key_required_and_never_logged(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = requests.get(f"{url}/v1/models", headers=headers, timeout=10)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        refused = _post(url, "/v1/classify/snn", {"images": []}, headers=headers)
        assert refused.status_code == 401
    assert requests.get(f"{url}/v1/models", headers=AUTH, timeout=10).status_code == 200
    # Ray's private API is the only way to the session's log folder from the driver.
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any("serve" in p.parts for p in files), "no Serve logs to search: the check is void"
    leaked = [p for p in files if KEY.encode() in p.read_bytes()]
    assert not leaked, f"the API key is in {leaked}"


def _live_schema(url: str, prefix: str):
    schema = schemathesis.openapi.from_url(f"{url}{prefix}/openapi.json", headers=AUTH)
    schema.config.update(base_url=f"{url}{prefix}")
    return schema


FUZZ = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("prefix", ["", "/v1/classify"])
def test_fuzzing_every_route_finds_no_5xx(url, prefix):
    # schemathesis' own pytest plugin does not run under pytest 9: hypothesis drives it here.
    operations = [result.ok() for result in _live_schema(url, prefix).get_all_operations()]
    assert len(operations) == (3 if prefix else 5)  # every route: health, ready, the API
    for operation in operations:

        @FUZZ
        @given(case=operation.as_strategy())
        def answers_without_server_error(case):
            response = case.call(headers=AUTH, timeout=30)  # a hang fails as a timeout
            assert response.status_code < 500, (case.path, case.body, response.text)

        answers_without_server_error()


def test_still_answering_after_the_fuzz(url):
    assert _ready(url)
    body = {"model": MODEL, "prompt": "1", "max_tokens": 4}
    assert _post(url, "/v1/completions", body).status_code == 200


def test_killed_engine_ends_the_stream_with_an_error_and_comes_back(url):
    body = {"model": MODEL, "prompt": "1", "max_tokens": CONTEXT - 8, "stream": True}
    body |= {"ignore_eos": True}
    stream = _post(url, "/v1/completions", body, stream=True)
    lines = stream.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line).startswith("data: {")  # generating
    [engine] = [
        a for a in list_actors(filters=[("state", "=", "ALIVE")])
        if "LLMEngine" in a.class_name
    ]  # fmt: skip
    ray.kill(ray.get_actor(engine.name, namespace="serve"), no_restart=True)
    events = [
        json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in lines if line
    ]
    assert "[DONE]" not in events
    assert "engine failed mid-stream" in events[-1]["error"]["message"]
    deadline = time.monotonic() + 120
    while not _ready(url):
        assert time.monotonic() < deadline, "Serve did not restore the engine replica"
        time.sleep(2)
    again = _post(url, "/v1/completions", {"model": MODEL, "prompt": "1", "max_tokens": 4})
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] > 0
