"""The P/D side-channel wire: typed, versioned msgspec messages, size-checked before decoding.

A decode worker (DEALER) talks to a prefill worker (ROUTER), one request frame, one reply:

    ReadBlocks(transfer_id, fingerprint, block_ids)  ->  BlocksHeader + one data frame
                                                     |   ShmBlocksHeader (same host, below)
                                                     |   TransferError
    ReleaseTransfer(transfer_id, success, reason)    ->  Ack | TransferError

The data frame holds the pages of the requested blocks, block-major: for each block id in the
order asked, every layer's page, in layer order (the order of `vllm_llmd.ops`' gather).

Same host: a ReadBlocks whose `host_id` equals the prefill worker's own (see `shm.py`) may be
answered with ShmBlocksHeader instead: the same bytes, in the named shared-memory segment, and
no data frame. A decode worker that cannot open the segment reads again with no host_id.

Same host, KV on CUDA (`cuda_ipc.py`): a ReadBlocks may also carry `ipc_cache` (CUDA IPC
handles of the decode worker's KV cache) and `ipc_block_ids` (where the blocks go there); a
prefill worker that can write them device to device does, and answers IpcBlocksWritten. One
that cannot open them answers TransferError `ipc_unavailable` (the decode worker asks again
without); one without the path ignores the fields and answers as above.
"""

from __future__ import annotations

import msgspec

# Version history:
#   1: first version (read in chunks, release with outcome, fingerprint per read);
#      compatible additions: ReadBlocks.host_id and the ShmBlocksHeader reply (same host);
#      ReadBlocks.ipc_cache/ipc_block_ids and the IpcBlocksWritten reply (same host, CUDA).
PROTOCOL_VERSION = 1
# No control message is anywhere near this; a larger frame is refused before decoding.
MAX_CONTROL_BYTES = 1 << 20


class KVLayoutFingerprint(msgspec.Struct, frozen=True, kw_only=True):
    """What both sides must agree on before a byte of KV moves between them."""

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    layout: str
    tensor_parallel_size: int
    # bytes of one block of one layer on one worker
    page_bytes: int

    def differences(self, other: KVLayoutFingerprint) -> list[str]:
        """Human-readable `field: ours != theirs` for each field that differs."""
        return [
            f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in self.__struct_fields__
            if getattr(self, name) != getattr(other, name)
        ]


class CudaIpcStorage(msgspec.Struct, frozen=True, kw_only=True):
    """One CUDA allocation, as torch's `UntypedStorage._share_cuda_()` describes it."""

    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class CudaIpcCache(msgspec.Struct, frozen=True, kw_only=True):
    """A decode worker's paged KV cache (`vllm_llmd.ops.PagedKVCache`), for a same-host
    prefill worker to write into: its storages, and where each segment's block 0 sits."""

    device_uuid: str
    storages: list[CudaIpcStorage]
    # per segment, in PagedKVCache order: index into storages, byte offset of block 0
    segment_storages: list[int]
    segment_offsets: list[int]
    num_blocks: int
    page_bytes: int
    block_stride: int


class ReadBlocks(msgspec.Struct, tag="read", kw_only=True):
    version: int
    transfer_id: str
    fingerprint: KVLayoutFingerprint
    # prefill-side block ids, in the order the data frame must hold them
    block_ids: list[int]
    # the decode worker's shm.host_id(); empty: answer with a data frame
    host_id: str = ""
    # same host, CUDA: write block_ids[i] into the decode cache's block ipc_block_ids[i]
    ipc_cache: CudaIpcCache | None = None
    ipc_block_ids: list[int] = []


class ReleaseTransfer(msgspec.Struct, tag="release", kw_only=True):
    version: int
    transfer_id: str
    # False: the decode side gave up (its reason says why); the blocks are freed either way
    success: bool
    reason: str = ""


class BlocksHeader(msgspec.Struct, tag="blocks", kw_only=True):
    version: int
    transfer_id: str
    num_blocks: int
    # bytes of one block id in the data frame (every layer's page of it)
    block_bytes: int


class ShmBlocksHeader(msgspec.Struct, tag="shm_blocks", kw_only=True):
    version: int
    transfer_id: str
    num_blocks: int
    block_bytes: int
    # the segment holding num_blocks * block_bytes bytes from its start
    shm_name: str


class IpcBlocksWritten(msgspec.Struct, tag="ipc_written", kw_only=True):
    """The blocks are in the decode worker's cache (the copy finished before this was sent)."""

    version: int
    transfer_id: str
    num_blocks: int


class Ack(msgspec.Struct, tag="ack", kw_only=True):
    version: int
    transfer_id: str


class TransferError(msgspec.Struct, tag="error", kw_only=True):
    version: int
    transfer_id: str
    # one of ERROR_CODES
    code: str
    message: str


# Error codes a prefill worker answers with.
UNKNOWN_TRANSFER = "unknown_transfer"  # retryable for a short grace (not registered yet)
BAD_REQUEST = "bad_request"
INCOMPATIBLE = "incompatible"
IPC_UNAVAILABLE = "ipc_unavailable"  # the CUDA IPC handles could not be used: read without
ERROR_CODES = (UNKNOWN_TRANSFER, BAD_REQUEST, INCOMPATIBLE, IPC_UNAVAILABLE)

Request = ReadBlocks | ReleaseTransfer
Reply = BlocksHeader | ShmBlocksHeader | IpcBlocksWritten | Ack | TransferError

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


class WireError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def encode(message: Request | Reply) -> bytes:
    return _encoder.encode(message)


def _check(frame: bytes | memoryview, decoder: msgspec.msgpack.Decoder) -> Request | Reply:
    if len(frame) > MAX_CONTROL_BYTES:
        raise WireError(f"control frame of {len(frame)} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        message = decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise WireError(f"undecodable frame: {exc}") from None
    if message.version != PROTOCOL_VERSION:
        raise WireError(
            f"peer speaks LLMD transfer protocol v{message.version}, this side v{PROTOCOL_VERSION}"
        )
    return message


def decode_request(frame: bytes | memoryview) -> Request:
    return _check(frame, _request_decoder)


def decode_reply(frame: bytes | memoryview) -> Reply:
    return _check(frame, _reply_decoder)
