"""Settings validation, request tokens, key handling and key shapes (no servers)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from beam.config import (
    Environment,
    OperatorSettings,
    RedisMode,
    RuntimeSettings,
    ServiceSettings,
    StoreSettings,
)
from beam.constants import (
    account_key,
    customer_keys,
    done_key,
    hold_key,
    parse_customer_key,
)
from beam.core.auth import (
    KEY_PREFIX,
    Principal,
    RequestTokens,
    TokenBucket,
    bearer_token,
    generate_key,
    hash_key,
)
from beam.core.runtime import UnsignedTokens, tokens_of
from beam.errors import BeamError, Reason
from beam.records import Role

STRONG = "x" * 40


def test_production_refuses_placeholder_and_short_secrets() -> None:
    for secret in ("", "changeme", "short-secret"):
        with pytest.raises(ValidationError, match="BEAM_REQUEST_TOKEN_SECRET"):
            ServiceSettings(request_token_secret=secret)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="BEAM_REQUEST_TOKEN_SECRET"):
        ServiceSettings()  # the dev default is refused outside dev
    assert ServiceSettings(environment=Environment.DEV).is_dev
    assert ServiceSettings(request_token_secret=STRONG).grpc_port == 9090  # type: ignore[arg-type]


def test_only_the_service_settings_hold_the_request_token_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator, the migration Job and the integrity CronJob start in production without
    the key, and take none when one is in their environment anyway."""
    monkeypatch.setenv("BEAM_REQUEST_TOKEN_SECRET", STRONG)
    for other in (StoreSettings, RuntimeSettings, OperatorSettings):
        assert "request_token_secret" not in other.model_fields, other.__name__
        assert not hasattr(other(), "request_token_secret"), other.__name__
    monkeypatch.delenv("BEAM_REQUEST_TOKEN_SECRET")
    for other in (StoreSettings, RuntimeSettings, OperatorSettings):
        assert other().environment is Environment.PRODUCTION  # no key needed to start
    with pytest.raises(ValidationError, match="BEAM_REQUEST_TOKEN_SECRET"):
        ServiceSettings()


def test_a_runtime_signs_with_the_service_key_only() -> None:
    signed = tokens_of(ServiceSettings(request_token_secret=STRONG))  # type: ignore[arg-type]
    expected = RequestTokens(STRONG).issue("acme", "cus_1", "req_1", "nonce123")
    assert signed.issue("acme", "cus_1", "req_1", "nonce123") == expected
    unsigned = tokens_of(RuntimeSettings())
    assert isinstance(unsigned, UnsignedTokens)
    with pytest.raises(RuntimeError, match="no request-token key"):
        unsigned.issue("acme", "cus_1", "req_1", "nonce123")
    with pytest.raises(RuntimeError, match="no request-token key"):
        unsigned.verify(expected, "acme", "cus_1", "req_1")


def test_settings_read_environment_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEAM_REQUEST_TOKEN_SECRET", STRONG)
    monkeypatch.setenv("BEAM_REDIS_MODE", "sentinel")
    monkeypatch.setenv("BEAM_REDIS_SENTINELS", "10.0.0.1:26379, 10.0.0.2:26379")
    monkeypatch.setenv("BEAM_HTTP_PORT", "18080")
    settings = ServiceSettings()
    assert settings.redis_mode is RedisMode.SENTINEL
    assert settings.redis_sentinels == ["10.0.0.1:26379", "10.0.0.2:26379"]
    assert settings.http_port == 18080
    monkeypatch.setenv("BEAM_NAMESPACES", "acme,globex")
    assert OperatorSettings().namespaces == ["acme", "globex"]


def test_sentinel_mode_needs_sentinels() -> None:
    with pytest.raises(ValidationError, match="BEAM_REDIS_SENTINELS"):
        ServiceSettings(request_token_secret=STRONG, redis_mode=RedisMode.SENTINEL)  # type: ignore[arg-type]


def test_bad_setting_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEAM_HOLD_TTL_SECONDS", "0")
    with pytest.raises(ValidationError, match="hold_ttl_seconds"):
        ServiceSettings(environment=Environment.DEV)


def test_request_tokens_bind_tenant_customer_request_and_nonce() -> None:
    tokens = RequestTokens(STRONG)
    token = tokens.issue("acme", "cus_1", "req_1", "nonce123")
    assert token.startswith("v1.nonce123.")
    assert tokens.verify(token, "acme", "cus_1", "req_1") == "nonce123"
    wrong = [("globex", "cus_1", "req_1"), ("acme", "cus_2", "req_1"), ("acme", "cus_1", "req_2")]
    for tenant, customer, request in wrong:
        with pytest.raises(BeamError) as error:
            tokens.verify(token, tenant, customer, request)
        assert error.value.reason is Reason.INVALID_REQUEST_TOKEN
    for tampered in (token[:-1] + ("A" if token[-1] != "A" else "B"), "v1.other." + token[12:],
                     "v2" + token[2:], "", "garbage"):  # fmt: skip
        with pytest.raises(BeamError):
            tokens.verify(tampered, "acme", "cus_1", "req_1")
    other_key = RequestTokens("y" * 40).issue("acme", "cus_1", "req_1", "nonce123")
    with pytest.raises(BeamError):
        tokens.verify(other_key, "acme", "cus_1", "req_1")


@pytest.mark.parametrize(
    "case",
    ["mac non-ASCII", "mac all non-ASCII", "mac with an unpaired surrogate", "nonce non-ASCII",
     "nonce with an unpaired surrogate", "version non-ASCII"],
)  # fmt: skip
def test_a_non_ascii_request_token_is_invalid_not_an_error(case: str) -> None:
    """compare_digest raises TypeError on a non-ASCII str and encode() raises on a
    surrogate: either used to escape as a 500. Such a token is INVALID_REQUEST_TOKEN."""
    tokens = RequestTokens(STRONG)
    token = tokens.issue("acme", "cus_1", "req_1", "nonce123")
    version, nonce, mac = token.split(".")
    bad = {
        "mac non-ASCII": f"{version}.{nonce}.\u00e9{mac[1:]}",
        "mac all non-ASCII": f"{version}.{nonce}." + "\u00e9" * len(mac),
        "mac with an unpaired surrogate": f"{version}.{nonce}.\ud800{mac[1:]}",
        "nonce non-ASCII": f"{version}.n\u00f6nce123.{mac}",
        "nonce with an unpaired surrogate": f"{version}.\udc80.{mac}",
        "version non-ASCII": f"v\u00b9.{nonce}.{mac}",
    }[case]
    with pytest.raises(BeamError) as error:
        tokens.verify(bad, "acme", "cus_1", "req_1")
    assert (error.value.reason, error.value.field, error.value.message) == (
        Reason.INVALID_REQUEST_TOKEN,
        "request_token",
        "request_token does not match this customer and request",
    )
    assert tokens.verify(token, "acme", "cus_1", "req_1") == "nonce123"


def test_the_lookup_bucket_allows_its_burst_then_its_rate() -> None:
    now = [100.0]
    bucket = TokenBucket(10.0, 20, lambda: now[0])
    assert [bucket.take() for _ in range(21)] == [True] * 20 + [False]
    now[0] += 0.25  # 2.5 tokens: two takes, and half a token left over
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] += 0.0625  # the half token and 0.625 more make one (times are exact binary)
    assert [bucket.take() for _ in range(2)] == [True, False]
    now[0] += 3600.0  # idle: refilled to the burst, not beyond
    assert sum(bucket.take() for _ in range(100)) == 20


def test_generated_keys_are_random_and_only_their_hash_is_kept() -> None:
    plaintext, key_id, digest = generate_key()
    assert plaintext.startswith(f"{KEY_PREFIX}{key_id}_")
    assert digest == hash_key(plaintext)
    assert len(digest) == 64
    assert plaintext not in digest
    assert generate_key()[0] != plaintext


@pytest.mark.parametrize(
    ("header", "ok"),
    [("Bearer abc", True), ("bearer   abc ", True), ("Basic abc", False), ("Bearer", False),
     ("", False), (None, False), ("abc", False)],
)  # fmt: skip
def test_bearer_token_parsing(header: str | None, ok: bool) -> None:
    if ok:
        assert bearer_token(header) == "abc"
    else:
        with pytest.raises(BeamError) as error:
            bearer_token(header)
        assert error.value.reason is Reason.UNAUTHENTICATED


def test_roles() -> None:
    from beam.core.auth import Action

    reader = Principal("t", Role.READER, "k", frozenset({"cus_1"}))
    reader.require(Action.READ)
    with pytest.raises(BeamError) as denied:
        reader.require(Action.ENFORCE)
    assert denied.value.reason is Reason.PERMISSION_DENIED
    assert reader.can_see("cus_1")
    assert not reader.can_see("cus_2")
    with pytest.raises(BeamError) as hidden:
        reader.require_customer("cus_2")
    assert hidden.value.reason is Reason.CUSTOMER_NOT_FOUND
    Principal("t", Role.ENFORCER, "k", frozenset()).require(Action.ENFORCE)
    with pytest.raises(BeamError):
        Principal("t", Role.ENFORCER, "k", frozenset()).require(Action.ADMIN)


def test_every_key_of_a_customer_shares_one_hash_tag() -> None:
    keys = customer_keys("acme", "cus_1", "req:1")
    assert keys == [
        "beam:{acme:cus_1}:acct",
        "beam:{acme:cus_1}:open",
        "beam:{acme:cus_1}:exp",
        "beam:{acme:cus_1}:h:req:1",
        "beam:{acme:cus_1}:done:req:1",
        "beam:{acme:cus_1}:stl",
    ]
    assert account_key("a", "b") == keys[0].replace("acme:cus_1", "a:b")
    assert hold_key("acme", "cus_1", "req:1") == keys[3]
    assert done_key("acme", "cus_1", "req:1") == keys[4]
    assert parse_customer_key("beam:{acme:cus_1}:open") == ("acme", "cus_1")
    assert parse_customer_key("other:{a:b}:open") is None
    assert parse_customer_key("beam:{nocolon}:open") is None
