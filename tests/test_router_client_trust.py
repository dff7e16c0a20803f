"""What a client sends is not trusted where only the router may decide, against a real
in-process router before real HTTP pods that record what they receive (router_harness):

- a client's `kv_transfer_params` never reach a pod (direct routes, and P/D routes whose
  prefill fails or returns none), unless the router is told to trust its upstream;
- a request's own chat template is refused with a 400 naming the field, unless trusted;
- a pod's redirect is not followed: a 502 naming the pod, nothing sent where it points;
- a body nested too deeply is a 400 naming the problem, not a 500;
- an Authorization header that is not even UTF-8 is a 401, not a 500.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from router_harness import MODEL, RecordingPod, metric, running_router

from vllm_llmd.devtools.server import free_port

# what a crafted request carries to make a decode pod pull attacker-chosen KV
CLIENT_PARAMS = {
    "do_remote_prefill": True,
    "llmd_transfer_id": "x",
    "remote_host": "attacker.example",
    "llmd_ports": [],
}
STRIPPED = "llmd:router_client_kv_transfer_params_stripped_total"


async def _post(session, url, path, body, headers=None) -> tuple[int, dict]:
    async with session.post(url + path, data=json.dumps(body), headers=headers) as response:
        return response.status, json.loads(await response.text())


def _completion(**extra) -> dict:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 2, **extra}


def test_client_kv_transfer_params_never_reach_a_pod():
    async def run() -> None:
        pod = await RecordingPod().start()
        try:
            async with running_router(["--pod", pod.url]) as (_, url), aiohttp.ClientSession() as s:
                body = _completion(kv_transfer_params=CLIENT_PARAMS)
                assert (await _post(s, url, "/v1/completions", body))[0] == 200
                # do_remote_decode on a kv_both pod would pin blocks and hand out a transfer id
                chat = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "hi"}],
                    "kv_transfer_params": {"do_remote_decode": True},
                }
                assert (await _post(s, url, "/v1/chat/completions", chat))[0] == 200
                assert [path for path, _ in pod.received] == [
                    "/v1/completions",
                    "/v1/chat/completions",
                ]
                assert all("kv_transfer_params" not in got for _, got in pod.received)
                assert pod.received[0][1] == _completion()  # nothing else was touched
                assert await metric(s, url, STRIPPED) == 2
        finally:
            await pod.stop()

    asyncio.run(run())


@pytest.mark.parametrize("prefill", ["no-params", "unreachable"])
def test_client_kv_transfer_params_never_reach_the_decode_pod_after_a_failed_prefill(prefill):
    """P/D: a prefill that returns no params, or cannot be reached, leaves the decode pod to
    recompute; it must get the client's body without the client's params."""

    async def run() -> None:
        decode, prefill_pod = await RecordingPod().start(), await RecordingPod().start()
        prefill_pod.answer = {"choices": [{"text": "x"}]}  # no kv_transfer_params
        target = prefill_pod.url if prefill == "no-params" else f"http://127.0.0.1:{free_port()}"
        flags = ["--pod", f"{decode.url},role=decode"]
        flags += ["--prefill-allowlist", target.removeprefix("http://")]
        try:
            async with running_router(flags) as (_, url), aiohttp.ClientSession() as s:
                headers = {"x-prefiller-host-port": target.removeprefix("http://")}
                body = _completion(kv_transfer_params=CLIENT_PARAMS)
                assert (await _post(s, url, "/v1/completions", body, headers))[0] == 200
            if prefill == "no-params":  # the prefill step itself carries the router's own
                [(_, sent)] = prefill_pod.received
                assert sent["kv_transfer_params"] == {"do_remote_decode": True}
            [(_, got)] = decode.received
            assert "kv_transfer_params" not in got, got
        finally:
            await decode.stop()
            await prefill_pod.stop()

    asyncio.run(run())


def test_a_trusted_upstream_keeps_its_kv_transfer_params():
    async def run() -> None:
        pod = await RecordingPod().start()
        flags = ["--pod", pod.url, "--trust-client-kv-transfer-params"]
        try:
            async with running_router(flags) as (_, url), aiohttp.ClientSession() as s:
                body = _completion(kv_transfer_params={"do_remote_decode": True})
                assert (await _post(s, url, "/v1/completions", body))[0] == 200
                assert await metric(s, url, STRIPPED) == 0
            assert pod.received[0][1] == body
        finally:
            await pod.stop()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"chat_template": "{{ messages }}"}, "'chat_template'"),
        ({"chat_template_kwargs": {"chat_template": "{{ x }}"}}, "chat_template_kwargs"),
    ],
    ids=["chat_template", "in-kwargs"],
)
def test_a_request_chat_template_is_refused_unless_trusted(extra, field):
    async def run() -> None:
        pod = await RecordingPod().start()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
        try:
            async with running_router(["--pod", pod.url]) as (_, url), aiohttp.ClientSession() as s:
                status, answer = await _post(s, url, "/v1/chat/completions", body)
                assert status == 400, answer
                assert field in answer["error"]["message"]
                assert "--trust-request-chat-template" in answer["error"]["message"]
                assert pod.received == []
            trusting = ["--pod", pod.url, "--trust-request-chat-template"]
            async with running_router(trusting) as (_, url), aiohttp.ClientSession() as s:
                assert (await _post(s, url, "/v1/chat/completions", body))[0] == 200
                assert pod.received[-1][1] == body
        finally:
            await pod.stop()

    asyncio.run(run())


@pytest.mark.parametrize("step", ["decode", "prefill"])
def test_a_pods_redirect_is_not_followed(step):
    async def run() -> None:
        pod, elsewhere = await RecordingPod().start(), await RecordingPod().start()
        prefill_pod = await RecordingPod().start()
        redirecting = pod if step == "decode" else prefill_pod
        redirecting.status = 307
        redirecting.headers = {"Location": elsewhere.url + "/v1/completions"}
        flags = ["--pod", f"{pod.url},role=decode"]
        flags += ["--prefill-allowlist", prefill_pod.url.removeprefix("http://")]
        headers = {}
        if step == "prefill":
            headers = {"x-prefiller-host-port": prefill_pod.url.removeprefix("http://")}
        try:
            async with running_router(flags) as (_, url), aiohttp.ClientSession() as s:
                status, answer = await _post(s, url, "/v1/completions", _completion(), headers)
                assert status == 502, answer
                message = answer["error"]["message"]
                assert redirecting.url in message and "307" in message, message
            assert elsewhere.received == []  # the body went nowhere else
            assert len(redirecting.received) == 1
        finally:
            for server in (pod, elsewhere, prefill_pod):
                await server.stop()

    asyncio.run(run())


def test_deeply_nested_json_is_a_400_naming_the_problem():
    async def run() -> None:
        pod = await RecordingPod().start()
        try:
            async with running_router(["--pod", pod.url]) as (_, url), aiohttp.ClientSession() as s:
                for depth in (100_000, 150):
                    nested = "[" * depth + "]" * depth
                    raw = f'{{"model": "{MODEL}", "prompt": {nested}}}'
                    async with s.post(url + "/v1/completions", data=raw) as response:
                        answer = json.loads(await response.text())
                        assert response.status == 400, answer
                    assert "nests JSON deeper than" in answer["error"]["message"]
                assert (await _post(s, url, "/v1/completions", _completion()))[0] == 200
            assert len(pod.received) == 1
        finally:
            await pod.stop()

    asyncio.run(run())


def test_an_authorization_header_that_is_not_utf8_is_a_401():
    async def run() -> None:
        pod = await RecordingPod().start()
        flags = ["--pod", pod.url, "--api-key", "k3y"]
        try:
            async with running_router(flags) as (_, url), aiohttp.ClientSession() as s:
                host, port = url.removeprefix("http://").split(":")
                reader, writer = await asyncio.open_connection(host, int(port))
                body = json.dumps(_completion()).encode()
                writer.write(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer \xff\xfe\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                status_line = await reader.readline()
                writer.close()
                assert status_line.split()[1] == b"401", status_line
                ok = {"Authorization": "Bearer k3y"}
                assert (await _post(s, url, "/v1/completions", _completion(), ok))[0] == 200
        finally:
            await pod.stop()

    asyncio.run(run())
