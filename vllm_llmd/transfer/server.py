"""Prefill side of the side channel: a ZMQ ROUTER thread serving reads of held KV blocks.

Each read is checked (protocol version, transfer id, fingerprint, block ids the transfer holds)
before a byte is copied; the blocks are gathered once into a staging buffer that goes out as a
zero-copy frame, or, for a decode worker on the same host, into a shared-memory segment whose
name goes out instead (`shm.py`), or, when that worker sent CUDA IPC handles of its cache,
straight into its blocks, device to device (`cuda_ipc.py`). The transfer stays pinned in the
registry (READING) only while the gather (or the device copy) runs; the send itself reads the
staging buffer, not the KV cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import zmq

from vllm_llmd.log import get_logger
from vllm_llmd.transfer import messages as wire
from vllm_llmd.transfer.registry import SendRegistry
from vllm_llmd.transfer.shm import ShmStaging, host_id

logger = get_logger(__name__)

# gather(block_ids, out) -> contiguous uint8 tensor, block-major, every layer's page per block:
# `out` when given (filled), else a new one
GatherFn = Callable[[list[int], torch.Tensor | None], torch.Tensor]
# ipc_write(block_ids, peer cache, peer block ids): a device-to-device copy, done on return
# (CudaIpcWriter.write); raises IpcUnavailable, or ValueError for a bad description
IpcWriteFn = Callable[[list[int], wire.CudaIpcCache, list[int]], None]


class TransferServer:
    """Serves `ReadBlocks` and `ReleaseTransfer` for one worker, on its own thread."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: SendRegistry,
        gather: GatherFn,
        fingerprint: wire.KVLayoutFingerprint,
        block_bytes: int,
        *,
        same_host_shm: bool = True,
        ipc_write: IpcWriteFn | None = None,
    ) -> None:
        self.registry = registry
        self.host_id = host_id() if same_host_shm else ""
        self._ipc_write = ipc_write
        self._shm = ShmStaging()
        self._gather = gather
        self._fingerprint = fingerprint
        self._block_bytes = block_bytes
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # A peer cannot make us buffer more than one control message's worth per frame.
        self._socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_CONTROL_BYTES)
        if port == 0:
            self.port = self._socket.bind_to_random_port(f"tcp://{host}")
        else:
            self._socket.bind(f"tcp://{host}:{port}")
            self.port = port
        self.host = host
        self.bytes_sent = 0
        self.bytes_shared = 0  # sent through shared memory
        self.bytes_ipc = 0  # written into same-host peers' GPU caches
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name="llmd-transfer-server", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close(linger=0)
        self._shm.close()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            frames = self._socket.recv_multipart(copy=False)
            identity, payload = frames[0].bytes, frames[-1].buffer
            try:
                reply = self._handle(identity, wire.decode_request(payload))
            except wire.WireError as exc:
                logger.warning("LLMD side channel: refused a malformed request: %s", exc)
                reply = [
                    wire.TransferError(
                        version=wire.PROTOCOL_VERSION,
                        transfer_id="",
                        code=wire.BAD_REQUEST,
                        message=str(exc),
                    )
                ]
            except Exception as exc:  # never let one request kill the server thread
                logger.exception("LLMD side channel: request failed")
                reply = [
                    wire.TransferError(
                        version=wire.PROTOCOL_VERSION,
                        transfer_id="",
                        code=wire.BAD_REQUEST,
                        message=f"internal error: {exc}",
                    )
                ]
            header, *data = reply
            self._socket.send_multipart([identity, wire.encode(header), *data], copy=False)

    def _handle(self, identity: bytes, request: wire.Request) -> list:
        if isinstance(request, wire.ReleaseTransfer):
            self.registry.release(request.transfer_id, request.success, request.reason)
            return [wire.Ack(version=wire.PROTOCOL_VERSION, transfer_id=request.transfer_id)]
        return self._read(identity, request)

    def _read(self, identity: bytes, request: wire.ReadBlocks) -> list:
        def error(code: str, message: str) -> list:
            return [
                wire.TransferError(
                    version=wire.PROTOCOL_VERSION,
                    transfer_id=request.transfer_id,
                    code=code,
                    message=message,
                )
            ]

        differences = self._fingerprint.differences(request.fingerprint)
        if differences:
            return error(
                wire.INCOMPATIBLE,
                "KV layouts differ (prefill vs decode): " + "; ".join(differences),
            )
        problem = self.registry.begin_read(request.transfer_id, request.block_ids)
        if problem is not None:
            return error(wire.UNKNOWN_TRANSFER, problem)
        same_host = bool(self.host_id) and request.host_id == self.host_id
        if same_host and request.ipc_cache is not None and self._ipc_write is not None:
            return self._write_ipc(request, error)
        try:
            if same_host:
                nbytes = len(request.block_ids) * self._block_bytes
                shm_name, out = self._shm.buffer_for(identity, nbytes)
                self._gather(request.block_ids, out)
                del out  # the segment may be resized or unlinked later: no view outlives this
            else:
                staging = self._gather(request.block_ids, None)
        finally:
            self.registry.end_read(request.transfer_id)
        if same_host:
            self.bytes_shared += nbytes
            shm_header = wire.ShmBlocksHeader(
                version=wire.PROTOCOL_VERSION,
                transfer_id=request.transfer_id,
                num_blocks=len(request.block_ids),
                block_bytes=self._block_bytes,
                shm_name=shm_name,
            )
            return [shm_header]
        self.bytes_sent += staging.numel()
        header = wire.BlocksHeader(
            version=wire.PROTOCOL_VERSION,
            transfer_id=request.transfer_id,
            num_blocks=len(request.block_ids),
            block_bytes=self._block_bytes,
        )
        # pyzmq keeps a reference to the buffer until the I/O thread has sent it.
        return [header, memoryview(staging.numpy()).cast("B")]

    def _write_ipc(self, request: wire.ReadBlocks, error: Callable[[str, str], list]) -> list:
        """The blocks straight into the peer's cache (the read is already begun)."""
        assert self._ipc_write is not None and request.ipc_cache is not None
        try:
            self._ipc_write(request.block_ids, request.ipc_cache, request.ipc_block_ids)
        except ValueError as exc:
            return error(wire.BAD_REQUEST, f"CUDA IPC write refused: {exc}")
        except Exception as exc:  # IpcUnavailable, or a CUDA error of the copy: not fatal
            logger.warning("LLMD side channel: %s; that peer reads without CUDA IPC", exc)
            return error(wire.IPC_UNAVAILABLE, str(exc))
        finally:
            self.registry.end_read(request.transfer_id)
        self.bytes_ipc += len(request.block_ids) * self._block_bytes
        return [
            wire.IpcBlocksWritten(
                version=wire.PROTOCOL_VERSION,
                transfer_id=request.transfer_id,
                num_blocks=len(request.block_ids),
            )
        ]
