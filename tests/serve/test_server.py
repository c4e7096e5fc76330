"""The server answers like ``LLM.generate``: greedy and seeded completions, streams, chat, stop conditions,
and refuses bad requests with a 4xx naming the problem. One server for the module (resident policy, groups of
up to 8 sequences, 200 ms to fill a group)."""
import json
import os
import threading

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
jinja2 = pytest.importorskip("jinja2")

from serve_process import ServerProcess  # noqa: E402

from klotski import SamplingParams  # noqa: E402

PROMPTS = ["def main():\n    ", "    return self.", "# Copyright", "    if not isinstance(", "import os\n"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def server(chat_model_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("serve-log") / "server.log")
    srv = ServerProcess(chat_model_dir, log, "--max-num-seqs", "8", "--max-wait-ms", "200")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=60, max_retries=0)


def token_ids(choice) -> list[int]:
    return (choice.model_extra or {})["token_ids"]


def test_models_health_and_metrics_names(server, client):
    assert [m.id for m in client.models.list().data] == [server.model]
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    m = server.metrics()
    for name in ("klotski_requests_queued", "klotski_requests_running", "klotski_generation_tokens_total",
                 "klotski_generation_tokens_per_second", 'klotski_bytes_moved_total{kind="disk_read"}',
                 "klotski_batch_group_size_count", "klotski_batch_group_capacity"):
        assert name in m
    assert m["klotski_batch_group_capacity"] == 8


def test_concurrent_greedy_completions_equal_generate_and_share_groups(server, client, reference_llm):
    ref = reference_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    before = server.metrics()
    barrier, results = threading.Barrier(len(PROMPTS)), {}

    def ask(i):
        barrier.wait()
        results[i] = client.completions.create(model=server.model, prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                               temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(len(PROMPTS)))
    for i, r in results.items():
        (choice,) = r.choices
        assert token_ids(choice) == ref[i].token_ids
        assert choice.text == ref[i].text
        assert choice.finish_reason == ("length" if len(ref[i].token_ids) == MAX_TOKENS else "stop")
        assert r.usage.completion_tokens == len(ref[i].token_ids)
        assert r.usage.prompt_tokens == len(ref[i].prompt_token_ids)
    after = server.metrics()
    groups = after["klotski_batch_group_size_count"] - before["klotski_batch_group_size_count"]
    seqs = after["klotski_batch_group_size_sum"] - before["klotski_batch_group_size_sum"]
    assert seqs == len(PROMPTS) and groups < len(PROMPTS)  # concurrent requests shared batch groups


def test_prompt_list_and_token_id_prompts(server, client, reference_llm):
    ids = [reference_llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    ref = reference_llm.generate(prompt_token_ids=ids, sampling_params=SamplingParams(temperature=0, max_tokens=6))
    r = client.completions.create(model=server.model, prompt=ids, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [token_ids(c) for c in r.choices] == [o.token_ids for o in ref]


def test_streaming_yields_the_same_tokens(server, client, reference_llm):
    (ref,) = reference_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    chunks = list(client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    body = [c for c in chunks if c.choices]
    assert sum((token_ids(c.choices[0]) for c in body), []) == ref.token_ids
    assert "".join(c.choices[0].text for c in body) == ref.text
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    # raw SSE framing: data lines, ending with [DONE]
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert [json.loads(line[6:])["choices"][0]["token_ids"][0] for line in lines[:-1]] == ref.token_ids[:3]


def _chat_prompt(model_dir, reference_llm, messages) -> list[int]:
    """The template in the model's tokenizer_config.json, rendered here with plain jinja2."""
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        template = json.load(f)["chat_template"]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="<s>")
    return reference_llm.tokenizer.encode(text, add_special_tokens=False)


def test_chat_uses_the_models_template(server, client, reference_llm, chat_model_dir):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    prompt = _chat_prompt(chat_model_dir, reference_llm, messages)
    assert prompt[0] == 0 and prompt.count(0) == 1  # <s> once: the template's, none added
    (ref,) = reference_llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0,
                                                                                              max_tokens=8))
    r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0)
    assert token_ids(r.choices[0]) == ref.token_ids
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert sum((token_ids(c.choices[0]) for c in chunks), []) == ref.token_ids


def test_stop_strings_and_stop_token_ids(server, client, reference_llm):
    (ref,) = reference_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    stop = ref.text[4:7]
    assert stop and stop in ref.text
    r = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == ref.text[: ref.text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    r = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"stop_token_ids": [ref.token_ids[2]]})
    assert token_ids(r.choices[0]) == ref.token_ids[: ref.token_ids.index(ref.token_ids[2]) + 1]
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_generate(server, client, reference_llm):
    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=MAX_TOKENS)
    (ref,) = reference_llm.generate(PROMPTS[1], sp)
    outs = [token_ids(client.completions.create(model=server.model, prompt=PROMPTS[1], max_tokens=MAX_TOKENS,
                                                temperature=0.9, top_p=0.95, seed=1234).choices[0])
            for _ in range(2)]
    assert outs == [ref.token_ids, ref.token_ids]


@pytest.mark.parametrize("body, status, words", [
    ({"model": "no-such-model", "prompt": "x"}, 404, "no-such-model"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "n": 2}, 400, "n must be 1"),
    ({"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"prompt": [[1, 2], "text", 3]}, 400, "prompt"),
    ({"prompt": [5] * 1100, "max_tokens": 4}, 400, "context of 1024"),
    ({"prompt": "x", "max_tokens": 1024}, 400, "context of 1024"),
    ({"prompt": [5, 99999]}, 400, "vocabulary"),
    ({"prompt": "x", "stop": [1, 2]}, 400, "stop"),
    ({}, 400, "prompt is required"),
])
def test_bad_requests_get_4xx_with_a_message(server, body, status, words):
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_malformed_json_and_openai_client_errors(server, client):
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "x",', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json=["not", "an", "object"], timeout=30)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=server.model, prompt="x", max_tokens=-1)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=server.model, messages=[{"role": "wizard", "content": "hi"}])
    m = server.metrics()
    assert m['klotski_http_requests_total{endpoint="completions",code="400"}'] >= 2
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # bad requests crash nothing
