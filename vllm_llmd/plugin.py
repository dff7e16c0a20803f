"""vLLM general-plugin entry point: makes `LLMDConnector` selectable by name.

vLLM runs this in every one of its processes (API server, engine core, each worker), once per
process, and only logs an exception raised here. So it must be idempotent and cheap: it
registers a lazy loader with vLLM's KVConnectorFactory and imports nothing heavy itself.
"""

from __future__ import annotations

from vllm_llmd import CONNECTOR_NAME
from vllm_llmd.compat import UnsupportedVLLMVersion, check_vllm_version
from vllm_llmd.log import get_logger

logger = get_logger(__name__)

CONNECTOR_MODULE = "vllm_llmd.connector.connector"


def register() -> None:
    """Register LLMDConnector with vLLM's connector factory, once per process."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    try:
        check_vllm_version()
    except UnsupportedVLLMVersion as exc:
        # Still register: selecting the connector then fails at construction with this same
        # message, instead of vLLM's vaguer "Unsupported connector type".
        logger.error("%s", exc)
    KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
