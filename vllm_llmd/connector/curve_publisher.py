"""vLLM's ZMQ KV-event publisher with CURVE on its PUB and replay sockets (see `curve.py`).

`install()` (called by the plugin in every vLLM process whose environment names a CURVE variable)
puts `make_publisher` in the place of vLLM's "zmq" publisher, which builds `CurveEventPublisher`
when a secret key is named (vLLM's own publisher otherwise). A key that cannot be used fails
the engine's start with a message naming it: events are never published in clear when
encryption was asked for.

Imports vLLM: only vLLM processes load this module (readers take keys from `events.curve`).
"""

from __future__ import annotations

from typing import Any

import zmq
from vllm.distributed.kv_events import EventPublisher, EventPublisherFactory, ZmqEventPublisher
from zmq.auth import CURVE_ALLOW_ANY
from zmq.auth.thread import ThreadAuthenticator

from vllm_llmd.events.curve import CurveServerKeys
from vllm_llmd.log import get_logger

logger = get_logger(__name__)

PUBLISHER_NAME = "zmq"


class CurveEventPublisher(ZmqEventPublisher):
    """vLLM's publisher whose sockets are CURVE servers, on a ZMQ context of their own whose
    ZAP handler admits the configured readers (vLLM's other sockets share
    `zmq.Context.instance()` and stay as they are)."""

    def __init__(self, *args: Any, curve_keys: CurveServerKeys, **kwargs: Any) -> None:
        self._curve_keys = curve_keys
        self._authenticator: ThreadAuthenticator | None = None
        super().__init__(*args, **kwargs)

    def _socket_setup(self) -> None:
        if self._pub is None:
            assert self._endpoint is not None
            if not self._is_bind_endpoint(self._endpoint):
                raise ValueError(
                    f"kv_events_config endpoint {self._endpoint!r} connects out; a CURVE "
                    "publisher binds (give tcp://*:PORT) so that readers connect to it"
                )
            self._ctx = zmq.Context()
            self._authenticator = ThreadAuthenticator(self._ctx)
            self._authenticator.start()
            clients = self._curve_keys.clients_dir
            self._authenticator.configure_curve(
                domain="*", location=CURVE_ALLOW_ANY if clients is None else clients
            )
        super()._socket_setup()

    def _bind(self, sock: zmq.Socket, endpoint: str) -> str:  # type: ignore[override]
        # vLLM binds through this (staticmethod there): the options must be set before
        self._curve_keys.apply(sock)
        return ZmqEventPublisher._bind(sock, endpoint)

    def shutdown(self) -> None:
        super().shutdown()
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        self._ctx.destroy(linger=0)


def make_publisher(**kwargs: Any) -> EventPublisher:
    """The "zmq" publisher: CURVE when the environment names a secret key, else vLLM's own."""
    curve_keys = CurveServerKeys.from_env()
    if curve_keys is None:
        return ZmqEventPublisher(**kwargs)
    clients = curve_keys.clients_dir
    logger.info(
        "KV events: CURVE on, admitting %s",
        f"the readers whose keys are in {clients}" if clients else "any reader with the key",
    )
    return CurveEventPublisher(curve_keys=curve_keys, **kwargs)


def install() -> None:
    """Route vLLM's "zmq" publisher through `make_publisher` (idempotent)."""
    EventPublisherFactory._registry[PUBLISHER_NAME] = make_publisher
