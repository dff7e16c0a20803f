"""Decode side of P/D: the remote prefill as the last tier of the scheduler half's tier loop.

A request sent with the `kv_transfer_params` our prefill answered (`RemotePrefillParams`)
covers its prompt from token 0; it adds what the device cache and our other tiers lack, and
`plan_load` maps the remote blocks onto the blocks vLLM allocated (`RecvSpec`: the worker half
pulls them; from a prefill of another TP size too, head slice by head slice, when the model's
whole KV agrees: `KVLayoutFingerprint.tp_differences`). The params come from the decode
instance's API client: `_check_remote` stands between a crafted request and a connection, a
pinned block or a cached block; anything wrong is recomputed. When the request will not load
(whole prompt cached locally, another prompt, bad params, vLLM loads nothing, finished
first), the prefill's blocks are released at once (`ReleaseSpec`) — but only for params that
parsed and passed the host allowlist: with anything else there is nowhere safe to send it,
and the prefill's lease frees the blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vllm_llmd.connector.config import LLMDConnectorConfig
from vllm_llmd.connector.metadata import RecvSpec, ReleaseSpec
from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.log import get_logger
from vllm_llmd.transfer.params import (
    ParamsError,
    RemotePrefillParams,
    is_llmd_remote_prefill,
    prompt_digest,
)

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from vllm_llmd.connector.metadata import LLMDConnectorMetadata
    from vllm_llmd.connector.request_state import RequestState
    from vllm_llmd.job_tally import JobTally

logger = get_logger(__name__)


class RemotePrefillPlanner:
    """The remote prefill's `TierPlanner`: pulls and releases of a decode instance."""

    def __init__(self, config: LLMDConnectorConfig, fingerprint: KVLayoutFingerprint) -> None:
        self.fingerprint = fingerprint
        self.block_size = fingerprint.block_size
        self._allowed_hosts = config.prefill_host_allowlist()
        # this step's pulls and releases for the worker half
        self._recvs: list[RecvSpec] = []
        self._releases: list[ReleaseSpec] = []

    def hit(self, state: RequestState, num_local_tokens: int) -> int | None:
        """The tokens the remote prefill holds, if it is usable and adds any (else released)."""
        state.remote = None
        request = state.request
        if not is_llmd_remote_prefill(request.kv_transfer_params):
            return 0
        remote, problem = self._check_remote(request)
        if problem:
            self._release_remote(request, problem, remote)
            return 0
        assert remote is not None
        if remote.num_tokens <= num_local_tokens:
            self._release_remote(request, "prompt fully cached on the decode instance", remote)
            return 0
        state.remote = remote
        return remote.num_tokens

    def plan_load(self, state: RequestState, first_token: int, block_ids: list[int]) -> None:
        request, remote = state.request, state.remote
        assert remote is not None, "plan_load without a usable remote prefill"
        state.remote = None  # the pull owns it now
        first = first_token // self.block_size
        last = math.ceil(remote.num_tokens / self.block_size)
        remote_block_ids = remote.block_ids[first:last]
        if len(block_ids) != len(remote_block_ids) or len(remote_block_ids) != last - first:
            # Cannot happen for params our prefill made for this prompt; recompute if it does.
            logger.error(
                "LLMDConnector: request %s: %d local vs %d remote blocks for tokens %d..%d; "
                "the load is reported failed",
                request.request_id,
                len(block_ids),
                len(remote_block_ids),
                first * self.block_size,
                remote.num_tokens,
            )
            remote_block_ids = ()
        self._recvs.append(
            RecvSpec(
                request_id=request.request_id,
                host=remote.host,
                ports=remote.ports,
                transfer_id=remote.transfer_id,
                fingerprint=remote.fingerprint,
                remote_block_ids=tuple(remote_block_ids),
                local_block_ids=tuple(block_ids),
                num_tokens=remote.num_tokens - first_token,
            )
        )
        # a later preemption recomputes instead
        request.kv_transfer_params["do_remote_prefill"] = False

    def release(self, state: RequestState) -> None:
        remote, state.remote = state.remote, None
        if remote is not None:
            self._release_remote(state.request, "the decode instance did not load it", remote)

    def complete_load(self, state: RequestState, ok: bool) -> None:
        return None  # the worker half released the prefill's blocks after the pull

    def finish(self, state: RequestState) -> None:
        state.remote = None
        request = state.request
        if is_llmd_remote_prefill(request.kv_transfer_params):  # ended before it ever loaded
            remote, _ = self._check_remote(request)
            reason = f"decode request ended first ({request.status.name})"
            self._release_remote(request, reason, remote)

    def plan_stores(
        self, scheduled: Sequence[tuple[RequestState, int]], scheduler_output: SchedulerOutput
    ) -> None:
        return None  # a prefill's blocks are handed off at request_finished, not stored

    def take_step(self, metadata: LLMDConnectorMetadata) -> None:
        metadata.recvs, metadata.releases = self._recvs, self._releases
        self._recvs, self._releases = [], []

    def on_results(self, results: JobTally) -> None:
        return None  # pulls end through finished_recving

    # ---- checks --------------------------------------------------------------------------

    def _check_remote(self, request: Request) -> tuple[RemotePrefillParams | None, str]:
        """(params, "") when this request may pull them; else (params or None, the problem).

        The params come from the decode instance's API client: each check here stands between
        a crafted request and a connection, a pinned block or a cached block."""
        try:
            remote = RemotePrefillParams.from_dict(request.kv_transfer_params)
        except ParamsError as exc:
            logger.error("LLMDConnector: request %s: %s; recomputing", request.request_id, exc)
            return None, str(exc)
        num_prompt = len(request.prompt_token_ids or ())
        if self._allowed_hosts is not None and not self._allowed_hosts.allows(remote.host):
            logger.error(
                "LLMDConnector: request %s: prefill host %r is not in allowed_prefill_hosts; "
                "recomputing",
                request.request_id,
                remote.host,
            )
            return None, "prefill host not allowed"  # and no release: no connection to it
        differences = remote.fingerprint.tp_differences(self.fingerprint)
        if len(remote.ports) != remote.fingerprint.tensor_parallel_size:
            problem = (
                f"params name {len(remote.ports)} side-channel ports for a prefill of "
                f"tensor-parallel size {remote.fingerprint.tensor_parallel_size}"
            )
        elif differences:
            problem = "KV layouts differ (prefill vs decode): " + "; ".join(differences)
        elif remote.num_tokens > num_prompt:
            problem = f"params cover {remote.num_tokens} tokens, the prompt has {num_prompt}"
        elif prompt_digest(list(request.prompt_token_ids or ())) != remote.prompt_digest:
            problem = "the prefill ran another prompt (token ids differ)"
        else:
            return remote, ""
        logger.error("LLMDConnector: request %s: %s; recomputing", request.request_id, problem)
        return remote, problem

    def _release_remote(
        self, request: Request, reason: str, remote: RemotePrefillParams | None
    ) -> None:
        """Queue a release of the prefill's blocks, once; this request will not load them.

        Only params that passed `from_dict` and the host allowlist are released: with anything
        else there is nowhere safe to send it, and the prefill's lease frees the blocks."""
        request.kv_transfer_params["do_remote_prefill"] = False
        if remote is None:
            return
        if self._allowed_hosts is not None and not self._allowed_hosts.allows(remote.host):
            return
        self._releases.append(ReleaseSpec(remote.host, remote.ports, remote.transfer_id, reason))
