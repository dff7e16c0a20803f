"""Single-box demo on CPU: a vLLM server with LLMDConnector on the tiny model, one completion.

Run with `scripts/demo.sh` (sets the machine up first). Later stages grow this into the full
prefill -> decode story behind the router.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vllm_llmd.devtools.client import complete
from vllm_llmd.devtools.model_maker import PRESETS, cached_model, sample_text
from vllm_llmd.devtools.server import VLLMServer, VLLMServerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--prompt", default=sample_text(40, seed=1))
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    model = cached_model(args.preset, REPO_ROOT / ".cache" / "models")

    config = VLLMServerConfig(
        model=model,
        served_model_name=f"llmd-{args.preset}",
        kv_transfer_config={"kv_connector": "LLMDConnector", "kv_role": "kv_both"},
    )
    log = REPO_ROOT / "logs" / "demo" / "vllm.log"
    print(f"starting vLLM with LLMDConnector (log: {log}) ...")
    started = time.monotonic()
    with VLLMServer(config, log) as server:
        print(f"ready at {server.url} after {time.monotonic() - started:.0f}s")
        answer = complete(server.url, server.model_name, args.prompt, max_tokens=args.max_tokens)
        print(f"\nprompt:     {args.prompt}")
        print(f"completion: {answer['choices'][0]['text']}")
        print(f"usage:      {answer['usage']}")


if __name__ == "__main__":
    main()
