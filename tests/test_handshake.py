"""The handshake decision (CONTRACT sections 4 and 8) and the HTTP head helpers of server.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest

from smap_notify.config import DEV_SUBNETS, PRODUCTION_ORIGINS, Config
from smap_notify.handshake import (
    Accept,
    HandshakeRequest,
    Reject,
    TokenError,
    decide,
    find_token,
    is_localhost_origin,
    is_private_subnet_origin,
    origin_allowed,
    verify_token,
)

# Copied from the contract (shared/spec/samples) so the tests run from any checkout.
SAMPLES = Path(__file__).resolve().parent / "samples"
SECRET = "current-secret-0123456789abcdef0123456789abcdef0123456789abcdef0"
OLD_SECRET = "previous-secret-0123456789abcdef0123456789abcdef0123456789abcd"
OTHER_SECRET = "somebody-elses-secret-0123456789abcdef0123456789abcdef01234567"
PROD_ORIGIN = "https://smap.tantai.dev"
DEV_ORIGIN = "http://localhost:3000"
MISSING_TOKEN_BODY = b'{"error":"missing token parameter"}'
INVALID_TOKEN_BODY = b'{"error":"invalid or expired token"}'

NOW = time.time()


def make_token(
    claims: dict[str, Any] | None = None,
    secret: str = SECRET,
    algorithm: str = "HS256",
    **overrides: Any,
) -> str:
    body = {"sub": "user-1", "exp": int(NOW) + 3600} if claims is None else dict(claims)
    body.update(overrides)
    return jwt.encode(body, secret, algorithm=algorithm)


def without(claim: str) -> dict[str, Any]:
    return {k: v for k, v in {"sub": "user-1", "exp": int(NOW) + 3600}.items() if k != claim}


def ws_request(
    token: str | None = None,
    *,
    origin: str | None = PROD_ORIGIN,
    cookie: str | None = None,
    upgrade: bool = True,
    version: str | None = "13",
    target: str | None = None,
) -> HandshakeRequest:
    headers = {"host": "notify.example"}
    if origin is not None:
        headers["origin"] = origin
    if cookie is not None:
        headers["cookie"] = cookie
    if upgrade:
        headers |= {
            "upgrade": "websocket",
            "connection": "keep-alive, Upgrade",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
    if version is not None:
        headers["sec-websocket-version"] = version
    if target is None:
        target = "/ws" if token is None else f"/ws?token={token}"
    return HandshakeRequest("GET", target, headers)


def config(env: str = "production", **kwargs: Any) -> Config:
    return Config(jwt_secret_key=SECRET, env=env, **kwargs)


PROD = config()
DEV = config("dev")


def accepted(request: HandshakeRequest, cfg: Config = PROD) -> Accept:
    decision = decide(request, cfg, time.time())
    assert isinstance(decision, Accept), decision
    return decision


def refused(request: HandshakeRequest, cfg: Config = PROD) -> Reject:
    decision = decide(request, cfg, time.time())
    assert isinstance(decision, Reject), decision
    assert decision.reason
    return decision


# -- CONTRACT section 8: origin helper tables ----------------------------------------------

PRIVATE_TRUE = [
    f"{scheme}://{net}.{host}{port}"
    for net in ("172.16.21", "172.16.19", "192.168.1")
    for scheme, host, port in (
        ("http", "50", ":3000"),
        ("http", "0", ":3000"),
        ("http", "255", ":3000"),
        ("http", "50", ""),
        ("https", "50", ":3000"),
    )
]
PRIVATE_FALSE = [
    "http://172.16.20.50:3000",
    "http://172.16.22.50:3000",
    "http://172.16.18.50:3000",
    "http://192.168.0.50:3000",
    "http://192.168.2.50:3000",
    "http://1.2.3.4:3000",
    "not-a-url",
    "",
    "http://example.com:3000",
    "http://[2001:db8::1]:3000",
    "http://127.0.0.1:3000",
]
LOCALHOST_TRUE = [
    f"{scheme}://{host}{port}"
    for scheme in ("http", "https")
    for host in ("localhost", "127.0.0.1")
    for port in (":3000", ":8080", ":80", ":443", "")
]
LOCALHOST_FALSE = [
    "https://smap.tantai.dev",
    "http://172.16.21.50:3000",
    "http://1.2.3.4:3000",
    "http://example.com:3000",
    "",
    "not-a-url",
    "http://mylocalhost.com:3000",
    "http://127.0.0.1.example.com:3000",
]


@pytest.mark.parametrize("origin", PRIVATE_TRUE)
def test_private_subnet_origin_true(origin: str) -> None:
    assert is_private_subnet_origin(origin, DEV_SUBNETS) is True


@pytest.mark.parametrize("origin", PRIVATE_FALSE)
def test_private_subnet_origin_false(origin: str) -> None:
    assert is_private_subnet_origin(origin, DEV_SUBNETS) is False


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://[fd00::5]:3000", True),
        ("https://[fd12:3456::1]", True),
        ("http://[fe80::1]:3000", False),
        ("http://[::ffff:172.16.21.5]:3000", False),  # IPv4-mapped: not the IPv4 subnet
        ("http://172.16.21.50:3000", True),
        ("http://fd00::5:3000", False),  # not an origin a browser sends
    ],
)
def test_ipv6_subnets_are_matched_too(origin: str, allowed: bool) -> None:
    """An IPv6 entry was accepted in DEV_ORIGIN_SUBNETS and never matched (outside
    audit)."""
    assert is_private_subnet_origin(origin, ("fd00::/8", "172.16.21.0/24")) is allowed


@pytest.mark.parametrize("origin", LOCALHOST_TRUE)
def test_localhost_origin_true(origin: str) -> None:
    assert is_localhost_origin(origin) is True


@pytest.mark.parametrize("origin", LOCALHOST_FALSE)
def test_localhost_origin_false(origin: str) -> None:
    assert is_localhost_origin(origin) is False


def test_tables_have_the_originals_sizes() -> None:
    assert len(PRIVATE_TRUE) == 15
    assert len(LOCALHOST_TRUE) == 20


@pytest.mark.parametrize(
    "origin", ["ftp://127.0.0.1", "ws://localhost:3000", "http://localhost:notaport", "http://"]
)
def test_non_http_or_malformed_origins_are_not_localhost(origin: str) -> None:
    assert is_localhost_origin(origin) is False
    assert (
        is_private_subnet_origin(origin.replace("localhost", "172.16.21.5"), DEV_SUBNETS) is False
    )


def test_private_subnets_are_configurable() -> None:
    assert is_private_subnet_origin("http://10.1.2.3:3000", ["10.0.0.0/8"])
    assert not is_private_subnet_origin("http://172.16.21.50:3000", ["10.0.0.0/8"])
    assert not is_private_subnet_origin("http://172.16.21.50:3000", [])


# -- CONTRACT section 8: policy by mode ----------------------------------------------------

LOCAL_AND_SUBNETS = [
    "http://localhost:3000",
    "https://localhost",
    "http://127.0.0.1:3000",
    "http://172.16.21.50:3000",
    "http://172.16.19.50:3000",
    "http://192.168.1.50:3000",
]


@pytest.mark.parametrize("env", ["production", ""])
@pytest.mark.parametrize("origin", PRODUCTION_ORIGINS)
def test_production_allows_the_production_origins(env: str, origin: str) -> None:
    assert origin_allowed(origin, config(env)) is True


@pytest.mark.parametrize("env", ["production", ""])
@pytest.mark.parametrize(
    "origin", [*LOCAL_AND_SUBNETS, "https://evil.com", "", None, "https://smap.tantai.dev/"]
)
def test_production_rejects_everything_else(env: str, origin: str | None) -> None:
    assert origin_allowed(origin, config(env)) is False


@pytest.mark.parametrize("env", ["dev", "staging", "anything"])
@pytest.mark.parametrize("origin", [*PRODUCTION_ORIGINS, *LOCAL_AND_SUBNETS])
def test_dev_like_modes_allow_production_localhost_and_subnets(env: str, origin: str) -> None:
    assert origin_allowed(origin, config(env)) is True


@pytest.mark.parametrize("env", ["dev", "staging", "anything"])
@pytest.mark.parametrize(
    "origin", ["http://1.2.3.4:3000", "https://evil.com", "", None, "null", "http://10.0.0.1"]
)
def test_dev_like_modes_reject_other_origins(env: str, origin: str | None) -> None:
    assert origin_allowed(origin, config(env)) is False


def test_allowed_origins_are_configurable() -> None:
    cfg = config(allowed_origins=("https://app.example",))
    assert origin_allowed("https://app.example", cfg)
    assert not origin_allowed(PROD_ORIGIN, cfg)


def test_dev_subnets_are_configurable() -> None:
    cfg = config("dev", dev_origin_subnets=("10.0.0.0/8",))
    assert origin_allowed("http://10.9.8.7:3000", cfg)
    assert not origin_allowed("http://172.16.21.50:3000", cfg)


# -- decide(): order and statuses ----------------------------------------------------------


def test_valid_token_and_origin_is_accepted() -> None:
    decision = accepted(ws_request(make_token()))
    assert decision.user_id == "user-1"
    assert decision.expires_at == int(NOW) + 3600
    assert decision.used_previous_secret is False


@pytest.mark.parametrize("token", [None, "garbage", "TOKEN_VALID"])
@pytest.mark.parametrize("origin", ["https://evil.com", None, "", "http://localhost:3000"])
def test_origin_is_checked_before_the_token(token: str | None, origin: str | None) -> None:
    if token == "TOKEN_VALID":
        token = make_token()
    decision = refused(ws_request(token, origin=origin))
    assert decision.status == 403
    assert decision.reason in ("origin_missing", "origin_not_allowed")
    assert json.loads(decision.body) == {"error": "origin not allowed"}


def test_missing_token_is_401_with_the_originals_body() -> None:
    decision = refused(ws_request(None))
    assert decision.status == 401
    assert decision.body == MISSING_TOKEN_BODY
    assert decision.content_type == "application/json"


def test_missing_token_names_the_cookies_sent_never_their_values() -> None:
    # A COOKIE_NAME that differs from identity-srv's looked like no cookie at all.
    request = ws_request(None, cookie="theme=dark; SMAP_AUTH_TOKEN=secret-value; lang=vi")
    assert refused(request).detail == (
        "no smap_auth_token cookie (cookies sent: theme, SMAP_AUTH_TOKEN, lang)"
        " and no token parameter"
    )
    assert refused(ws_request(None)).detail == "no smap_auth_token cookie and no token parameter"
    # A cookie with an empty name is sent as its value alone: not logged.
    request = ws_request(None, cookie="VALUE-OF-A-NAMELESS-COOKIE; x=1")
    assert refused(request).detail == (
        "no smap_auth_token cookie (cookies sent: x) and no token parameter"
    )
    request = ws_request(None, cookie="smap_auth_token=; x=1")
    assert refused(request).detail == (
        "an empty smap_auth_token cookie (cookies sent: smap_auth_token, x) and no token parameter"
    )


@pytest.mark.parametrize("target", ["/ws?token=", "/ws?other=1", "/ws?token", "/ws?"])
def test_empty_token_parameter_is_missing(target: str) -> None:
    assert refused(ws_request(target=target)).body == MISSING_TOKEN_BODY


INVALID_TOKENS = {
    "garbage": "not-a-jwt",
    "three_dots": "a.b.c",
    "truncated": make_token()[:-5],
    "expired": make_token(exp=int(NOW) - 10),
    "wrong_secret": make_token(secret=OTHER_SECRET),
    "alg_none": jwt.encode({"sub": "user-1", "exp": int(NOW) + 3600}, None, algorithm="none"),
    "missing_sub": make_token(without("sub")),
    "empty_sub": make_token(sub=""),
    "numeric_sub": make_token(sub=123),
    "missing_exp": make_token(without("exp")),
    "string_exp": make_token(exp="tomorrow"),
    "nbf_in_future": make_token(nbf=int(NOW) + 600),
}


@pytest.mark.parametrize("name", sorted(INVALID_TOKENS))
def test_invalid_token_is_401_with_the_originals_body(name: str) -> None:
    token = INVALID_TOKENS[name]
    decision = refused(ws_request(token))
    assert decision.status == 401
    assert decision.reason == "invalid_token"
    assert decision.body == INVALID_TOKEN_BODY
    assert decision.content_type == "application/json"
    assert token not in decision.detail


@pytest.mark.parametrize("name", sorted(INVALID_TOKENS))
def test_invalid_token_in_cookie_is_401_too(name: str) -> None:
    decision = refused(ws_request(cookie=f"smap_auth_token={INVALID_TOKENS[name]}"))
    assert (decision.status, decision.body) == (401, INVALID_TOKEN_BODY)


def test_nbf_in_the_past_is_accepted() -> None:
    accepted(ws_request(make_token(nbf=int(NOW) - 60)))


def test_iat_slightly_in_the_future_is_accepted() -> None:
    accepted(ws_request(make_token(iat=int(time.time()) + 30)))


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_every_hmac_algorithm_is_accepted(algorithm: str) -> None:
    assert accepted(ws_request(make_token(algorithm=algorithm))).user_id == "user-1"


def test_identity_srv_claims_are_accepted_when_exp_is_in_the_future() -> None:
    claims = json.loads((SAMPLES / "jwt_claims.json").read_text())["identity_srv_claims"]
    assert {"aud", "iss", "role", "jti", "iat", "email"} <= set(claims)
    token = make_token({**claims, "exp": int(time.time()) + 3600})
    decision = accepted(ws_request(token))
    assert decision.user_id == claims["sub"]


def test_identity_srv_claims_as_sampled_are_expired() -> None:
    claims = json.loads((SAMPLES / "jwt_claims.json").read_text())["identity_srv_claims"]
    assert claims["exp"] < time.time()
    assert refused(ws_request(make_token(claims))).body == INVALID_TOKEN_BODY


def test_test_generator_token_is_accepted_with_its_secret() -> None:
    secret = "my-super-secret-jwt-key-for-testing-change-in-production"
    claims = json.loads((SAMPLES / "jwt_claims.json").read_text())["test_generator_claims"]
    token = make_token({**claims, "exp": int(time.time()) + 60}, secret=secret)
    assert accepted(ws_request(token), Config(jwt_secret_key=secret)).user_id == "user123"


def test_exp_is_compared_with_the_given_now() -> None:
    token = make_token(exp=int(NOW) + 100)
    request = ws_request(token)
    assert isinstance(decide(request, PROD, NOW), Accept)
    assert isinstance(decide(request, PROD, NOW + 100), Reject)


@pytest.mark.parametrize(
    ("exp", "detail"),
    [
        ("9999999999", "claim exp must be a number (seconds since 1970), got '9999999999'"),
        (True, "claim exp must be a number (seconds since 1970), got True"),
        (NOW - 1, "token has expired (claim exp is not in the future)"),
        # NaN <= now is false: without the check such a token never expired.
        (float("nan"), "claim exp must be a number (seconds since 1970), got nan"),
        (float("inf"), "claim exp must be a number (seconds since 1970), got inf"),
    ],
)
def test_the_log_detail_says_what_is_wrong_with_exp(exp: object, detail: str) -> None:
    assert refused(ws_request(make_token(exp=exp))).detail == detail


def hand_made_token(payload: bytes, secret: str = SECRET) -> str:
    """A JWT whose payload is exactly ``payload`` (PyJWT cannot write 1e400)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(payload)
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


@pytest.mark.parametrize("exp", [b"1e400", b"NaN", b"Infinity", b"-Infinity"])
def test_a_token_whose_exp_is_not_finite_is_refused(exp: bytes) -> None:
    token = hand_made_token(b'{"sub":"user-1","exp":' + exp + b"}")
    finite = hand_made_token(b'{"sub":"user-1","exp":9e9}')
    assert isinstance(decide(ws_request(finite), PROD, NOW), Accept)
    decision = refused(ws_request(token))
    assert (decision.status, decision.body) == (401, INVALID_TOKEN_BODY)


def test_an_integer_exp_beyond_any_float_is_far_future_not_a_crash() -> None:
    """math.isfinite(10**400) raises OverflowError: the client got no answer and the log
    a traceback."""
    token = hand_made_token(b'{"sub":"user-1","exp":1' + b"0" * 400 + b"}")
    assert accepted(ws_request(token)).expires_at == 1e12
    expired = hand_made_token(b'{"sub":"user-1","exp":-1' + b"0" * 400 + b"}")
    assert refused(ws_request(expired)).status == 401


@pytest.mark.parametrize("jti", [12345, {"id": 1}, None, ["a"]])
def test_claims_the_contract_does_not_check_may_have_any_type(jti: object) -> None:
    """PyJWT 2.10+ refused a jti that is not a string: 401 for a token the contract
    accepts (sub, exp and nbf are all it checks)."""
    claims = {"sub": "user-1", "exp": int(NOW) + 3600, "jti": jti, "iss": 7, "aud": ["a", 1]}
    claims |= {"email": None, "role": {"r": 1}, "iat": "now"}
    token = hand_made_token(json.dumps(claims).encode())
    assert accepted(ws_request(token)).user_id == "user-1"


def test_only_the_given_now_decides_expiry() -> None:
    # A clock of the caller's behind the wall clock: PyJWT's own check must not interfere
    # (it did, and this suite's NOW-based tests failed when run long after import).
    now = time.time() - 1000
    token = make_token(exp=int(now) + 500)
    assert isinstance(decide(ws_request(token), PROD, now), Accept)


# -- where the token comes from ------------------------------------------------------------


def test_cookie_token_wins_over_query_token() -> None:
    cookie_token = make_token(sub="from-cookie")
    query_token = make_token(sub="from-query")
    decision = accepted(ws_request(query_token, cookie=f"smap_auth_token={cookie_token}"))
    assert decision.user_id == "from-cookie"
    assert decision.token_in_query is False


def test_valid_cookie_wins_over_invalid_query_token() -> None:
    decision = accepted(ws_request("garbage", cookie=f"smap_auth_token={make_token()}"))
    assert decision.token_in_query is False


def test_query_token_is_flagged_token_in_query() -> None:
    assert accepted(ws_request(make_token())).token_in_query is True


def test_cookie_is_found_among_other_cookies() -> None:
    cookie = f'theme=dark; smap_auth_token="{make_token(sub="quoted")}"; lang=vi'
    assert accepted(ws_request(cookie=cookie)).user_id == "quoted"


def test_empty_cookie_falls_back_to_the_query_token() -> None:
    decision = accepted(ws_request(make_token(), cookie="smap_auth_token=; theme=dark"))
    assert decision.token_in_query is True


def test_cookie_name_is_configurable() -> None:
    cfg = config(cookie_name="auth")
    token = make_token(sub="custom")
    assert accepted(ws_request(cookie=f"auth={token}"), cfg).user_id == "custom"
    assert refused(ws_request(cookie=f"smap_auth_token={token}"), cfg).body == MISSING_TOKEN_BODY


def test_cookie_with_a_similar_name_is_not_the_token() -> None:
    request = ws_request(cookie=f"xsmap_auth_token={make_token()}; smap_auth_token_old=1")
    assert find_token(request, "smap_auth_token") == ("", False)


def test_find_token_decodes_the_query() -> None:
    request = ws_request(target="/ws?a=1&token=abc%2Edef&token=second")
    assert find_token(request, "smap_auth_token") == ("abc.def", True)


# -- secret rotation -----------------------------------------------------------------------


def test_previous_secret_is_accepted_and_flagged() -> None:
    cfg = config(jwt_previous_secret_key=OLD_SECRET)
    decision = accepted(ws_request(make_token(secret=OLD_SECRET)), cfg)
    assert decision.used_previous_secret is True


def test_current_secret_is_not_flagged_as_previous() -> None:
    cfg = config(jwt_previous_secret_key=OLD_SECRET)
    assert accepted(ws_request(make_token()), cfg).used_previous_secret is False


def test_previous_secret_is_refused_when_not_configured() -> None:
    assert refused(ws_request(make_token(secret=OLD_SECRET))).body == INVALID_TOKEN_BODY


def test_expired_token_is_refused_even_with_the_previous_secret() -> None:
    cfg = config(jwt_previous_secret_key=OLD_SECRET)
    token = make_token(secret=OLD_SECRET, exp=int(NOW) - 1)
    assert refused(ws_request(token), cfg).body == INVALID_TOKEN_BODY


def test_unknown_secret_is_refused_with_rotation_configured() -> None:
    cfg = config(jwt_previous_secret_key=OLD_SECRET)
    assert refused(ws_request(make_token(secret=OTHER_SECRET)), cfg).status == 401


# -- the upgrade itself --------------------------------------------------------------------


def test_not_a_websocket_request_with_valid_token_is_400() -> None:
    decision = refused(ws_request(make_token(), upgrade=False))
    assert decision.status == 400
    assert decision.reason == "not_websocket"


@pytest.mark.parametrize("drop", ["upgrade", "connection", "sec-websocket-key"])
def test_each_upgrade_header_is_required(drop: str) -> None:
    request = ws_request(make_token())
    headers = {k: v for k, v in request.headers.items() if k != drop}
    assert refused(HandshakeRequest("GET", request.target, headers)).status == 400


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("short", "not 16 bytes in base64"),
        ("dGhlIHNhbXBsZSBub25jZQ", "not 16 bytes in base64"),  # padding missing
        ("!!!!!!!!!!!!!!!!!!!!!!==", "not 16 bytes in base64"),
        (base64.b64encode(b"k" * 3000).decode(), "not 16 bytes in base64"),
        (base64.b64encode(b"k" * 15).decode(), "not 16 bytes in base64"),
    ],
)
def test_a_key_that_is_not_16_bytes_in_base64_is_400(key: str, why: str) -> None:
    """RFC 6455 4.1: the key is a base64-encoded 16-byte value; gorilla checks it too."""
    request = ws_request(make_token())
    headers = {**request.headers, "sec-websocket-key": key}
    decision = refused(HandshakeRequest("GET", request.target, headers))
    assert (decision.status, decision.reason) == (400, "not_websocket")
    assert why in decision.detail


@pytest.mark.parametrize("version", ["1.0", "0.9"])
def test_an_upgrade_over_http_1_0_is_400(version: str) -> None:
    request = ws_request(make_token())
    decision = refused(HandshakeRequest("GET", request.target, request.headers, version))
    assert (decision.status, decision.reason) == (400, "not_websocket")
    assert f"HTTP/{version}" in decision.detail
    assert isinstance(decide(attrs.evolve(request, http_version="1.1"), PROD, NOW), Accept)


def test_post_is_not_a_websocket_request() -> None:
    request = ws_request(make_token())
    assert refused(HandshakeRequest("POST", request.target, request.headers)).status == 400


def test_not_a_websocket_request_without_token_is_401() -> None:
    assert refused(ws_request(None, upgrade=False)).status == 401


@pytest.mark.parametrize("version", ["8", "12", "", None, "13, 8"])
def test_wrong_websocket_version_is_426(version: str | None) -> None:
    decision = refused(ws_request(make_token(), version=version))
    assert decision.status == 426
    assert ("Sec-WebSocket-Version", "13") in decision.extra_headers


def test_dev_mode_accepts_a_localhost_origin_and_production_refuses_it() -> None:
    request = ws_request(make_token(), origin=DEV_ORIGIN)
    assert accepted(request, DEV).user_id == "user-1"
    assert refused(request, PROD).status == 403


# -- server.py: reading and parsing the request head ---------------------------------------


@pytest.mark.parametrize(
    ("upgrade", "ok"),
    [
        ("websocket", True),
        ("WebSocket", True),
        ("h2c, websocket", True),
        ("notwebsocketatall", False),
        ("websocket2", False),
        ("x-websocket", False),
        ("", False),
    ],
)
def test_upgrade_must_list_the_websocket_token(upgrade: str, ok: bool) -> None:
    """``Upgrade: notwebsocketatall`` got 101: the header was searched for the text
    "websocket" anywhere, where RFC 6455 4.2.1 asks for the token."""
    request = ws_request(make_token())
    request = HandshakeRequest("GET", request.target, {**request.headers, "upgrade": upgrade})
    if ok:
        accepted(request)
    else:
        decision = refused(request)
        assert (decision.status, decision.reason) == (400, "not_websocket")


# -- server.py: writing a response ---------------------------------------------------------


def test_a_token_is_expired_at_its_exp_second() -> None:
    """exp is the first moment the token is no longer valid (RFC 7519 4.1.4): equal to
    now is expired."""
    token = jwt.encode({"sub": "u", "exp": 1_700_000_000}, SECRET, algorithm="HS256")
    assert verify_token(token, [SECRET], 1_699_999_999.5).user_id == "u"
    with pytest.raises(TokenError, match="expired"):
        verify_token(token, [SECRET], 1_700_000_000)
