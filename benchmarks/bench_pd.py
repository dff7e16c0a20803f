"""P/D benchmark: decode TTFT with the prompt's KV transferred vs recomputed, in one run.

Part 1 (no vLLM): bandwidth of LLMDConnector's side channel (TransferServer -> pull_blocks over
loopback TCP, real tensors the size of one long prompt's KV) against a plain memcpy of the same
bytes, and the socket with mutual TLS (side_channel_tls_*) against without, on the same bytes.

Part 2 (real vLLM CPU servers, bf16): for long unique prompts,
- recompute: TTFT of a plain vLLM that computes the whole prompt;
- LLMDConnector: a prefill instance runs the prompt, then the decode instance's TTFT with the
  prompt's KV pulled from it;
- NixlConnector (vLLM's own, UCX over host memory), same prompts, when `nixl` is installed;
- with `--tls`, a second LLMDConnector pair with mutual TLS on the side channel, its prompts
  interleaved with the plain pair's (the cost of encryption on decode TTFT). On one host the
  pull goes through shared memory, which TLS leaves as is; `--decode-apart` makes it cross
  TCP as between hosts;
- with `--variant NAME=JSON` (repeatable), one more LLMDConnector pair per variant with those
  `kv_connector_extra_config` keys (`"tls": true` adds the TLS keys), interleaved with the
  rest: an A/B of a connector setting on the same prompts, e.g.
  `--variant no-idle-wait='{"idle_wait_ms": 0}'`.

Each server gets one core (the prefill core 0, the others core 1), so TTFTs compare like for
like. With `--prefill-tp P --decode-tp D` (issue #25) every prefill instance runs TP size P and
every decode instance (and the recompute one) TP size D, one thread per rank, all unpinned:
pinned, two instances would share a core, and one that busy-loops while it holds P/D blocks
starves the other (README, "Running vLLM on CPU"). NixlConnector pairs unequal TP sizes too
(its `tp_mapping.py`), so the same pairing runs through both connectors.
Usage: `.venv/bin/python benchmarks/bench_pd.py [--preset medium] [--prompt-tokens 2000]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import ssl
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from vllm_llmd.devtools.client import complete, timed_stream
from vllm_llmd.devtools.model_maker import PRESETS, cached_model, sample_text
from vllm_llmd.devtools.server import VLLMServer, VLLMServerConfig, free_port, llmd_connector
from vllm_llmd.kv_layout import KVLayoutFingerprint
from vllm_llmd.transfer.client import PullSpec, pull_blocks
from vllm_llmd.transfer.registry import SendRegistry
from vllm_llmd.transfer.server import TransferServer
from vllm_llmd.transfer.tls import make_client_context, make_server_context

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = REPO_ROOT / "logs" / "bench_pd"
BLOCK = 128


def model_dir(preset: str) -> Path:
    return cached_model(preset, REPO_ROOT / ".cache" / "models")


def kv_bytes_per_block_per_layer(preset: str, dtype_bytes: int = 2) -> int:
    p = PRESETS[preset]
    return p.num_key_value_heads * BLOCK * 2 * p.head_dim * dtype_bytes


# ---- part 1: side channel vs memcpy ----------------------------------------------------------


def tls_files() -> tuple[str, str, str]:
    """(certificate, key, CA) files of a throwaway CA and one certificate it signed (P-256)."""
    from vllm_llmd.devtools.certs import issue_certificate

    folder = Path(tempfile.mkdtemp(prefix="bench-pd-tls-"))
    issue_certificate(folder, "peer", issue_certificate(folder, "ca", None))
    return str(folder / "peer.crt"), str(folder / "peer.key"), str(folder / "ca.crt")


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts of tls_files()."""
    files = tls_files()
    return make_server_context(*files), make_client_context(*files)


def bench_side_channel(preset: str, prompt_tokens: int, repeats: int = 7) -> None:
    p = PRESETS[preset]
    page = kv_bytes_per_block_per_layer(preset)
    num_blocks = -(-prompt_tokens // BLOCK)
    layers = p.num_hidden_layers
    cache = torch.randint(0, 256, (num_blocks * 2, layers, page), dtype=torch.uint8)
    dest = torch.empty_like(cache)
    fingerprint = KVLayoutFingerprint(
        model="bench",
        dtype="bfloat16",
        num_layers=layers,
        num_kv_heads=p.num_key_value_heads,
        head_size=p.head_dim,
        block_size=BLOCK,
        layout="LBHNC",
        tensor_parallel_size=1,
        page_bytes=page,
    )
    block_ids = list(range(0, 2 * num_blocks, 2))

    def gather(ids: list[int], out: torch.Tensor | None) -> torch.Tensor:
        """One copy, straight into `out` when given (as the worker's gather_blocks does)."""
        index = torch.tensor(ids)
        if out is None:
            return cache[index].reshape(-1)
        torch.index_select(cache, 0, index, out=out.view(len(ids), layers, page))
        return out

    def scatter(first: int, data: torch.Tensor) -> None:
        view = data.view(-1, layers, page)
        dest[first : first + view.shape[0]] = view

    server_tls, client_tls = tls_contexts()

    def pull_time(same_host_shm: bool, tls: bool = False) -> float:
        """Median of repeats pulls (the first one opens the connection: TLS handshake)."""
        registry = SendRegistry(lease_s=60)
        server = TransferServer(
            "127.0.0.1",
            0,
            registry,
            gather,
            fingerprint,
            layers * page,
            same_host_shm=same_host_shm,
            tls=server_tls if tls else None,
        )
        pulls = []
        try:
            for i in range(repeats):
                registry.add(f"r{i}", f"t{i}", block_ids)
                spec = PullSpec(
                    f"tcp://127.0.0.1:{server.port}",
                    f"t{i}",
                    fingerprint,
                    tuple(block_ids),
                    layers * page,
                )
                start = time.perf_counter()
                pull_blocks(
                    spec,
                    scatter,
                    timeout_s=30,
                    unknown_transfer_grace_s=0,
                    max_chunk_bytes=64 << 20,
                    tls=client_tls if tls else None,
                )
                pulls.append(time.perf_counter() - start)
                registry.take_finished()
            assert torch.equal(dest[:num_blocks], cache[torch.tensor(block_ids)])
        finally:
            server.close()
        return statistics.median(pulls)

    nbytes = num_blocks * layers * page
    copies = []
    src = cache[:num_blocks].reshape(-1)
    out = torch.empty_like(src).fill_(0)  # touched once: the copies below are warm
    for _ in range(repeats):
        start = time.perf_counter()
        out.copy_(src)
        copies.append(time.perf_counter() - start)
    copy_s = statistics.median(copies)
    socket_s, shm_s = pull_time(same_host_shm=False), pull_time(same_host_shm=True)
    tls_s = pull_time(same_host_shm=False, tls=True)
    print(
        f"\n== side channel vs memcpy: {prompt_tokens}-token prompt of {preset} "
        f"({layers} layers, {num_blocks} blocks, {nbytes / 2**20:.1f} MiB)"
    )
    print(f"  memcpy              {copy_s * 1e3:8.2f} ms  {nbytes / copy_s / 1e9:6.2f} GB/s")
    for name, took, how in (
        ("socket", socket_s, "gather + TCP loopback + scatter"),
        ("same-host shm", shm_s, "gather into shared memory + scatter"),
        ("socket, TLS on", tls_s, "the socket row, mutual TLS, then sealed AES-GCM records"),
    ):
        print(
            f"  {name:18}  {took * 1e3:8.2f} ms  {nbytes / took / 1e9:6.2f} GB/s  "
            f"({how}; {copy_s / took:.2f}x memcpy bandwidth)"
        )
    print(f"  same-host shm vs socket: {socket_s / shm_s:.2f}x faster")
    print(
        f"  TLS vs plain socket: {tls_s / socket_s:.2f}x the time "
        f"(+{(tls_s - socket_s) * 1e3:.2f} ms per pull of {nbytes / 2**20:.1f} MiB)"
    )


# ---- part 2: real servers --------------------------------------------------------------------


def start_all(servers: list[VLLMServer]) -> None:
    for server in servers:
        server.start()
    for server in servers:
        server.wait_ready(timeout=600)


def measure_recompute(server: VLLMServer, prompts: list[list[int]]) -> list[float]:
    return [timed_stream(server.url, server.model_name, p, max_tokens=2).ttft_s for p in prompts]


def measure_pd(
    prefill: VLLMServer, decode: VLLMServer, prompts: list[list[int]], request_params: dict
) -> tuple[list[float], list[float]]:
    prefill_s, decode_ttft = [], []
    for prompt in prompts:
        start = time.perf_counter()
        answer = complete(
            prefill.url, prefill.model_name, prompt, max_tokens=1, kv_transfer_params=request_params
        )
        prefill_s.append(time.perf_counter() - start)
        timing = timed_stream(
            decode.url,
            decode.model_name,
            prompt,
            max_tokens=2,
            kv_transfer_params=answer["kv_transfer_params"],
        )
        decode_ttft.append(timing.ttft_s)
    return prefill_s, decode_ttft


def tp_args(tp: int) -> list[str]:
    return ["--tensor-parallel-size", str(tp)] if tp > 1 else []


def warm_up_pd(prefill: VLLMServer, decode: VLLMServer, prompt: list[int], params: dict) -> None:
    """Two P/D requests of different lengths: a TP>1 vLLM compiles its vocabulary-parallel
    embedding lookup at its first forward and again when a second shape makes it dynamic
    (tens of seconds on CPU), which must not land in a timed request."""
    measure_pd(prefill, decode, [prompt[:64]], params)
    measure_pd(prefill, decode, [prompt[64:364]], params)


def nixl_servers(
    model: Path, cores_by_role: dict[str, str], tp_by_role: dict[str, int] | None = None
) -> list[VLLMServer]:
    servers = []
    for role, cores in cores_by_role.items():
        env = {
            "UCX_TLS": "tcp,self,sm,cma",
            "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
        }
        config = VLLMServerConfig(
            model=model,
            dtype="bfloat16",
            cpu_cores=cores,
            env=env,
            kv_transfer_config={
                "kv_connector": "NixlConnector",
                "kv_role": role,
                "kv_buffer_device": "cpu",
            },
            extra_args=tp_args((tp_by_role or {}).get(role, 1)),
        )
        servers.append(VLLMServer(config, LOG_DIR / f"nixl-{role}.log"))
    return servers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--no-nixl", action="store_true")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also run a second LLMDConnector pair with mutual TLS on the side channel "
        "(side_channel_tls_*), its prompts interleaved with the plain pair's",
    )
    parser.add_argument(
        "--nixl-nobind",
        action="store_true",
        help="run the NixlConnector servers unbound (one OpenMP thread each, the OS places "
        "them): UCX's progress thread then does not compete with the compute thread's core",
    )
    parser.add_argument(
        "--decode-apart",
        action="store_true",
        help="run the LLMDConnector decode servers under `unshare --ipc` (root or user "
        "namespaces): the KV crosses the side channel's TCP socket as between hosts, not "
        "shared memory",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="one more LLMDConnector pair with these kv_connector_extra_config keys "
        '("tls": true adds the TLS keys), interleaved with the rest',
    )
    parser.add_argument("--prefill-tp", type=int, default=1, help="TP size of prefill servers")
    parser.add_argument(
        "--decode-tp", type=int, default=1, help="TP size of decode and recompute servers"
    )
    args = parser.parse_args()
    # module doc: TP > 1 on two cores shares them, so nothing is pinned
    unpinned = max(args.prefill_tp, args.decode_tp) > 1
    tp_by_role = {"kv_producer": args.prefill_tp, "kv_consumer": args.decode_tp}

    bench_side_channel(args.preset, args.prompt_tokens)

    model = model_dir(args.preset)
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    prompts = [
        tokenizer.encode(sample_text(args.prompt_tokens, seed=1000 + i)).ids[: args.prompt_tokens]
        for i in range(args.num_prompts)
    ]
    # Each system sees fresh prompts (no prefix cache carry-over between systems).
    offset_prompts = {
        name: [[(t + k) % 4000 for t in p] for p in prompts]
        for k, name in enumerate(("recompute", "llmd", "nixl", "tls"))
    }

    def server(
        name: str, cores: str, connector: dict | None, tp: int, apart: bool = False
    ) -> VLLMServer:
        return VLLMServer(
            VLLMServerConfig(
                model=model,
                dtype="bfloat16",
                cpu_cores="nobind" if unpinned else cores,
                kv_transfer_config=connector,
                extra_args=tp_args(tp),
                own_ipc_namespace=apart,
            ),
            LOG_DIR / f"{name}.log",
        )

    def llmd_pair(name: str, extra: dict | None) -> tuple[VLLMServer, VLLMServer]:
        producer = llmd_connector("kv_producer", extra)
        consumer = llmd_connector("kv_consumer", extra, kv_load_failure_policy="recompute")
        decode = server(f"{name}-decode", "1", consumer, args.decode_tp, apart=args.decode_apart)
        return server(f"{name}-prefill", "0", producer, args.prefill_tp), decode

    results: dict[str, tuple[list[float], list[float]]] = {}
    plain = server("plain", "1", None, args.decode_tp)
    prefill, decode = llmd_pair("llmd", None)
    group = [plain, prefill, decode]
    tls_pair = None
    tls_keys: dict = {}
    if args.tls or args.variant:
        cert, key, ca = tls_files()
        tls_keys = {
            "side_channel_tls_cert": cert,
            "side_channel_tls_key": key,
            "side_channel_tls_ca": ca,
        }
    if args.tls:
        tls_pair = llmd_pair("llmd-tls", tls_keys)
        group.extend(tls_pair)
    variants = {}
    for variant in args.variant:
        name, _, keys = variant.partition("=")
        extra = json.loads(keys)
        if extra.pop("tls", False):
            extra.update(tls_keys)
        variants[name] = llmd_pair(f"llmd-{name}", extra)
        group.extend(variants[name])
    remote = {"do_remote_decode": True}
    try:
        start_all(group)
        measure_recompute(plain, [prompts[0][:64], prompts[0][64:364]])  # warm-up (compiles)
        results["recompute"] = ([], measure_recompute(plain, offset_prompts["recompute"]))
        pairs = {"LLMDConnector": ((prefill, decode), offset_prompts["llmd"])}
        if tls_pair is not None:
            pairs["LLMDConnector+TLS"] = (tls_pair, offset_prompts["tls"])
        for k, (name, pair) in enumerate(variants.items()):
            shifted = [[(t + 5 + k) % 4000 for t in p] for p in prompts]  # fresh: no cache hits
            pairs[name] = (pair, shifted)
        for (p, d), _ in pairs.values():
            warm_up_pd(p, d, prompts[0], remote)  # and the TLS handshake
        # Interleaved prompt by prompt, so this box's drift falls on both pairs alike.
        for name in pairs:
            results[name] = ([], [])
        for i in range(args.num_prompts):
            for name, ((p, d), pair_prompts) in pairs.items():
                prefill_s, ttft = measure_pd(p, d, [pair_prompts[i]], remote)
                results[name][0].extend(prefill_s)
                results[name][1].extend(ttft)
    finally:
        for s in group:
            s.stop()

    if not args.no_nixl and importlib.util.find_spec("nixl") is not None:
        cores = "nobind" if args.nixl_nobind or unpinned else None
        group = nixl_servers(
            model, {"kv_producer": cores or "0", "kv_consumer": cores or "1"}, tp_by_role
        )
        nixl_params = {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        }
        try:
            start_all(group)
            warm_up_pd(group[0], group[1], prompts[0], nixl_params)
            results["NixlConnector"] = measure_pd(
                group[0], group[1], offset_prompts["nixl"], nixl_params
            )
        finally:
            for s in group:
                s.stop()
    else:
        print("\n(nixl not installed: NixlConnector column skipped)")

    recompute = statistics.median(results["recompute"][1])
    print(
        f"\n== decode TTFT, {args.num_prompts} prompts of {args.prompt_tokens} tokens, "
        f"{args.preset} model, bf16, prefill TP {args.prefill_tp}, decode TP {args.decode_tp}, "
        f"{'unpinned' if unpinned else 'one core per server'} (median)"
    )
    header = f"  {'system':<18}{'prefill s':>10}{'decode TTFT s':>15}{'vs recompute':>14}"
    print(header + f"{'TTFT p25-p75 s':>18}")
    for name, (prefill_s, ttft) in results.items():
        p = f"{statistics.median(prefill_s):.3f}" if prefill_s else "-"
        median = statistics.median(ttft)
        quartiles = statistics.quantiles(ttft, n=4) if len(ttft) > 1 else [median] * 3
        spread = f"{quartiles[0]:.3f}-{quartiles[2]:.3f}"
        print(f"  {name:<18}{p:>10}{median:>15.3f}{recompute / median:>13.1f}x{spread:>18}")


if __name__ == "__main__":
    main()
