"""The server's parts without a server: the engine's per-step hook, stream deltas and stop strings, the
OpenAI field mapping, the chat template, metrics text, and ``klotski serve`` without the serve extra."""
import sys

import pytest

from klotski import SamplingParams
from klotski.demo import ASSET_DIR
from klotski.serve.decoding import SequenceText
from klotski.serve.protocol import ProtocolError, parse_completion
from klotski.tokenizer import Tokenizer

PROMPT = "def main():\n    "


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(ASSET_DIR)


def test_on_tokens_hook_streams_finishes_and_stops_rows(reference_llm):
    sp = [SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=0, max_tokens=3),
          SamplingParams(temperature=0, max_tokens=6)]
    prompts = [PROMPT, "# Copyright", "    return self."]
    plain = reference_llm.generate(prompts, sp)
    seen, finished = {0: [], 1: [], 2: []}, {}

    def hook(tokens, done):
        for i, t in tokens.items():
            seen[i].append(t)
        finished.update(done)
        return [2] if len(seen[2]) == 2 else None  # row 2 stopped after its second token

    out = reference_llm.generate(prompts, sp, on_tokens=hook)
    assert [o.token_ids for o in out[:2]] == [o.token_ids for o in plain[:2]]  # the others are unaffected
    assert out[2].token_ids == plain[2].token_ids[:2]
    assert seen == {i: o.token_ids for i, o in enumerate(out)}
    assert finished == {0: "length", 1: "length"}  # row 2 was stopped, not finished


def test_stream_deltas_hold_back_partial_characters_and_stop_prefixes(tokenizer):
    ids = tokenizer.encode("héllo wörld, the end", add_special_tokens=False)
    text = SequenceText(tokenizer, stop=("the end",))
    deltas = []
    for n in range(1, len(ids) + 1):
        if text.update(ids[:n]):
            break
        d = text.delta()
        assert "\ufffd" not in d
        deltas.append(d)
    assert text.stopped and text.text == "héllo wörld, "
    deltas.append(text.delta(final=True))
    assert "".join(deltas) == "héllo wörld, "
    plain = SequenceText(tokenizer)
    plain.update(ids)
    assert plain.delta() == "héllo wörld, the end" and not plain.stopped


def test_openai_fields_map_to_sampling_params(tokenizer):
    req = parse_completion({"prompt": "x", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                            "stop": "\n\n", "stop_token_ids": [1, 5], "top_k": 4, "stream": True,
                            "stream_options": {"include_usage": True}, "user": "ignored"}, tokenizer)
    assert req.params == SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop_token_ids=[1, 5],
                                        top_k=4)
    assert req.stop == ("\n\n",) and req.stream and req.include_usage
    assert req.prompts == [tokenizer.encode("x")]
    assert parse_completion({"prompt": "x"}, tokenizer).params.max_tokens == 16
    for body, words in [({"prompt": "x", "n": 3}, "n must be 1"), ({"prompt": "x", "top_p": 0}, "top_p"),
                        ({"prompt": "x", "stream": "yes"}, "stream"), ({"prompt": "x", "seed": 1.5}, "seed"),
                        ({"prompt": []}, "prompt"), ({"prompt": "x", "stop": [""]}, "empty")]:
        with pytest.raises(ProtocolError, match=words):
            parse_completion(body, tokenizer)


def test_chat_template_from_tokenizer_config(chat_model_dir, tmp_path):
    pytest.importorskip("jinja2")
    from klotski.serve.chat import ChatTemplate

    tpl = ChatTemplate.from_model_dir(chat_model_dir)
    assert tpl.render([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) == \
        "<s><|user|>\nhi\n<|assistant|>\n"
    with pytest.raises(ProtocolError, match="role"):
        tpl.render([{"role": "robot", "content": "hi"}])
    assert ChatTemplate.from_model_dir(ASSET_DIR) is None  # no tokenizer_config.json
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ raise_exception('no') }}{% endfor %}")
    with pytest.raises(ProtocolError, match="refused the messages: no"):
        ChatTemplate.from_model_dir(str(tmp_path)).render([{"role": "user", "content": "hi"}])


def test_metrics_text_is_prometheus_format():
    from klotski.serve.metrics import ServerMetrics

    m = ServerMetrics()
    m.record_group(3, 12, 30, 0.5, {"bytes_disk_read": 4096, "weights_per_tier": {"gpu": 10, "disk": 20}})
    m.count_http("completions", 200)
    text = m.render(queued=2, running=3, group_capacity=8)
    assert 'klotski_http_requests_total{endpoint="completions",code="200"} 1' in text
    assert 'klotski_bytes_moved_total{kind="disk_read"} 4096' in text
    assert 'klotski_weight_bytes{tier="disk"} 20' in text
    assert 'klotski_batch_group_size_bucket{le="2"} 0' in text and 'klotski_batch_group_size_bucket{le="4"} 1' in text
    assert "klotski_requests_queued 2" in text and "klotski_generation_tokens_per_second 60.0" in text


def test_serve_without_the_extra_is_a_one_line_error(monkeypatch, capsys):
    from klotski.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert main(["serve", "--model", ASSET_DIR]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "klotski[serve]"' in err and "fastapi" in err


def test_import_klotski_does_not_import_fastapi():
    import subprocess

    code = "import klotski, klotski.cli, klotski.cli.serve, sys; print('fastapi' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


class _BudgetLLM:
    """An engine that refuses groups larger than ``limit`` (as a BudgetError would) and otherwise generates
    ``prompt[0] + step`` until each sequence's max_tokens."""

    def __init__(self, limit: int, group: int = 4):
        from klotski.engine import RunMetrics

        self.limit, self.max_num_seqs, self.calls = limit, group, []
        self.tokenizer, self.metrics = Tokenizer(ASSET_DIR), RunMetrics()

    def generate(self, prompt_token_ids, sampling_params, on_tokens):
        self.calls.append(len(prompt_token_ids))
        if len(prompt_token_ids) > self.limit:
            raise ValueError(f"budget exceeded by {len(prompt_token_ids)} sequences")
        live = set(range(len(prompt_token_ids)))
        for step in range(max(p.max_tokens for p in sampling_params)):
            tokens = {i: prompt_token_ids[i][0] + step for i in live}
            done = {i: "length" for i in live if step + 1 >= sampling_params[i].max_tokens}
            live -= set(done) | set(on_tokens(tokens, done) or ())
            if not live:
                break


def _collect_events(worker, prompts, max_tokens=3):
    import threading

    from klotski.serve.batcher import Sequence

    done, events = threading.Event(), {}

    def emitter(i):
        def emit(event):
            events.setdefault(i, []).append(event)
            if len([e for evs in events.values() for e in evs if e["type"] != "delta"]) == len(prompts):
                done.set()
        return emit

    seqs = [Sequence([p], SamplingParams(max_tokens=max_tokens), emitter(i)) for i, p in enumerate(prompts)]
    worker.submit(seqs)
    return seqs, events, done


def test_a_group_the_budget_refuses_is_served_in_halves():
    from klotski.serve.batcher import EngineWorker

    llm = _BudgetLLM(limit=2)
    worker = EngineWorker(llm, max_wait_s=5.0)  # the 4 arrive together: one group of 4 is tried first
    _, events, done = _collect_events(worker, [10, 20, 30, 40])
    worker.start()
    try:
        assert done.wait(30)
    finally:
        worker.stop()
    assert llm.calls == [4, 2, 2]
    assert {i: evs[-1]["token_ids"] for i, evs in events.items()} == {i: [p, p + 1, p + 2] for i, p in
                                                                     enumerate([10, 20, 30, 40])}
    assert worker.metrics.snapshot()["group_sizes"] == {2: 2}


def test_a_request_no_group_can_serve_fails_alone_with_400():
    from klotski.serve.batcher import EngineWorker

    llm = _BudgetLLM(limit=0, group=2)
    worker = EngineWorker(llm, max_wait_s=5.0)
    _, events, done = _collect_events(worker, [10, 20])
    worker.start()
    try:
        assert done.wait(30)
    finally:
        worker.stop()
    assert [evs[-1]["type"] for evs in events.values()] == ["error", "error"]
    assert events[0][-1]["status"] == 400 and "budget exceeded by 1" in events[0][-1]["message"]


def test_full_queue_and_cancel_before_admission():
    from klotski.serve.batcher import EngineWorker, Rejected, Sequence

    worker = EngineWorker(_BudgetLLM(limit=4), max_queue=2)  # not started: everything stays queued
    seqs = [Sequence([i], SamplingParams(max_tokens=1), lambda e: None) for i in range(2)]
    worker.submit(seqs)
    with pytest.raises(Rejected, match="queue is full") as e:
        worker.submit([Sequence([9], SamplingParams(max_tokens=1), lambda e: None)])
    assert e.value.status == 429
    worker.cancel(seqs[0])
    assert worker.queued == 1 and worker.metrics.snapshot()["cancelled"] == 1
    worker.start()
    worker.stop()
    assert not worker.alive
