"""`simone serve` fuzzed: schemathesis drives a live server from the API's own OpenAPI schema,
and hypothesis posts arbitrary JSON bodies to both endpoints. No answer is a 5xx, every
error is OpenAI-shaped JSON, and the server still answers /health afterwards."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from simone.inference.load import load_model  # noqa: E402
from simone.inference.serve import ServeLimits, create_api_app, start_background_server  # noqa: E402
from test_serve import make_model_dir  # noqa: E402

MODEL = "tiny-model"
# small enough that a valid request generates a few dozen tokens at most: fast examples
LIMITS = ServeLimits(max_queue=4, max_request_tokens=128, max_body_bytes=64 * 1024)
REFUSED_UNLESS_NEUTRAL = ["echo", "best_of", "suffix", "logit_bias", "presence_penalty", "frequency_penalty",
                          "tools", "tool_choice", "functions", "function_call", "response_format"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(make_model_dir(tmp_path_factory.mktemp("serve-fuzz")), device="cpu")


@pytest.fixture(scope="module")
def fuzzed_server(loaded):
    server = start_background_server(loaded, limits=LIMITS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    # The server publishes no /openapi.json (openapi_url=None: clients need none, and it
    # would be one more thing to answer). The schema is generated in-process from the very
    # app the live server runs; the fuzzer then talks to that server over loopback.
    raw = fuzzed_server.server.config.app.openapi()
    # What the schema cannot say, so that valid cases reach the model instead of a 400: the
    # one model id served and the context window are known only at run time, the prompt or
    # messages are checked by hand (so optional to pydantic), and the fields refused unless
    # neutral (echo, logit_bias, tools, ...) are left out. Other model ids, token counts and
    # fields are still sent: by the negative cases and by the test below.
    raw["paths"]["/v1/models/{model_id}"]["get"]["parameters"][0]["schema"] = {"type": "string", "enum": [MODEL]}
    for request, text in [("CompletionRequest", "prompt"), ("ChatRequest", "messages")]:
        raw["components"]["schemas"][request]["required"] = ["model", text]
        fields = raw["components"]["schemas"][request]["properties"]
        fields["model"] = {"type": "string", "enum": [MODEL]}
        for name in ("max_tokens", "max_completion_tokens"):
            if name in fields:
                fields[name] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 16}, {"type": "null"}]}
        for name in REFUSED_UNLESS_NEUTRAL:
            fields.pop(name, None)
    return schemathesis.openapi.from_dict(raw)


def assert_openai_error(status: int, content_type: str, body: bytes) -> None:
    assert status < 500, body[:300]
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type)
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err


def test_the_api_from_its_schema_never_fails_and_errors_are_openai_shaped(api_schema, fuzzed_server):
    # `schemathesis.pytest.from_fixture` + `parametrize` is the documented way to fuzz a schema
    # that a fixture builds, but schemathesis 4.32 sets `Function._nodeid`, which pytest 9 no
    # longer has; its hypothesis strategies do the same generation without the pytest plugin.
    base_url = fuzzed_server.url.removesuffix("/v1")
    cases = st.one_of(api_schema.as_strategy(GenerationMode.POSITIVE), api_schema.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def answers_every_case(case):
        response = case.call(base_url=base_url, timeout=30)
        case.validate_response(response, checks=[not_a_server_error])
        content_type = response.headers.get("content-type", [""])[0]  # schemathesis: each header a list
        assert_openai_error(response.status_code, content_type, response.content)

    answers_every_case()


def test_the_fuzzed_server_still_answers_health(fuzzed_server):
    r = httpx.get(fuzzed_server.url.removesuffix("/v1") + "/health", timeout=5)
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": MODEL, "waiting": 0}


# ----------------------------------------------------------------------------- any JSON at the validators

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
# Near misses find the bugs: the right field names and shapes, often valid, sometimes any
# JSON, and few enough fields at once that a body gets past the first check to the next.
text_parts = st.lists(st.fixed_dictionaries({"type": st.just("text") | json_values, "text": st.text() | json_values}))
messages = st.lists(st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | json_values,
    "content": st.text(max_size=30) | text_parts | json_values,
}) | json_values, max_size=3) | json_values
token_ids = st.lists(st.integers(-5, 400), max_size=8)
prompts = (st.text(max_size=40) | st.lists(st.text(max_size=10), max_size=3) | token_ids
           | st.lists(token_ids, max_size=3) | json_values)
numbers = st.integers(-3, 70) | st.floats(-1, 3) | st.floats(0, 1e-300) | json_values
OTHER_FIELDS = {
    **{name: numbers for name in ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
                                  "seed", "logprobs", "top_logprobs", "best_of", "presence_penalty"]},
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | json_values,
    "stream": st.booleans() | json_values, "stream_options": st.fixed_dictionaries({"include_usage": json_values}),
    **{name: json_values for name in ["echo", "logit_bias", "tools", "response_format", "user"]},
}


def body_with(text_field: str, text_values):
    some_fields = st.lists(st.sampled_from(sorted(OTHER_FIELDS)), max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({name: OTHER_FIELDS[name] for name in names}))
    required = st.fixed_dictionaries({"model": st.just(MODEL), text_field: text_values})  # other models: below
    return st.tuples(required, some_fields).map(lambda parts: {**parts[0], **parts[1]})


requests = (st.tuples(st.just("/v1/completions"), body_with("prompt", prompts))
            | st.tuples(st.just("/v1/chat/completions"), body_with("messages", messages))
            | st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), json_values))


@pytest.fixture(scope="module")
def app_client(loaded):
    with TestClient(create_api_app(loaded, limits=LIMITS), base_url="http://127.0.0.1") as client:
        yield client


@settings(max_examples=600, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_the_request_validators_answer_any_json_with_a_2xx_or_a_4xx(app_client, request):
    path, body = request
    r = app_client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400, 404), (r.status_code, r.text[:300])
    assert_openai_error(r.status_code, r.headers["content-type"], r.content)
