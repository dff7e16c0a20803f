"""Ask a publisher's replay socket for the batches a subscriber missed.

The publisher keeps its last `buffer_steps` batches; a DEALER sends a start seq and reads every
buffered batch from there on, then an end marker (frames in `wire.py`). Every wait is bounded:
a publisher that is down or slow costs at most `timeout` seconds per message. What one replay
may bring is bounded too (`max_messages` batches, `max_bytes` in all, each message at most
`max_message_bytes`): past that the reply is cut, `complete` is False and the subscriber reports
the rest as a gap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from vllm_llmd.events.curve import CurveClientKeys
from vllm_llmd.events.transport import RequestSocket, Transport, check_transport, open_request
from vllm_llmd.events.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FrameError,
    RawMessage,
    parse_replay,
    replay_request,
)

# vLLM keeps 10,000 batches (`buffer_steps`) by default: twice that, and a byte bound besides.
DEFAULT_MAX_REPLAY_MESSAGES = 20_000
DEFAULT_MAX_REPLAY_BYTES = 512 << 20

logger = logging.getLogger(__name__)


@dataclass
class ReplayResult:
    """What one replay request brought back."""

    # batches in the order sent (ascending seq)
    messages: list[RawMessage] = field(default_factory=list)
    # True when the end marker arrived, so `messages` is all the publisher had from start_seq
    complete: bool = False


class ReplayClient:
    """A DEALER on one publisher's replay endpoint (e.g. "tcp://127.0.0.1:5558")."""

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        timeout: float = 2.0,
        max_messages: int = DEFAULT_MAX_REPLAY_MESSAGES,
        max_bytes: int = DEFAULT_MAX_REPLAY_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        transport: Transport = "zmq",
        on_cut: Callable[[], None] | None = None,
        curve: CurveClientKeys | None = None,
    ) -> None:
        check_transport(transport, curve)
        if min(max_messages, max_bytes, max_message_bytes) <= 0:
            raise ValueError("max_messages, max_bytes and max_message_bytes must be > 0")
        self.endpoint = endpoint
        self.timeout = timeout
        # guard against a peer that never sends the end marker, or sends too much
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_message_bytes = max_message_bytes
        self.transport = transport
        self._context = context
        self._on_cut = on_cut
        self._curve = curve
        self._socket: RequestSocket | None = None

    def fetch(self, start_seq: int) -> ReplayResult:
        """Every buffered batch with seq >= start_seq, as far as the publisher answers in time."""
        socket = self._connected()
        result = ReplayResult()
        if not socket.send(replay_request(start_seq)):
            logger.warning("replay request to %s could not be sent", self.endpoint)
            self._drop_socket()
            return result
        num_bytes = 0
        while True:
            try:
                frames = socket.recv(self.timeout)
                if frames is None:
                    logger.warning(
                        "replay from %s timed out (or could not connect) after %d batches",
                        self.endpoint,
                        len(result.messages),
                    )
                    break
                message = parse_replay(frames)
            except FrameError as exc:
                logger.warning("replay from %s sent a bad message: %s", self.endpoint, exc)
                break
            if message is None:
                result.complete = True
                return result
            num_bytes += sum(len(frame) for frame in frames)
            if len(result.messages) >= self.max_messages or num_bytes > self.max_bytes:
                logger.warning(
                    "replay from %s cut after %d batches: at most %d batches and %d bytes are "
                    "read per replay; the rest counts as lost",
                    self.endpoint,
                    len(result.messages),
                    self.max_messages,
                    self.max_bytes,
                )
                break
            result.messages.append(message)
        # The rest of this reply may still arrive; a fresh socket keeps it out of the next one.
        self._drop_socket()
        return result

    def close(self) -> None:
        """Release the socket. Idempotent."""
        self._drop_socket()

    def _connected(self) -> RequestSocket:
        if self._socket is None:
            self._socket = open_request(
                self.transport,
                self.endpoint,
                max_message_bytes=self.max_message_bytes,
                context=self._context,
                on_cut=self._on_cut,
                curve=self._curve,
            )
        return self._socket

    def _drop_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
