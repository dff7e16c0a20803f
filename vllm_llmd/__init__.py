"""vllm-llmd: llm-d's core for any vLLM deployment.

Importing this package is cheap: it pulls in neither vLLM nor torch. The vLLM plugin entry point
is `vllm_llmd.plugin:register`; the connector class lives in `vllm_llmd.connector.connector`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vllm-llmd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# The name users put in --kv-transfer-config. It equals the class __name__, because vLLM's
# MultiConnector rebuilds child stats by class name through the registry.
CONNECTOR_NAME = "LLMDConnector"
