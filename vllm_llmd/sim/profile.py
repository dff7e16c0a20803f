"""How long a simulated pod's engine step takes: a small linear latency profile.

One engine step runs every scheduled request's tokens together (vLLM's continuous batching
with chunked prefill), so its time is a sum of what it carries:

    step_s = base_s
           + prefill_s_per_token * uncached prompt tokens computed this step
           + prefill_s_per_cached_token * cached prompt tokens those chunks attend to
           + decode_s_per_seq * requests decoding this step
           + decode_s_per_ktoken * thousands of context tokens the decodes attend to

A request's TTFT also carries `request_s` outside the engine (HTTP, tokenizing, the answer's
way back): latency, not engine time, so it delays no other request.

Each coefficient reads as "seconds per unit" and is fitted by `calibrate.py` from a real server
(TTFT against uncached tokens and batch, TPOT against batch). Profiles are made by that command
and saved as JSON (`load_profile`/`save_profile`); none is committed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    """Seconds per unit of each part of an engine step (see the module docstring)."""

    # per step: the weights are read once whatever the batch (the decode floor)
    base_s: float
    prefill_s_per_token: float
    prefill_s_per_cached_token: float
    decode_s_per_seq: float
    decode_s_per_ktoken: float
    # where the numbers come from (a URL and date, or "assumed: ...")
    source: str = ""
    # seconds a request's TTFT spends outside the engine (a profile without it: none)
    request_s: float = 0.0

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        negative = {name: v for name, v in values.items() if v < 0}
        if negative:
            raise ValueError(f"a latency profile's coefficients must be >= 0: {negative}")

    def step_s(
        self,
        prefill_tokens: int,
        prefill_cached_tokens: int,
        num_decodes: int,
        decode_context_tokens: int,
    ) -> float:
        """Seconds of one engine step carrying these tokens."""
        return (
            self.base_s
            + self.prefill_s_per_token * prefill_tokens
            + self.prefill_s_per_cached_token * prefill_cached_tokens
            + self.decode_s_per_seq * num_decodes
            + self.decode_s_per_ktoken * decode_context_tokens / 1000.0
        )


# Assumed, not measured: an H100 (80 GB) serving Llama-3.1-8B in bf16 with vLLM. Prefill at
# about 25k tokens/s (16 GFLOP a token at ~40% of the H100's 990 dense bf16 TFLOP/s); a decode
# step floor of ~8 ms (16 GB of weights at 3.35 TB/s, plus launch overhead); each decoding
# request adds ~50 us and its context ~40 us per 1k tokens (128 KiB of KV a token read at
# 3.35 TB/s); a cached token a prefill attends to costs ~1/20 of computing one. Replace it with
# `vllm-llmd-sim calibrate URL` against the hardware you want to model.
H100_LLAMA_8B = LatencyProfile(
    base_s=0.008,
    prefill_s_per_token=40e-6,
    prefill_s_per_cached_token=2e-6,
    decode_s_per_seq=50e-6,
    decode_s_per_ktoken=40e-6,
    source="assumed: H100 80GB, Llama-3.1-8B bf16 (see vllm_llmd/sim/profile.py)",
)


def load_profile(path: str | Path) -> LatencyProfile:
    """A profile from a JSON file written by `save_profile` (unknown keys are an error)."""
    data = json.loads(Path(path).read_text())
    known = {f.name for f in fields(LatencyProfile)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown latency profile keys {sorted(unknown)}")
    return LatencyProfile(**data)


def save_profile(profile: LatencyProfile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(asdict(profile), indent=2) + "\n")
