"""API keys: sources, matching, the 401 middleware (app never reached), log redaction."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from deployments.auth import (
    REDACTED,
    APIKeyMiddleware,
    ApiKeys,
    AuthConfigError,
    AuthSettings,
    bearer_token,
    install_log_redaction,
)

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test-0123456789abcdef"
OTHER = "sk-other-key-42"


# ------------------------------------------------------------- sources


def test_no_source_means_auth_off():
    keys = AuthSettings().load(environ={})
    assert not keys.enabled and len(keys) == 0


def test_keys_from_list_file_and_env(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text(f"# team keys\n{OTHER}\n\n  k-from-file-2  # trailing comment\n")
    s = AuthSettings(api_keys=[KEY], api_keys_file=str(f), api_keys_env="MY_KEYS")
    keys = s.load(environ={"MY_KEYS": "env-key-1, env-key-2\nenv-key-3"})
    assert len(keys) == 6
    for k in (KEY, OTHER, "k-from-file-2", "env-key-1", "env-key-2", "env-key-3"):
        assert keys.matches(k), k
    assert not keys.matches("# team keys") and not keys.matches("")


def test_default_env_variable_turns_auth_on():
    assert AuthSettings().load(environ={"CBSERVE_API_KEYS": KEY}).matches(KEY)
    assert not AuthSettings(api_keys_env=None).load(environ={"CBSERVE_API_KEYS": KEY}).enabled


def test_broken_sources_fail_closed(tmp_path):
    with pytest.raises(AuthConfigError, match="cannot be read"):
        AuthSettings(api_keys_file=str(tmp_path / "missing")).load(environ={})
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(AuthConfigError, match="holds no key"):
        AuthSettings(api_keys_file=str(empty)).load(environ={})
    with pytest.raises(ValidationError):
        AuthSettings(api_keys=["has space"])
    with pytest.raises(ValidationError):
        AuthSettings(api_keys=["**********"])  # what a SecretStr becomes in a JSON dump
    with pytest.raises(ValidationError):
        AuthSettings(api_key=[KEY])  # unknown field


def test_keys_are_never_in_reprs_or_dumps():
    s = AuthSettings(api_keys=[KEY])
    assert KEY not in repr(s) and KEY not in str(s) and KEY not in s.model_dump_json()
    keys = s.load(environ={})
    assert KEY not in repr(keys)
    # A dict dump keeps SecretStr values, so settings survive model_dump -> model_validate (Serve's bind).
    again = AuthSettings.model_validate(s.model_dump())
    assert again.load(environ={}).matches(KEY)


def test_matching_is_exact():
    keys = ApiKeys([KEY, OTHER])
    assert keys.matches(KEY) and keys.matches(OTHER.encode())
    for near in (KEY[:-1], KEY + "x", KEY.upper(), " " + KEY, KEY[:-1] + "g", ""):
        assert not keys.matches(near), near


@pytest.mark.parametrize(
    ("headers", "token", "why"),
    [
        ([(b"authorization", b"Bearer abc")], b"abc", None),
        ([(b"Authorization", b"bearer   abc ")], b"abc", None),
        ([], None, "missing"),
        ([(b"authorization", b"Basic abc")], None, "not a bearer token"),
        ([(b"authorization", b"Bearer")], None, "not a bearer token"),
        ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")], None, "several Authorization headers"),
    ],
)
def test_bearer_token_parsing(headers, token, why):
    assert bearer_token(headers) == (token, why)


# ------------------------------------------------------------- middleware


@pytest.fixture
def api():
    calls: list[str] = []
    rejected: list = []
    app = FastAPI()

    @app.get("/health")
    async def health():
        calls.append("/health")
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions():
        calls.append("/v1/completions")
        return {"ok": True}

    app.add_middleware(
        APIKeyMiddleware, keys=ApiKeys([KEY]), open_paths=("/health",), on_reject=lambda p, s: rejected.append((p, s))
    )
    return app, calls, rejected


async def test_missing_or_wrong_key_is_401_and_never_reaches_the_app(api, caplog):
    app, calls, rejected = api
    caplog.set_level(logging.DEBUG)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        cases = [
            {},
            {"Authorization": f"Bearer {OTHER}"},
            {"Authorization": f"Bearer {KEY}x"},
            {"Authorization": f"Basic {KEY}"},
            {"Authorization": KEY},
        ]
        for headers in cases:
            r = await http.post("/v1/completions", json={}, headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["www-authenticate"] == "Bearer"
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
            assert KEY not in r.text and OTHER not in r.text  # never echoed
        r = await http.get("/v1/models")  # unknown routes too: no probing without a key
        assert r.status_code == 401
        assert calls == []
        assert len(rejected) == 6 and all(s == 401 for _, s in rejected)

        ok = await http.post("/v1/completions", json={}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and calls == ["/v1/completions"]
        h = await http.get("/health")  # stays open
        assert h.status_code == 200 and calls[-1] == "/health"
    assert KEY not in caplog.text and OTHER not in caplog.text


async def test_no_keys_configured_lets_everything_through():
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions():
        return {"ok": True}

    app.add_middleware(APIKeyMiddleware, keys=ApiKeys([]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.post("/v1/completions")).status_code == 200


# ------------------------------------------------------------- logs


def test_log_redaction_masks_keys_and_bearer_tokens(caplog):
    keys = ApiKeys([KEY])
    lg = logging.getLogger("cbserve.test.auth")
    flt = install_log_redaction(keys, loggers=("cbserve.test.auth",))
    try:
        caplog.set_level(logging.INFO, logger="cbserve.test.auth")
        lg.info("client sent %s in a header", KEY)
        lg.info("headers: {'authorization': 'Bearer some-unknown-token'}")
        lg.info("nothing secret here")
        messages = [r.getMessage() for r in caplog.records]
        assert KEY not in caplog.text and "some-unknown-token" not in caplog.text
        assert messages == [
            f"client sent {REDACTED} in a header",
            f"headers: {{'authorization': 'Bearer {REDACTED}'}}",
            "nothing secret here",
        ]
        assert install_log_redaction(keys, loggers=("cbserve.test.auth",)) is not flt
        assert sum(f is flt for f in lg.filters) == 1
    finally:
        for f in list(lg.filters):
            lg.removeFilter(f)


def test_log_redaction_masks_keys_in_tracebacks(caplog):
    keys = ApiKeys([KEY])
    lg = logging.getLogger("cbserve.test.auth.tb")
    install_log_redaction(keys, loggers=("cbserve.test.auth.tb",))
    try:
        caplog.set_level(logging.INFO, logger="cbserve.test.auth.tb")
        try:
            raise ValueError(f"bad header Authorization: Bearer {KEY}")
        except ValueError:
            lg.exception("request failed")
        assert "ValueError" in caplog.text and "request failed" in caplog.text
        assert KEY not in caplog.text and REDACTED in caplog.text
    finally:
        for f in list(lg.filters):
            lg.removeFilter(f)


# ------------------------------------------------------------- wired into the ingress


async def _ingress(auth: AuthSettings):
    from deployments.ingress import IngressSettings, OpenAIService, build_api
    from tests.deployments.fakes import FakeMetricsBackend, FakeTokenizer, LocalClient, make_server

    server, _ = await make_server()
    client = LocalClient(server)
    service = OpenAIService(
        client, FakeTokenizer(), IngressSettings(model="m", auth=auth), metrics_backend=FakeMetricsBackend()
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(service)), base_url="http://t"), client


async def test_ingress_401_never_reaches_a_replica():
    http, client = await _ingress(AuthSettings(api_keys=[KEY], api_keys_env=None))
    body = {"model": "m", "prompt": "hi", "max_tokens": 3}
    async with http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert (await http.post("/v1/completions", json=body, headers=headers)).status_code == 401
            assert (await http.get("/v1/models", headers=headers)).status_code == 401
        assert client.requests == []
        assert (await http.get("/health")).status_code == 200
        r = await http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and len(client.requests) == 1


async def test_ingress_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("CBSERVE_API_KEYS", f"{OTHER},{KEY}")
    http, _client = await _ingress(AuthSettings())
    async with http:
        assert (await http.get("/v1/models")).status_code == 401
        assert (await http.get("/v1/models", headers={"Authorization": f"Bearer {OTHER}"})).status_code == 200


async def test_ingress_fails_closed_on_a_broken_key_file(tmp_path):
    with pytest.raises(AuthConfigError):
        await _ingress(AuthSettings(api_keys_file=str(tmp_path / "nope"), api_keys_env=None))


async def test_open_paths_under_a_route_prefix():
    """Serve mounts the app under its route prefix: scope path "/rel/health", root_path "/rel"."""
    reached: list[str] = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = APIKeyMiddleware(app, keys=ApiKeys([KEY]), open_paths=("/health",))
    statuses = []

    async def send(m):
        if m["type"] == "http.response.start":
            statuses.append(m["status"])

    for path, root in (("/rel/health", "/rel"), ("/health", ""), ("/rel/v1/models", "/rel"), ("/relhealth", "/rel")):
        await mw({"type": "http", "path": path, "root_path": root, "headers": []}, None, send)
    assert statuses == [200, 200, 401, 401] and reached == ["/rel/health", "/health"]
