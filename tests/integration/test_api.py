"""`corolla api` as a real process over a real swarm of the embedded model, driven by the official `openai` client
(and, for the raw server-sent events and a disconnect, by a plain HTTP client)."""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest
import torch

from corolla.testing.api_process import start_http_process, stop_process
from corolla.testing.local_swarm import LocalSwarm

MODEL_ID = "smollm2-135m-instruct"
PROMPT = "Name three colours."


def _start_api(tmp_path: Path, initial_peers, *extra: str) -> tuple[subprocess.Popen, str]:
    return start_http_process(tmp_path, "api", initial_peers, "--num-threads", "1", *extra)


def _stop(process: subprocess.Popen) -> None:
    stop_process(process)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("api")
    with LocalSwarm(num_servers=2) as swarm:
        process, url = _start_api(tmp_path, swarm.initial_peers, "--max-sessions", "8", "--max-waiting", "16")
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, timeout=300)
            yield client, url, swarm, tmp_path
        finally:
            _stop(process)


def _raw(url: str, method: str, path: str, body=None, raw: bytes = None) -> tuple[int, dict]:
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, payload


def test_models_lists_the_swarm_model(api):
    client, *_ = api
    assert [m.id for m in client.models.list().data] == [MODEL_ID]


def test_greedy_chat_equals_corolla_generate(api):
    client, url, swarm, _ = api
    reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": PROMPT}],
                                           temperature=0, max_tokens=12)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = subprocess.run([sys.executable, "-m", "corolla.cli.main", "generate", PROMPT, "--initial-peers",
                          *swarm.initial_peers, "--max-new-tokens", "12", "--num-threads", "1"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert reply.choices[0].message.content.strip() == cli.stdout.strip()
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_plain_and_reports_usage(api):
    client, *_ = api
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is rain?"}]
    plain = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_completions_with_echo_and_logprobs(api, llama_local, tokenizer):
    """As OpenAI's legacy API (and evaluation harnesses scoring a text with it): an echo's logprobs cover the
    prompt's tokens too, the first with none, each given the tokens before it, as the model computes them."""
    client, *_ = api
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    prompt_ids = tokenizer(prompt)["input_ids"]
    scored, generated = len(prompt_ids), reply.usage.completion_tokens
    assert reply.usage.prompt_tokens == scored and len(choice.logprobs.tokens) == scored + generated
    assert "".join(choice.logprobs.tokens[:scored]) == prompt
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.text_offset[0] == 0 and choice.logprobs.text_offset[scored] == len(prompt)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs[1:])
    with torch.no_grad():
        local = torch.log_softmax(llama_local(torch.tensor([prompt_ids])).logits[0, :-1].float(), dim=-1)
    expected = [float(local[i, token]) for i, token in enumerate(prompt_ids[1:])]
    assert choice.logprobs.token_logprobs[1:scored] == pytest.approx(expected, abs=1e-3)
    # greedy: each chosen token is the most likely one
    for token, top in zip(choice.logprobs.tokens[scored:], choice.logprobs.top_logprobs[scored:]):
        assert max(top, key=top.get) == token
    plain = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=5, temperature=0)
    assert prompt + plain.choices[0].text == choice.text
    without_echo = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    assert without_echo.choices[0].logprobs.tokens == choice.logprobs.tokens[scored:]
    assert without_echo.choices[0].logprobs.text_offset[0] == 0
    # streamed: the echo comes first, scored the same, then each token with its own
    chunks = list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    texts = [c.choices[0] for c in chunks if c.choices and c.choices[0].text]
    assert texts[0].text == prompt and "".join(t.text for t in texts) == choice.text
    assert texts[0].logprobs.tokens == choice.logprobs.tokens[:scored]
    assert texts[0].logprobs.token_logprobs == choice.logprobs.token_logprobs[:scored]
    assert [t.logprobs.tokens[0] for t in texts[1:]] == choice.logprobs.tokens[scored:]


def test_chat_logprobs_stop_sequences_seeds_and_n(api):
    client, *_ = api
    messages = [{"role": "user", "content": "Count from one to ten in words."}]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=24,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    text = reply.choices[0].message.content
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    sampled = [client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=1.0, seed=11,
                                              max_tokens=10, n=2) for _ in range(2)]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    assert len(sampled[0].choices) == 2 and [c.index for c in sampled[0].choices] == [0, 1]


def test_errors_have_openai_shape_and_status(api):
    client, url, *_ = api
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=messages)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as negative:
        client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=-1)
    assert negative.value.param == "temperature"
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        client.chat.completions.create(model=MODEL_ID, messages=messages, extra_body={"frobnicate": True})
    with pytest.raises(openai.BadRequestError) as absurd:
        client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=10**9)
    assert absurd.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.completions.create(model=MODEL_ID, prompt="word " * 9000, max_tokens=4)
    assert long_prompt.value.code == "context_length_exceeded"
    status, body = _raw(url, "POST", "/v1/chat/completions", raw=b'{"model": "x", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    status, body = _raw(url, "GET", "/v1/nothing")
    assert status == 404 and "error" in body
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    connection.request("GET", "/v1/chat/completions")
    response = connection.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "POST" and json.loads(response.read())["error"]
    connection.close()
    # and the API still serves
    assert client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=2).choices


def test_raw_server_sent_events(api):
    _, url, *_ = api
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    connection.request("POST", "/v1/completions", body=json.dumps(
        {"model": MODEL_ID, "prompt": "One, two,", "max_tokens": 4, "temperature": 0, "stream": True}),
        headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = [line for line in response.read().decode().split("\n\n") if line]
    connection.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(p["object"] == "text_completion" and p["model"] == MODEL_ID for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def _status(url):
    return _raw(url, "GET", "/api/status")[1]


def test_a_client_going_away_frees_its_session(api):
    _, url, *_ = api
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(
        {"model": MODEL_ID, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400,
         "stream": True}), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first = response.readline()
    assert first.startswith(b"data: ")
    for _ in range(6):
        response.readline()
    assert _status(url)["running"] == 1
    connection.sock.close()  # the client goes away mid-stream
    connection.close()
    deadline = time.monotonic() + 5
    while _status(url)["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _status(url)["running"] == 0


def test_many_concurrent_requests_get_answers_or_rate_limits(api):
    client, url, *_ = api

    def ask(i):
        try:
            reply = client.completions.create(model=MODEL_ID, prompt=f"Number {i}:", max_tokens=2, temperature=0)
            return "ok" if reply.choices else "empty"
        except openai.RateLimitError as exc:
            assert exc.status_code == 429 and exc.body["type"] == "rate_limit_error" if isinstance(exc.body, dict) else True
            return "limited"

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        outcomes = list(pool.map(ask, range(100)))
    assert set(outcomes) <= {"ok", "limited"} and outcomes.count("ok") >= 8 and "limited" in outcomes
    assert _status(url)["running"] == 0
    assert client.completions.create(model=MODEL_ID, prompt="Still here?", max_tokens=2).choices


def test_missing_blocks_are_named_with_503(api):
    _, _, swarm, tmp_path = api
    process, url = _start_api(tmp_path, swarm.initial_peers, "--dht-prefix", "nobody-serves-this",
                              "--wait-for-blocks", "1")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.chat.completions.create(model="nobody-serves-this", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2)
        assert unavailable.value.status_code == 503 and "blocks 0:30" in str(unavailable.value)
        with pytest.raises(openai.InternalServerError) as streamed:  # a stream's status waits for its first token
            list(client.chat.completions.create(model="nobody-serves-this", max_tokens=2, stream=True,
                                                messages=[{"role": "user", "content": "hi"}]))
        assert streamed.value.status_code == 503 and "blocks 0:30" in str(streamed.value)
    finally:
        _stop(process)


def test_the_embedded_models_short_name_is_accepted(api):
    client, *_ = api
    reply = client.completions.create(model="smollm2", prompt="Hello", max_tokens=2, temperature=0)
    assert reply.model == MODEL_ID and reply.choices


def test_a_stopped_api_ends_its_requests_at_once(api):
    """SIGTERM while one request generates a long answer and another waits for its turn: the generating one ends at
    its next token, the waiting one gives up, and the process exits (uvicorn's graceful shutdown waits for every
    open request, so a long one used to hold the process until it finished)."""
    _, _, swarm, tmp_path = api
    process, url = _start_api(tmp_path, swarm.initial_peers, "--max-sessions", "1", "--max-waiting", "1")
    parsed = urlparse(url)
    connections = []
    try:
        for _ in range(2):
            connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
            connection.request("POST", "/v1/completions", body=json.dumps(
                {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 2000, "stream": True}),
                headers={"Content-Type": "application/json"})
            connections.append(connection)
        deadline = time.monotonic() + 60
        while (status := _status(url))["running"] + status["waiting"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (status["running"], status["waiting"]) == (1, 1), status
        stopped = time.monotonic()
        process.terminate()
        assert process.wait(20) in (0, -15)  # uvicorn re-raises the signal once it has shut down
        assert time.monotonic() - stopped < 15  # 2,000 tokens each would take minutes
    finally:
        for connection in connections:
            connection.close()
        _stop(process)


def _sse_texts(url: str, path: str, body: dict) -> tuple[int, list[dict]]:
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    connection.request("POST", path, body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    raw = response.read().decode()
    connection.close()
    if response.status != 200:
        return response.status, [json.loads(raw)]
    return 200, [json.loads(e[len("data: "):]) for e in raw.split("\n\n") if e.startswith("data: {")]


def test_a_streamed_reply_ends_before_its_stop_sequence(api):
    """A stop sequence that spans tokens: the stream sends nothing of it (its beginning is held back until the next
    tokens tell), so the streamed text equals the unstreamed one."""
    client, url, *_ = api
    messages = [{"role": "user", "content": PROMPT}]
    text = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0,
                                          max_tokens=24).choices[0].message.content
    words = text.split()
    assert len(words) >= 4, text
    start = text.index(words[2])
    stop = text[start: start + len(words[2]) + 1 + len(words[3])]  # two words: several tokens
    plain = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=24,
                                           stop=stop).choices[0].message.content
    assert plain == text[:start]
    status, chunks = _sse_texts(url, "/v1/chat/completions", {"model": MODEL_ID, "messages": messages,
                                                               "temperature": 0, "max_tokens": 24, "stop": stop})
    assert status == 200
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == plain
    status, chunks = _sse_texts(url, "/v1/completions", {"model": MODEL_ID, "prompt": text[:start - 1],
                                                         "temperature": 0, "max_tokens": 8, "stop": stop[1:]})
    unstreamed = client.completions.create(model=MODEL_ID, prompt=text[:start - 1], temperature=0, max_tokens=8,
                                           stop=stop[1:]).choices[0].text
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == unstreamed


def test_malformed_requests_get_openai_errors_and_the_api_serves_on(api):
    client, url, *_ = api
    status, body = _raw(url, "POST", "/v1/chat/completions", raw=b"[" * 100000)
    assert status == 400 and "nests too deeply" in body["error"]["message"]
    lone = b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}]}' % MODEL_ID.encode()
    status, body = _raw(url, "POST", "/v1/chat/completions", raw=lone)
    assert status == 400 and body["error"]["param"] == "messages" and "surrogate" in body["error"]["message"]
    lone = b'{"model": "%s", "prompt": "hi \\udfff there"}' % MODEL_ID.encode()
    status, body = _raw(url, "POST", "/v1/completions", raw=lone)
    assert status == 400 and body["error"]["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as empty:
        client.completions.create(model=MODEL_ID, prompt="", max_tokens=2)
    assert empty.value.param == "prompt" and "empty" in str(empty.value)
    with pytest.raises(openai.BadRequestError) as options:
        client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=2, stream_options={"include_usage": True})
    assert options.value.param == "stream_options"
    status, body = _raw(url, "POST", "/v1/completions", body={"model": MODEL_ID, "prompt": "hi", "max_tokens": 2,
                                                              "stream": None, "echo": None})
    assert status == 200 and body["choices"], body  # null is "not given", as for the other options
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert client.completions.create(model=MODEL_ID, prompt="Still here?", max_tokens=2).choices


def test_offsets_and_bytes_count_characters_not_tokens(api, tokenizer):
    """Tokens that hold part of a character: the echo's text offsets stay on the characters (each token's share of
    the text, the piece that completes a character holding all of it), and chat logprobs' bytes are each token's own
    bytes, which join to the reply's UTF-8."""
    client, *_ = api
    prompt = "Café 🎉 naïve 你好 done"
    reply = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                      logprobs=1)
    logprobs, text = reply.choices[0].logprobs, reply.choices[0].text
    scored = len(tokenizer(prompt)["input_ids"])
    offsets = logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[scored] == len(prompt)
    assert text[offsets[scored - 1]: offsets[scored]] == " done"
    # tokens that hold part of a character are named by their bytes, as OpenAI names them (their text alone is
    # U+FFFD, which would also give distinct top candidates one key)
    assert "\ufffd" not in "".join(logprobs.tokens)
    assert "bytes:\\xe4\\xbd" in logprobs.tokens[:scored], logprobs.tokens[:scored]
    chat = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=12, logprobs=True,
                                          messages=[{"role": "user", "content": "Write 你好 three times."}])
    content = chat.choices[0].logprobs.content
    assert bytes(b for entry in content for b in entry.bytes).decode() == chat.choices[0].message.content
    for entry in content:
        try:
            assert entry.token == bytes(entry.bytes).decode()
        except UnicodeDecodeError:
            assert entry.token == "bytes:" + "".join(f"\\x{b:02x}" for b in entry.bytes)


def test_places_come_back_however_a_request_ends(api):
    """Clients that leave before their stream (or their answer) begins, a request for more completions than the API
    could ever run, a prompt that leaves the default max_tokens no room: the API keeps every place it has, answers
    what it can, and says what it cannot."""
    _, _, swarm, tmp_path = api
    process, url = _start_api(tmp_path, swarm.initial_peers, "--max-sessions", "1", "--max-waiting", "1",
                              "--max-context", "96")
    parsed = urlparse(url)
    try:
        def places_taken() -> int:
            status = _status(url)
            return status["running"] + status["waiting"]

        for stream in (True, False) * 4:  # each takes a place, then its client is gone before a token comes
            deadline = time.monotonic() + 30
            while places_taken():  # the one before has let go (else this test would leak nothing)
                assert time.monotonic() < deadline, _status(url)
                time.sleep(0.05)
            connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
            connection.request("POST", "/v1/completions", body=json.dumps(
                {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 30, "stream": stream}),
                headers={"Content-Type": "application/json"})
            while not places_taken():  # the API has it: now leave
                assert time.monotonic() < deadline, _status(url)
                time.sleep(0.01)
            connection.sock.close()
            connection.close()
        deadline, free = time.monotonic() + 30, 0
        while free < 3 and time.monotonic() < deadline:  # free for a while: every request seen and let go
            time.sleep(0.5)
            status = _status(url)
            free = free + 1 if status["running"] + status["waiting"] == 0 else 0
        assert free == 3, status
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=2).choices
        with pytest.raises(openai.BadRequestError) as too_many:
            client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=2, n=3)
        assert too_many.value.param == "n" and "2 waiting" not in str(too_many.value)
        messages = [{"role": "user", "content": "Write a long poem about the sea."}]
        reply = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0)
        assert reply.usage.total_tokens == 96 and reply.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError) as full:
            client.chat.completions.create(model=MODEL_ID, temperature=0,
                                           messages=[{"role": "user", "content": "the sea, " * 60}])
        assert full.value.code == "context_length_exceeded" and full.value.param == "messages"
    finally:
        _stop(process)


def test_prompts_as_token_ids_and_messages_as_parts(api, tokenizer):
    """OpenAI's other shapes of input: a completion's prompt as token ids (one list, or several), a chat message's
    content as a list of text parts; other part types and ids outside the vocabulary are refused by name."""
    client, *_ = api
    text = "The capital of France is"
    ids = tokenizer(text)["input_ids"]
    by_text = client.completions.create(model=MODEL_ID, prompt=text, max_tokens=4, temperature=0)
    by_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert by_ids.choices[0].text == text + by_text.choices[0].text
    several = client.completions.create(model=MODEL_ID, prompt=[ids, ids[:3]], max_tokens=2, temperature=0)
    assert len(several.choices) == 2 and several.usage.prompt_tokens == len(ids) + 3
    with pytest.raises(openai.BadRequestError) as outside:
        client.completions.create(model=MODEL_ID, prompt=[1, 10**9], max_tokens=2)
    assert outside.value.param == "prompt" and "1000000000" in str(outside.value)
    plain = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=6,
                                           messages=[{"role": "user", "content": "Name three colours."}])
    parts = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=6, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Name three "}, {"type": "text", "text": "colours."}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="text only"):
        client.chat.completions.create(model=MODEL_ID, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
