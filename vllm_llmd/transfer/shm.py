"""Same-host fast path of the side channel: block bytes through POSIX shared memory.

When a decode worker and the prefill worker it pulls from share a host *and* an IPC namespace
(same machine, same container or `hostIPC`), the bytes need not cross a socket: the prefill
worker gathers the blocks straight into a shared-memory segment and answers with its name, and
the decode worker scatters from its mapping of it. Two memory copies instead of gather, send,
receive and scatter through the loopback stack.

Host identity (`host_id`) is the kernel's boot id plus the IPC namespace's inode, so two
containers on one node with private `/dev/shm`s never take this path by mistake; if a segment
still cannot be opened, the decode side asks again without it (the socket path).

Lifetime: the prefill side owns every segment: one per peer (connection), grown when a
larger read comes, reused by that peer's next read (a peer sends its next request only after
it consumed the previous reply), unlinked when its peer disconnects, when more than
`max_peers` peers have one (the least recent goes) and on close. Names are random; segments
are created 0600 by the OS.
"""

from __future__ import annotations

import os
import secrets
from collections import OrderedDict
from multiprocessing import resource_tracker, shared_memory

import torch

from vllm_llmd.log import get_logger

logger = get_logger(__name__)

_BOOT_ID = "/proc/sys/kernel/random/boot_id"
# segments this process created (a reader in the same process must leave their tracking alone)
_CREATED_HERE: set[str] = set()
_IPC_NAMESPACE = "/proc/self/ns/ipc"


def host_id() -> str:
    """Equal for two processes exactly when they can share POSIX shared memory."""
    try:
        with open(_BOOT_ID) as f:
            boot = f.read().strip()
        ipc = os.stat(_IPC_NAMESPACE).st_ino
    except OSError:
        return ""  # unknown: never claim to share memory
    return f"{boot}/{ipc}"


class ShmStaging:
    """The prefill side's segments, one per peer (module doc)."""

    def __init__(self, max_peers: int = 16) -> None:
        self.max_peers = max_peers
        self._segments: OrderedDict[bytes, shared_memory.SharedMemory] = OrderedDict()

    def buffer_for(self, peer: bytes, nbytes: int) -> tuple[str, torch.Tensor]:
        """(segment name, a uint8 tensor of nbytes over it) for this peer's next reply."""
        segment = self._segments.pop(peer, None)
        if segment is not None and segment.size < nbytes:
            _unlink(segment)
            segment = None
        if segment is None:
            name = "llmd_kv_" + secrets.token_hex(12)
            segment = shared_memory.SharedMemory(name=name, create=True, size=max(1, nbytes))
            _CREATED_HERE.add(segment.name)
        self._segments[peer] = segment
        while len(self._segments) > self.max_peers:
            _, oldest = self._segments.popitem(last=False)
            _unlink(oldest)
        view = torch.frombuffer(segment.buf, dtype=torch.uint8, count=nbytes)
        return segment.name, view

    def forget(self, peer: bytes) -> None:
        """The peer is gone: unlink its segment (its own mapping, if any, stays valid)."""
        segment = self._segments.pop(peer, None)
        if segment is not None:
            _unlink(segment)

    def close(self) -> None:
        while self._segments:
            _, segment = self._segments.popitem()
            _unlink(segment)


class ShmReader:
    """The decode side's mappings of prefill segments, by name (reused across reads)."""

    def __init__(self, max_segments: int = 16) -> None:
        self.max_segments = max_segments
        self._mapped: OrderedDict[str, shared_memory.SharedMemory] = OrderedDict()

    def view(self, name: str, nbytes: int) -> torch.Tensor:
        """nbytes of the named segment; OSError if it cannot be opened (another IPC space)."""
        if not name.startswith("llmd_kv_"):
            raise OSError(f"not an LLMD segment name: {name!r}")
        segment = self._mapped.pop(name, None)
        if segment is None:
            segment = shared_memory.SharedMemory(name=name, create=False)
            # The prefill side owns it: this process must not unlink it at exit (Python < 3.13
            # registers every attached segment with its resource tracker).
            if segment.name not in _CREATED_HERE:
                resource_tracker.unregister(segment._name, "shared_memory")
        self._mapped[name] = segment
        while len(self._mapped) > self.max_segments:
            _, oldest = self._mapped.popitem(last=False)
            _close(oldest)
        if segment.size < nbytes:
            raise OSError(f"segment {name} holds {segment.size} bytes, the reply says {nbytes}")
        return torch.frombuffer(segment.buf, dtype=torch.uint8, count=nbytes)

    def forget(self, name: str) -> None:
        segment = self._mapped.pop(name, None)
        if segment is not None:
            _close(segment)

    def close(self) -> None:
        while self._mapped:
            _, segment = self._mapped.popitem()
            _close(segment)


def _close(segment: shared_memory.SharedMemory) -> None:
    try:
        segment.close()
    except BufferError:  # a tensor still views it: the mapping goes with the last view
        logger.debug("shared memory %s still viewed; left mapped", segment.name)


def _unlink(segment: shared_memory.SharedMemory) -> None:
    _close(segment)
    _CREATED_HERE.discard(segment.name)
    try:
        segment.unlink()
    except FileNotFoundError:
        pass
