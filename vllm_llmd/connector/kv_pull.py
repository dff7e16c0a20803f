"""Decode side of P/D on one worker: pull a request's blocks from the prefill workers.

Equal TP sizes: worker r reads whole blocks from prefill worker r (through CUDA IPC, shared
memory or the socket, as `transfer/client.py` picks). Unequal ones (`transfer/tp_mapping.py`):
worker r reads its heads from each prefill worker holding them, one after another, and
scatters each slice into its heads' positions of the blocks (`transfer/head_slices.py`);
a pull that fails part way releases the prefill workers it did not read yet as failed, and
the prefill workers nobody reads (replicated heads) are released unread. The load is done
when every read is.
"""

from __future__ import annotations

import torch

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.metadata import RecvSpec, ReleaseSpec
from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.ops import PagedKVCache, scatter_blocks
from vllm_llmd.ops.copy_stream import CopyStreams
from vllm_llmd.transfer.client import PullSpec, TransferFailed, pull_blocks, release_transfer
from vllm_llmd.transfer.head_slices import HeadSlicer
from vllm_llmd.transfer.messages import CudaIpcCache
from vllm_llmd.transfer.tp_mapping import HeadRead, head_reads, unread_ranks_released_by


class KVPuller:
    """Pulls RecvSpecs into this worker's KV cache; releases what it will not read."""

    def __init__(
        self,
        config: LLMDConnectorConfig,
        fingerprint: KVLayoutFingerprint,
        tp_rank: int,
        kv_cache: PagedKVCache,
        head_slicer: HeadSlicer | None,
        ipc_cache: CudaIpcCache | None,
    ) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.tp_rank = tp_rank
        self.kv_cache = kv_cache
        self.head_slicer = head_slicer
        self.ipc_cache = ipc_cache
        # on CUDA each pull thread copies on a stream of its own: a read never waits behind
        # the forward vLLM is running (the blocks it fills are its request's alone)
        self._streams = CopyStreams(kv_cache.device)

    def reads_of(self, recv: RecvSpec) -> list[HeadRead]:
        """This worker's reads of a pull (one whole-block read when the TP sizes agree)."""
        prefill_tp, decode_tp = (
            recv.fingerprint.tensor_parallel_size,
            self.fingerprint.tensor_parallel_size,
        )
        if prefill_tp == decode_tp:
            heads = (0, self.fingerprint.num_kv_heads)
            return [HeadRead(self.tp_rank, heads, heads, 1, True, True)]
        return head_reads(self.tp_rank, prefill_tp, decode_tp, self.fingerprint.total_num_kv_heads)

    def pull(self, recv: RecvSpec) -> int:
        """Every read of recv into the local blocks; returns bytes received (raises on failure)."""
        if not recv.remote_block_ids:
            raise TransferFailed("no blocks to pull (block count mismatch)")
        reads = self.reads_of(recv)
        received, done = 0, 0
        try:
            for read in reads:
                received += self._read(recv, read)
                done += 1
        except Exception as exc:
            for read in reads[done + 1 :]:  # the failed one released itself
                self._release(
                    recv, read.prefill_rank, str(exc) or "pull failed", False, read.num_consumers
                )
            raise
        finally:
            self._release_unread(recv)
        return received

    def _read(self, recv: RecvSpec, read: HeadRead) -> int:
        whole = read.whole_source and read.whole_destination
        if not whole and self.head_slicer is None:
            raise TransferFailed(f"layout {self.fingerprint.layout} cannot take head slices")
        kv_cache, slicer, local_ids = self.kv_cache, self.head_slicer, recv.local_block_ids
        if whole:
            block_bytes = kv_cache.block_bytes
        else:
            assert slicer is not None
            block_bytes = slicer.block_bytes(read.src[1] - read.src[0])

        def scatter(first_index: int, data: torch.Tensor) -> None:
            ids = list(local_ids[first_index : first_index + data.numel() // block_bytes])
            with self._streams.copies():  # done before the next read reuses `data`
                if kv_cache.device.type == "cuda":
                    data = data.to(kv_cache.device, non_blocking=True)
                if whole:
                    scatter_blocks(kv_cache, ids, data)
                else:
                    assert slicer is not None
                    slicer.scatter(ids, read.dst, data)

        return pull_blocks(
            PullSpec(
                endpoint=f"tcp://{recv.host}:{recv.ports[read.prefill_rank]}",
                transfer_id=recv.transfer_id,
                fingerprint=recv.fingerprint,
                remote_block_ids=recv.remote_block_ids,
                block_bytes=block_bytes,
                ipc=self.ipc_cache if whole else None,
                local_block_ids=local_ids,
                heads=None if read.whole_source else read.src,
                num_consumers=read.num_consumers,
                pinned=kv_cache.device.type == "cuda",
            ),
            scatter,
            timeout_s=self.config.transfer_timeout_s,
            unknown_transfer_grace_s=self.config.unknown_transfer_grace_s,
            max_chunk_bytes=self.config.max_chunk_bytes,
            tls=self.config.side_channel_tls(server_side=False),
        )

    def _release_unread(self, recv: RecvSpec) -> None:
        prefill_tp, decode_tp = (
            recv.fingerprint.tensor_parallel_size,
            self.fingerprint.tensor_parallel_size,
        )
        if prefill_tp == decode_tp:
            return
        total = self.fingerprint.total_num_kv_heads
        for rank in unread_ranks_released_by(self.tp_rank, prefill_tp, decode_tp, total):
            self._release(recv, rank, "its heads were read from another prefill worker", True, 1)

    def _release(
        self, recv: RecvSpec, rank: int, reason: str, success: bool, consumers: int
    ) -> None:
        release_transfer(
            f"tcp://{recv.host}:{recv.ports[rank]}",
            recv.transfer_id,
            reason,
            self.config.transfer_timeout_s,
            tls=self.config.side_channel_tls(server_side=False),
            success=success,
            num_consumers=consumers,
        )


def release_endpoints(release: ReleaseSpec, tp_rank: int, tp_size: int) -> list[str]:
    """The prefill ranks decode worker tp_rank releases: ports[r], ports[r + tp], ... so that
    every prefill rank gets one release whatever the two instances' TP sizes are."""
    return [f"tcp://{release.host}:{port}" for port in release.ports[tp_rank::tp_size]]
