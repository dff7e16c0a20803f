"""The P/D side-channel wire: typed, versioned msgspec messages, size-checked before decoding.

A decode worker talks to a prefill worker over one TCP connection, one request, one reply, each
a frame of `framing.py` (a bounded header, this module's msgpack control part, and for a
BlocksHeader the data part):

    ReadBlocks(transfer_id, fingerprint, block_ids)  ->  BlocksHeader + data
                                                     |   ShmBlocksHeader (same host, below)
                                                     |   TransferError
    ReadHeads(... as ReadBlocks, head_start, head_end)   (the same replies)
    ReleaseTransfer(transfer_id, success, reason, num_consumers)  ->  Ack | TransferError

With TLS on, each side's first frame is a KeyShare (inside the TLS session), and every frame
after them travels in sealed records (`sealing.py`):

    KeyShare(share)  ->  KeyShare(share) | TransferError

The data part holds the pages of the requested blocks, block-major: for each block id in the
order asked, every layer's page, in layer order (the order of `vllm_llmd.ops`' gather).

Unequal TP sizes (`tp_mapping.py`): a ReadHeads reads only heads [head_start, head_end) of
the prefill worker's own heads of each block (the data part as `head_slices.py` lays it out;
`block_bytes` in the reply is then the bytes of that slice of one block). It is a message of
its own so that a prefill worker without it refuses it (an unknown tag: `bad_request`) instead
of answering whole blocks. A prefill worker read by several decode workers frees the blocks
once `num_consumers` releases came (each decode worker states how many read it).

Same host: a ReadBlocks whose `host_id` equals the prefill worker's own (see `shm.py`) may be
answered with ShmBlocksHeader instead: the same bytes, in the named shared-memory segment, and
no data part. A decode worker that cannot open the segment reads again with no host_id.

Same host, KV on CUDA (`cuda_ipc.py`): a ReadBlocks may also carry `ipc_cache` (CUDA IPC
handles of the decode worker's KV cache) and `ipc_block_ids` (where the blocks go there); a
prefill worker that can write them device to device does, and answers IpcBlocksWritten. One
that cannot open them answers TransferError `ipc_unavailable` (the decode worker asks again
without); one without the path ignores the fields and answers as above.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec

from vllm_llmd.kv_layout import KVLayoutFingerprint

# Version history:
#   1: first version (bounded reads, release with outcome, fingerprint per read);
#      compatible additions: ReadBlocks.host_id and the ShmBlocksHeader reply (same host);
#      ReadBlocks.ipc_cache/ipc_block_ids and the IpcBlocksWritten reply (same host, CUDA).
#   2: plain TCP with our own bounded framing (`framing.py`) instead of ZMQ multipart messages,
#      whose total size nothing bounds; error codes `too_large` and `unavailable`;
#      compatible additions: ReadHeads and ReleaseTransfer.num_consumers (unequal TP sizes);
#      KeyShare, each side's first message inside a TLS connection (`sealing.py`).
PROTOCOL_VERSION = 2
# No control message is anywhere near this; a larger frame is refused before decoding.
MAX_CONTROL_BYTES = 1 << 20


# Bytes of a CUDA IPC memory handle (CU_IPC_HANDLE_SIZE in cuda.h).
CUDA_IPC_HANDLE_BYTES = 64


class CudaIpcStorage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One storage of a decode worker's KV cache: the CUDA allocation holding it (its IPC
    handle, from cuIpcGetMemHandle on the allocation's base) and where in that allocation it
    lies. The prefill worker maps the allocation itself and checks this range against the
    allocation's real size (`cuda_ipc.py`): no field is trusted.

    Strict: a description in the first format (torch's `_share_cuda_`, with a ref-counter
    file and offset) is refused at decoding, naming the field, rather than half-read.
    """

    handle: bytes
    # the storage's first byte, counted from the allocation's base, and its length
    offset_bytes: int
    size_bytes: int


class CudaIpcCache(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A decode worker's paged KV cache (`vllm_llmd.ops.PagedKVCache`), for a same-host
    prefill worker to write into: its storages, and where each segment's block 0 sits."""

    device_uuid: str
    storages: list[CudaIpcStorage]
    # per segment, in PagedKVCache order: index into storages, byte offset of block 0 there
    segment_storages: list[int]
    segment_offsets: list[int]
    num_blocks: int
    page_bytes: int
    block_stride: int


class ReadBlocks(msgspec.Struct, tag="read", kw_only=True):
    version: int
    transfer_id: str
    fingerprint: KVLayoutFingerprint
    # prefill-side block ids, in the order the data part must hold them
    block_ids: list[int]
    # the decode worker's shm.host_id(); empty: answer with a data part
    host_id: str = ""
    # same host, CUDA: write block_ids[i] into the decode cache's block ipc_block_ids[i]
    ipc_cache: CudaIpcCache | None = None
    ipc_block_ids: list[int] = []


# Bounds of the head and consumer counts a peer may name (no model has more KV heads).
MAX_HEADS = 1 << 12
MAX_CONSUMERS = 256
_HeadIndex = Annotated[int, msgspec.Meta(ge=0, le=MAX_HEADS)]


class ReadHeads(ReadBlocks, tag="read_heads", kw_only=True):
    """A ReadBlocks of only heads [head_start, head_end) of the prefill worker's own heads."""

    head_start: _HeadIndex
    head_end: _HeadIndex


class ReleaseTransfer(msgspec.Struct, tag="release", kw_only=True):
    version: int
    transfer_id: str
    # False: the decode side gave up (its reason says why); the blocks are freed either way
    success: bool
    reason: str = ""
    # decode workers that read this prefill worker: the blocks are freed at the last release
    num_consumers: Annotated[int, msgspec.Meta(ge=1, le=MAX_CONSUMERS)] = 1


class BlocksHeader(msgspec.Struct, tag="blocks", kw_only=True):
    version: int
    transfer_id: str
    num_blocks: int
    # bytes of one block id in the data part (every layer's page of it)
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


# bytes of each side's share of a sealed connection's keys
KEY_SHARE_BYTES = 32


class KeyShare(msgspec.Struct, tag="key_share", kw_only=True):
    """Sealed connections (`sealing.py`, TLS on): a side's random share of the connection's
    keys, sent inside the mutual TLS session, once each way (the decode worker's first),
    before any other message. Not a Request: a prefill worker that does not seal refuses it
    as an unknown tag (`bad_request`)."""

    version: int
    share: Annotated[bytes, msgspec.Meta(min_length=KEY_SHARE_BYTES, max_length=KEY_SHARE_BYTES)]


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
TOO_LARGE = "too_large"  # a read of more bytes than the prefill's max_chunk_bytes
UNAVAILABLE = "unavailable"  # the prefill worker's side channel failed: do not retry
ERROR_CODES = (UNKNOWN_TRANSFER, BAD_REQUEST, INCOMPATIBLE, IPC_UNAVAILABLE, TOO_LARGE, UNAVAILABLE)

Request = ReadBlocks | ReadHeads | ReleaseTransfer
Reply = BlocksHeader | ShmBlocksHeader | IpcBlocksWritten | Ack | TransferError

_encoder = msgspec.msgpack.Encoder()
_request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
# the answer to a key share: the other side's, or why it refused the connection
_key_share_decoder: msgspec.msgpack.Decoder[KeyShare | TransferError] = msgspec.msgpack.Decoder(
    KeyShare | TransferError
)
_reply_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)
_Message = TypeVar("_Message", Request, Reply, KeyShare | TransferError)


class WireError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def encode(message: Request | Reply | KeyShare) -> bytes:
    return _encoder.encode(message)


def read_request(
    transfer_id: str,
    fingerprint: KVLayoutFingerprint,
    block_ids: list[int],
    *,
    host_id: str = "",
    heads: tuple[int, int] | None = None,
    ipc_cache: CudaIpcCache | None = None,
    ipc_block_ids: list[int] | None = None,
) -> ReadBlocks:
    """A ReadBlocks, or a ReadHeads of heads [start, end) (never with CUDA IPC: whole blocks)."""
    if heads is not None:
        return ReadHeads(
            version=PROTOCOL_VERSION,
            transfer_id=transfer_id,
            fingerprint=fingerprint,
            block_ids=block_ids,
            host_id=host_id,
            head_start=heads[0],
            head_end=heads[1],
        )
    return ReadBlocks(
        version=PROTOCOL_VERSION,
        transfer_id=transfer_id,
        fingerprint=fingerprint,
        block_ids=block_ids,
        host_id=host_id,
        ipc_cache=ipc_cache,
        ipc_block_ids=ipc_block_ids or [],
    )


def error(transfer_id: str, code: str, message: str) -> TransferError:
    return TransferError(
        version=PROTOCOL_VERSION, transfer_id=transfer_id, code=code, message=message
    )


def _check(frame: bytes | memoryview, decoder: msgspec.msgpack.Decoder[_Message]) -> _Message:
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


def decode_key_share(frame: bytes | memoryview) -> KeyShare | TransferError:
    return _check(frame, _key_share_decoder)
