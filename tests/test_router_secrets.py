"""The router's API key (issue 22): compared in constant time, never in a log line, the
access log or the audit log, nor in what a bad command line prints.

A real in-process router with `--api-key` and `--audit-log` (router_harness) answers good and
bad requests while every logger (aiohttp's access log included) records at DEBUG; then
neither the records nor the audit file hold the key or its bearer token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import string

import aiohttp
import pytest
from fuzz_settings import examples
from hypothesis import given
from hypothesis import strategies as st
from router_harness import MODEL, RecordingPod, read_audit, running_router

from vllm_llmd.router.cli import RequestsAccessLogger, access_log_options
from vllm_llmd.router.client_body import api_key_ok
from vllm_llmd.router.config_parse import build_parser, parse_config

API_KEY = "sk-llmd-5ecret-9f27c1d4"  # unlike anything else a log line holds
BEARER = f"Bearer {API_KEY}"


def _completion(prompt: str = "hello") -> bytes:
    return json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 2}).encode()


# (Authorization header or None, body, expected status): good and bad requests
REQUESTS = [
    (BEARER, _completion(), 200),
    (None, _completion(), 401),
    ("Bearer wrong", _completion(), 401),
    (f"Basic {API_KEY}", _completion(), 401),  # the key in another scheme
    (BEARER + "x", _completion(), 401),  # the key with more after it
    (BEARER[:-1], _completion(), 401),  # all but its last character
    (BEARER, b"{not json", 400),
    (BEARER, json.dumps({"prompt": "no model"}).encode(), 400),
    (BEARER, json.dumps({"model": MODEL, "chat_template": "{{ x }}"}).encode(), 400),
]


def test_the_key_is_in_no_log_and_no_audit_line(tmp_path, caplog):
    audit = tmp_path / "audit.jsonl"
    caplog.set_level(logging.DEBUG)  # every logger, aiohttp's access log included

    async def run() -> list[int]:
        pod = await RecordingPod().start()
        flags = ["--pod", pod.url, "--api-key", API_KEY, "--audit-log", str(audit)]
        flags += ["--audit-prompts", "--log-level", "DEBUG"]
        statuses = []
        try:
            async with running_router(flags) as (_, url), aiohttp.ClientSession() as session:
                for authorization, body, _ in REQUESTS:
                    headers = {"Authorization": authorization} if authorization else {}
                    headers["Referer"] = "http://client.example/"
                    async with session.post(
                        url + "/v1/completions", data=body, headers=headers
                    ) as response:
                        statuses.append(response.status)
                        assert API_KEY not in await response.text()
        finally:
            await pod.stop()
        return statuses

    statuses = asyncio.run(run())
    assert statuses == [status for _, _, status in REQUESTS]
    logged = caplog.text + "\n".join(str(r.args) for r in caplog.records)
    assert "aiohttp.access" in {r.name for r in caplog.records}  # the access log was on
    assert API_KEY not in logged
    assert len(read_audit(audit)) == 1  # the one routed request
    assert API_KEY not in audit.read_text()


def test_the_access_log_format_names_no_authorization_header():
    """Both access-log modes use aiohttp's format: request line, Referer and User-Agent."""
    for mode in ("all", "requests"):
        logger_class = access_log_options(mode)["access_log_class"]
        assert issubclass(logger_class, RequestsAccessLogger) == (mode == "requests")
        assert "authorization" not in logger_class.LOG_FORMAT.lower()
        assert "%{" not in logger_class.LOG_FORMAT.replace("%{Referer}i", "").replace(
            "%{User-Agent}i", ""
        )


def test_a_bad_command_line_does_not_print_the_key(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--api-key", API_KEY, "--port", "not-a-port"])
    with pytest.raises(SystemExit):
        parse_config(["--api-key", API_KEY, "--pod", "not a url"])
    with pytest.raises(SystemExit):
        parse_config(["--api-key", API_KEY, "--objective", "bad"])
    with pytest.raises(SystemExit):  # a misspelled variable is named, not its value
        parse_config([], {"VLLM_LLMD_ROUTER_API_KEYS": API_KEY})
    out, err = capsys.readouterr()
    assert API_KEY not in out + err


def test_help_does_not_show_a_key_set_in_the_environment():
    help_text = build_parser({"VLLM_LLMD_ROUTER_API_KEY": API_KEY}).format_help()
    assert "--api-key" in help_text and API_KEY not in help_text


def test_a_key_from_the_environment_or_a_non_utf8_command_line_works():
    """A key read from argv or the environment keeps a non-UTF-8 byte as a surrogate; a
    client sending the same bytes is let in (it raised UnicodeEncodeError: a 500)."""
    key = os.fsdecode(b"k\xffey")
    pod = ["--pod", "http://127.0.0.1:1"]
    config = parse_config([*pod, "--api-key", key])
    assert api_key_ok(f"Bearer {key}", config.api_key)
    assert not api_key_ok("Bearer k?ey", config.api_key)
    env = parse_config(pod, {"VLLM_LLMD_ROUTER_API_KEY": API_KEY})
    assert env.api_key == API_KEY and api_key_ok(BEARER, env.api_key)


KEYS = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=40)


# what aiohttp makes of a header's bytes (non-UTF-8 ones as surrogates)
HEADER_VALUES = st.binary(max_size=50).map(lambda b: b.decode("utf-8", "surrogateescape"))


@examples(200)
@given(KEYS, st.one_of(st.none(), HEADER_VALUES, KEYS.map("Bearer {}".format)))
def test_api_key_ok_only_for_the_exact_bearer_token(key, authorization):
    assert api_key_ok(authorization, key) == (authorization == f"Bearer {key}")


def test_the_api_key_is_not_in_the_configs_repr():
    from vllm_llmd.router.config_parse import parse_config

    config = parse_config(["--pod", "http://127.0.0.1:1", "--api-key", "s3cr3t-k3y"], environ={})
    assert config.api_key == "s3cr3t-k3y" and "s3cr3t-k3y" not in repr(config)
