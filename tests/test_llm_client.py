"""The OpenAI-compatible client (connectors/llm.py) against FakeOpenAI on 127.0.0.1.

No Prefect server: the client is plain HTTP. Retries sleep through an injected recorder,
so a Retry-After of two minutes costs nothing and is still asserted.
"""

from __future__ import annotations

import email.utils
import logging
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pytest
from openai_server import OUTSIDE_LABEL, FakeOpenAI, hashed_embedding

from alflow.config.settings import ConfigError, LLMSettings, load_config
from alflow.connectors.llm import LLMClient, LLMError, LLMUsage

LABELS = ["ham", "spam"]
KEY = "sk-test-4f9a1c2e7b3d5a6f"
KEY_ENV = "ALFLOW_TEST_LLM_KEY"
SPAM = {"free": "spam", "prize": "spam"}


def make_client(server: FakeOpenAI, sleeps: list | None = None, environ: dict | None = None,
                **overrides) -> LLMClient:
    settings = LLMSettings(**{"base_url": server.base_url, "model": "fake-chat",
                              "embedding_model": "fake-embed", **overrides})
    return LLMClient(settings, environ=environ or {}, sleep=(sleeps.append if sleeps is not None else None))


@pytest.fixture
def server(openai_server):
    """The shared fixture of tests/conftest.py: "free" and "prize" are among its spam words."""
    return openai_server


def chat_bodies(server: FakeOpenAI) -> list[dict]:
    return [body for path, body, _ in server.requests if path == "/v1/chat/completions"]


# -- the wire format and the answers ----------------------------------------------------------
def test_classify_speaks_openai_chat_completions_and_reads_label_and_confidence(server):
    with make_client(server) as client:
        answers, usage = client.classify(["Claim your FREE prize now", "see you at lunch"], LABELS)
    assert [a.label for a in answers] == ["spam", "ham"]
    assert [a.status for a in answers] == ["ok", "ok"]
    assert answers[0].confidence == pytest.approx(0.9)
    np.testing.assert_allclose(answers[0].proba, [0.1, 0.9])
    np.testing.assert_allclose(answers[1].proba, [0.9, 0.1])
    body = chat_bodies(server)[0]
    assert body["model"] == "fake-chat" and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    schema = body["response_format"]
    assert schema["type"] == "json_schema" and schema["json_schema"]["strict"] is True
    assert schema["json_schema"]["schema"]["properties"]["label"]["enum"] == LABELS
    messages = sorted(body["messages"][-1]["content"] for body in chat_bodies(server))
    assert [body["messages"][-1]["role"] for body in chat_bodies(server)] == ["user", "user"]
    assert messages[0].endswith("Text:\nClaim your FREE prize now")
    assert messages[1].endswith("Text:\nsee you at lunch")
    assert "labels: ham, spam." in messages[0]
    assert usage.requests == 2 and usage.failed == usage.retried == 0
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0 and usage.seconds > 0


def test_confidence_splits_a_shared_first_token_by_the_label_s_later_tokens():
    labels = ["sci_tech", "sci_fi", "business", "world", "sports", "politics", "health"]
    with FakeOpenAI({"robot": "sci_fi"}, confident=0.7) as fake, make_client(fake) as client:
        (answer,), _ = client.classify(["a robot uprising"], labels)
    # "sci" begins two classes: 0.7 + 0.05 shared, split by p("_fi" | "sci"); the five
    # top_logprobs leave one class out, and the rest is renormalised over the classes.
    expected = np.array([0.05, 0.7, 0.05, 0.05, 0.05, 0.05, 0.0])
    expected /= expected.sum()
    assert answer.label == "sci_fi"
    np.testing.assert_allclose(answer.proba, expected, atol=1e-9)
    assert answer.confidence == pytest.approx(expected[1])


def test_confidence_when_the_label_s_first_token_also_holds_the_opening_quote():
    """Real tokenizers merge ` "` with the label's start; alternatives must share that prefix."""
    import math

    from alflow.connectors.llm import read_answer

    def token(text, p, top=()):
        return {"token": text, "logprob": math.log(p), "top_logprobs": [
            {"token": t, "logprob": math.log(q)} for t, q in top]}

    content = '{"label": "spam"}'
    tokens = [token('{"label', 1.0), token('":', 1.0),
              token(' "sp', 0.6, [(' "sp', 0.6), (' "ham', 0.3), ('"h', 0.05), (' "eggs', 0.05)]),
              token('am"}', 1.0)]
    data = {"choices": [{"message": {"content": content}, "logprobs": {"content": tokens}}]}
    answer = read_answer(data, LABELS)
    assert (answer.label, answer.status) == ("spam", "ok")
    np.testing.assert_allclose(answer.proba, [1 / 3, 2 / 3])  # '"h' lacks the space, "eggs" is no class
    garbled = {"choices": [{"message": {"content": content}, "logprobs": {"content": [{"token": None}]}}]}
    assert read_answer(garbled, LABELS).confidence is None and read_answer(garbled, LABELS).label == "spam"


def test_without_logprobs_from_the_server_the_label_has_no_confidence():
    with FakeOpenAI(SPAM, labels=LABELS, logprobs=False) as fake, make_client(fake) as client:
        (answer,), _ = client.classify(["free prize"], LABELS)
    assert (answer.label, answer.status, answer.confidence, answer.proba) == ("spam", "ok", None, None)


def test_a_server_rejecting_json_schema_gets_json_object_once_and_for_the_client_s_lifetime(caplog):
    with FakeOpenAI(SPAM, labels=LABELS, json_schema=False) as fake, \
            make_client(fake, max_concurrency=1) as client, caplog.at_level(logging.WARNING):
        first, usage = client.classify(["free prize", "hello", "lunch?"], LABELS)
        second, _ = client.classify(["prize"], LABELS)
    kinds = [body["response_format"]["type"] for body in chat_bodies(fake)]
    assert kinds == ["json_schema", "json_object", "json_object", "json_object", "json_object"]
    assert [a.label for a in first + second] == ["spam", "ham", "ham", "spam"]
    assert first[0].confidence == pytest.approx(0.9)  # logprobs still asked for and read
    assert usage.requests == 4 and usage.failed == 0
    assert client.mode == {"response_format": "json_object", "logprobs": True}
    assert len([r for r in caplog.records if "json_object" in r.getMessage()]) == 1


def test_a_server_rejecting_logprobs_is_asked_without_them():
    with FakeOpenAI(SPAM, labels=LABELS, reject_logprobs=True) as fake, make_client(fake) as client:
        answers, usage = client.classify(["free prize", "hello"], LABELS)
    assert [(a.label, a.confidence) for a in answers] == [("spam", None), ("ham", None)]
    assert client.mode == {"response_format": "json_schema", "logprobs": False}
    assert usage.failed == 0 and "logprobs" not in chat_bodies(fake)[-1]


def test_a_400_that_names_no_feature_fails_that_item_and_changes_nothing(server):
    server.fail_next(1, 400)
    with make_client(server, max_concurrency=1) as client:
        answers, usage = client.classify(["a very long text", "free prize"], LABELS)
    assert answers[0].status == "failed" and answers[0].reason == "HTTP 400 on /chat/completions: scripted fault 400"
    assert answers[1].label == "spam" and answers[1].confidence == pytest.approx(0.9)
    assert client.mode == {"response_format": "json_schema", "logprobs": True}
    assert (usage.requests, usage.failed) == (2, 1)


def test_outside_and_malformed_answers_are_counted_and_never_a_label(server):
    server.outside_next(1)
    server.malformed_next(1)
    server.reply_next('{"label": "eggs"}', "Spam", '"ham"', '{"answer": "spam"}', "[1, 2]", "{not json")
    with make_client(server, max_concurrency=1) as client:
        answers, usage = client.classify([f"text {i}" for i in range(8)], LABELS)
    got = [(a.label, a.status) for a in answers]
    # replies are served before the scripted outside/malformed answers
    assert got == [(None, "outside"), ("spam", "ok"), ("ham", "ok"), (None, "malformed"), (None, "malformed"),
                   (None, "malformed"), (None, "malformed"), (None, "outside")]
    assert OUTSIDE_LABEL not in [a.label for a in answers]
    assert (usage.outside, usage.malformed, usage.failed) == (2, 4, 0)


# -- faults ---------------------------------------------------------------------------------------
def test_429_waits_its_retry_after_in_seconds_or_as_an_http_date(server):
    sleeps: list[float] = []
    server.fail_next(1, 429, retry_after=7)
    server.fail_next(1, 429, retry_after=email.utils.formatdate(time.time() + 30, usegmt=True))
    with make_client(server, sleeps, max_concurrency=1) as client:
        answers, usage = client.classify(["free prize"], LABELS)
    assert answers[0].label == "spam"
    assert sleeps[0] == 7 and 25 <= sleeps[1] <= 30
    assert (usage.requests, usage.retried, usage.failed) == (3, 2, 0)


def test_a_retry_after_past_the_cap_fails_that_request_with_one_line_naming_the_wait(server):
    sleeps: list[float] = []
    server.fail_next(1, 429, retry_after=120)
    with make_client(server, sleeps, max_concurrency=1, max_retry_after_seconds=60) as client:
        answers, usage = client.classify(["free prize", "hello"], LABELS)
    assert answers[0].status == "failed" and answers[0].label is None
    assert answers[0].reason == ("HTTP 429 on /chat/completions asked to wait 120 s (Retry-After), more than "
                                 "max_retry_after_seconds = 60")
    assert answers[1].label == "ham"  # one failed request does not stop the others
    assert sleeps == [] and usage.failed == 1 and usage.reasons == {answers[0].reason: 1}


def test_5xx_is_retried_with_backoff_then_fails_the_item(server):
    sleeps: list[float] = []
    with make_client(server, sleeps, max_concurrency=1, retries=2, retry_wait_seconds=0.5) as client:
        server.fail_next(2, 503)
        passed, usage = client.classify(["free prize"], LABELS)
        server.fail_next(3, 500)
        failed, more = client.classify(["hello"], LABELS)
    assert passed[0].label == "spam" and (usage.requests, usage.retried, usage.failed) == (3, 2, 0)
    assert failed[0].status == "failed" and failed[0].reason == "HTTP 500 on /chat/completions after 2 retries"
    assert (more.requests, more.retried, more.failed) == (3, 2, 1)
    assert sleeps == [0.5, 1.0, 0.5, 1.0]


def test_a_timeout_is_retried_then_fails_the_item(server):
    server.delay = 0.4
    with make_client(server, [], timeout_seconds=0.1, retries=1) as client:
        answers, usage = client.classify(["free prize"], LABELS)
    assert answers[0].status == "failed"
    assert answers[0].reason == "timed out after 0.1 s on /chat/completions after 1 retry"
    assert usage.requests == 2


def test_connection_refused_fails_the_whole_call_with_one_line(server):
    base_url = server.base_url
    server.down()
    with make_client(server, environ={KEY_ENV: KEY}, api_key_env=KEY_ENV) as client, \
            pytest.raises(LLMError) as caught:
        client.classify(["free prize", "hello"], LABELS)
    assert str(caught.value) == f"LLM endpoint {base_url}: cannot connect (connection refused)"
    assert caught.value.usage.failed == 2 and caught.value.usage.requests >= 1


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_fails_the_whole_call_without_sending_more(server, status):
    server.fail_next(1, status)
    with make_client(server, [], max_concurrency=1) as client, pytest.raises(LLMError) as caught:
        client.classify(["a", "b", "c", "d"], LABELS)
    assert str(caught.value) == (f"LLM endpoint {server.base_url}: HTTP {status} on /chat/completions: the endpoint "
                                 "refused the key (no key is configured: set api_key_env or api_key_secret)")
    assert len(server.requests) == 1
    assert (caught.value.usage.requests, caught.value.usage.failed) == (1, 4)


def test_an_unknown_model_fails_the_whole_call_naming_it():
    with FakeOpenAI(SPAM, labels=LABELS, models={"llama3.1:8b"}) as fake, \
            make_client(fake, model="llama3:70b") as client, pytest.raises(LLMError) as caught:
        client.classify(["x"], LABELS)
    assert str(caught.value) == (f"LLM endpoint {fake.base_url}: HTTP 404 on /chat/completions: model "
                                 "'llama3:70b' not found")


def test_requests_in_flight_never_exceed_max_concurrency(server):
    server.delay = 0.1
    with make_client(server, max_concurrency=3) as client:
        answers, _ = client.classify([f"text {i}" for i in range(9)], LABELS)
    assert len(answers) == 9 and 2 <= server.max_in_flight <= 3


# -- the key ----------------------------------------------------------------------------------------
def test_the_key_is_sent_as_bearer_and_never_in_logs_errors_repr_or_lineage(caplog):
    with FakeOpenAI(SPAM, labels=LABELS, api_key=KEY) as fake, caplog.at_level(logging.DEBUG):
        with make_client(fake, [], environ={KEY_ENV: KEY}, api_key_env=KEY_ENV) as client:
            fake.fail_next(1, 500)
            answers, _ = client.classify(["free prize"], LABELS)
            vectors, _ = client.embed(["free prize"])
            fake.fail_next(1, 429, retry_after=999)
            failed, _ = client.classify(["hello"], LABELS)
            seen = [repr(client), str(client.lineage), repr(client.settings), failed[0].reason]
        wrong = "sk-wrong-0000000000000000"
        with make_client(fake, environ={KEY_ENV: wrong}, api_key_env=KEY_ENV) as client, \
                pytest.raises(LLMError) as caught:
            client.classify(["x"], LABELS)  # the server's 401 message quotes the key it got
    assert answers[0].label == "spam" and vectors.shape == (1, 64)
    assert {headers["authorization"] for _, _, headers in fake.requests} == {f"Bearer {KEY}", f"Bearer {wrong}"}
    assert "api_key_env = ALFLOW_TEST_LLM_KEY" in str(caught.value)
    assert caplog.records  # the retries and httpx's requests were logged
    for text in [caplog.text, *seen, str(caught.value)]:
        assert KEY not in text and wrong not in text


def test_the_key_from_a_prefect_secret_block_and_an_unreadable_one(monkeypatch):
    from prefect.blocks.system import Secret

    def load(name, **_):
        if name != "llm-key":
            raise ValueError(f"Unable to find block document named {name}")
        return SimpleNamespace(get=lambda: KEY)

    monkeypatch.setattr(Secret, "load", load)
    with FakeOpenAI(SPAM, labels=LABELS, api_key=KEY) as fake:
        with make_client(fake, api_key_secret="llm-key") as client:
            (answer,), _ = client.classify(["free prize"], LABELS)
        with make_client(fake, api_key_secret="other-key") as client, pytest.raises(LLMError) as caught:
            client.classify(["free prize"], LABELS)
        with make_client(fake, api_key_env=KEY_ENV) as client, pytest.raises(LLMError) as unset:
            client.embed(["free prize"])
    assert answer.label == "spam"
    assert str(caught.value) == (f"LLM endpoint {fake.base_url}: cannot read the Prefect Secret block "
                                 "'other-key' (api_key_secret): ValueError")
    assert str(unset.value) == (f"LLM endpoint {fake.base_url}: the environment variable {KEY_ENV} "
                                "(api_key_env) is not set")
    assert len(fake.requests) == 1  # an unreadable key fails before any request


# -- embeddings ---------------------------------------------------------------------------------------
def test_a_long_text_is_sent_up_to_max_text_chars_in_prompts_and_embeddings(server):
    """A whole article would overflow a local model's context and fail the item: the
    prompt and the embedding input carry its first max_text_chars characters, and the
    limit is part of the prompt's lineage."""
    article = "free prize " + "word " * 5000
    with make_client(server, max_text_chars=300) as client:
        answers, _ = client.classify([article], LABELS)
        client.embed([article, "short"])
        short_hash = client.prompt_hash
    assert answers[0].label == "spam"
    assert chat_bodies(server)[0]["messages"][-1]["content"].endswith("Text:\n" + article[:300])
    [embedded] = [body for path, body, _ in server.requests if path == "/v1/embeddings"]
    assert embedded["input"] == [article[:300], "short"]
    with make_client(server) as client:
        assert client.prompt_hash != short_hash


def test_embeddings_are_batched_ordered_by_index_and_normalised(server):
    texts = [f"message number {i} about prize {i % 3}" for i in range(10)] + [""]
    with make_client(server, embedding_batch_size=4, max_concurrency=2) as client:
        vectors, usage = client.embed(texts)
    batches = [body for path, body, _ in server.requests if path == "/v1/embeddings"]
    assert sorted(len(body["input"]) for body in batches) == [3, 4, 4]
    assert {body["model"] for body in batches} == {"fake-embed"}
    assert vectors.dtype == np.float32 and vectors.shape == (11, 64)
    expected = np.array([hashed_embedding(t, 64) for t in texts])
    np.testing.assert_allclose(vectors, expected, atol=1e-5)  # the fake answers each batch reversed
    np.testing.assert_allclose(np.linalg.norm(vectors[:10], axis=1), 1.0, atol=1e-6)
    assert not vectors[10].any()  # a text without words: a zero row, not NaN
    assert (usage.requests, usage.failed) == (3, 0) and usage.prompt_tokens > 0
    assert usage.completion_tokens is None


def test_an_embedding_batch_that_fails_fails_the_call_naming_it(server):
    server.fail_next(1, 500)
    with make_client(server, [], embedding_batch_size=2, max_concurrency=1, retries=0) as client, \
            pytest.raises(LLMError) as caught:
        client.embed(["a", "b", "c"], model="nomic-embed-text")
    assert str(caught.value) == (f"LLM endpoint {server.base_url}: embeddings of items 0-1 (batch 1 of 2) failed: "
                                 "HTTP 500 on /embeddings after 0 retries")
    assert len(server.requests) == 1 and server.requests[0][1]["model"] == "nomic-embed-text"
    assert (caught.value.usage.requests, caught.value.usage.failed) == (1, 2)  # the batch not sent too


def test_no_model_for_the_call_is_one_line(server):
    with make_client(server, model=None) as client, pytest.raises(LLMError, match="set \\[llm\\] model$"):
        client.classify(["x"], LABELS)
    with make_client(server, embedding_model=None) as client, \
            pytest.raises(LLMError, match="set \\[llm\\] embedding_model$"):
        client.embed(["x"])
    with make_client(server) as client, pytest.raises(ValueError, match="^labels must be two or more distinct"):
        client.classify(["x"], ["ham", "ham"])
    assert server.requests == []


# -- settings and lineage --------------------------------------------------------------------------
def test_from_settings_is_off_without_base_url_and_the_prompt_hash_is_the_prompt_s(tmp_path, server):
    config = tmp_path / "alflow.toml"
    config.write_text('labels = ["ham", "spam"]\n', encoding="utf-8")
    assert LLMClient.from_settings(load_config(config, environ={})) is None
    settings = load_config(config, environ={"ALFLOW_LLM__BASE_URL": server.base_url,
                                            "ALFLOW_LLM__MODEL": "llama3.1:8b"})
    assert settings.llm.second_opinion is True and settings.llm.weak_label_confidence is None
    with LLMClient.from_settings(settings) as client:
        assert client.lineage == {"base_url": server.base_url, "model": "llama3.1:8b",
                                  "prompt_hash": client.prompt_hash}
        assert client.prompt_hash == client.prompt_hash_for(LABELS) != client.prompt_hash_for(["a", "b"])
        described = settings.llm.model_copy(update={"label_descriptions": {"spam": "ads"}})
        assert LLMClient(described, labels=LABELS).prompt_hash != client.prompt_hash


@pytest.mark.parametrize("toml, message", [
    ('base_url = "localhost:11434/v1"\nmodel = "m"',
     'llm.base_url: must be an http(s) URL like "http://localhost:11434/v1" (got \'localhost:11434/v1\')'),
    ('base_url = "http://localhost:11434/v1"',
     "llm.model: base_url is set but neither model nor embedding_model is"),
    ('api_key_env = "sk-live-abc123"', "llm.api_key_env: must be the NAME of an environment variable"),
    ('api_key_env = "OPENAI_API_KEY"\napi_key_secret = "llm-key"',
     "llm.api_key_secret: set at most one of api_key_env and api_key_secret"),
    ('prompt = "Label this: {labels}"', "llm.prompt: needs the placeholders {labels} and {text}; {text} missing"),
    ('label_descriptions = { eggs = "breakfast" }', "llm.label_descriptions.eggs: is not one of labels"),
    ('label_descriptions = { spam = "ads\\nand more" }', "llm.label_descriptions.spam: must be one non-empty line"),
    ("max_concurrency = 0", "llm.max_concurrency: Input should be greater than or equal to 1"),
    ('embedding_model = "e"\nbase_url = "http://h/v1"\nsecond_opinion = true',
     "llm.second_opinion: needs [llm] model"),
    ("colour = 1", "llm.colour: unknown key"),
])
def test_a_bad_llm_setting_is_one_line_naming_the_key(tmp_path, toml, message):
    config = tmp_path / "alflow.toml"
    config.write_text('labels = ["ham", "spam"]\n\n[llm]\n' + textwrap.dedent(toml) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"{config}: {message}")
    assert "sk-live-abc123" not in line


def test_usage_adds_up_with_tokens_none_when_no_server_gave_them():
    a = LLMUsage(requests=2, failed=1, prompt_tokens=None, seconds=1.0, reasons={"x": 1})
    b = LLMUsage(requests=3, retried=1, prompt_tokens=10, completion_tokens=None, seconds=0.5, reasons={"x": 2})
    total = a + b
    assert total.as_dict() == {"requests": 5, "failed": 1, "retried": 1, "outside": 0, "malformed": 0,
                               "prompt_tokens": 10, "completion_tokens": None, "seconds": 1.5}
    assert total.reasons == {"x": 3}


def test_items_failing_in_a_row_end_the_call_as_an_unusable_endpoint(server):
    server.fail_next(100, 503)
    with make_client(server, [], max_concurrency=1, retries=1) as client, pytest.raises(LLMError) as caught:
        client.classify([f"text {i}" for i in range(40)], LABELS)
    assert str(caught.value) == (f"LLM endpoint {server.base_url}: 5 items in a row had no answer (the last: "
                                 "HTTP 503 on /chat/completions after 1 retry)")
    assert len(server.requests) == 10  # 5 items, each tried twice; the other 35 never sent
    assert (caught.value.usage.requests, caught.value.usage.failed) == (10, 40)
