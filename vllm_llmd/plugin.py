"""vLLM general-plugin entry point: makes `LLMDConnector` selectable by name.

vLLM runs this in every one of its processes (API server, engine core, each worker), once per
process, and only logs an exception raised here. So it must be idempotent and cheap: it
registers a lazy loader with vLLM's KVConnectorFactory and imports nothing heavy itself.

It also makes a bad `kv_connector_extra_config` fail in the API-server process, before the
engine starts and loads weights: no connector hook sees the config there on every platform, but
vLLM resolves the connector class while it builds VllmConfig (`VllmConfig.__post_init__`, the
hybrid-KV-cache check, and on CUDA the piecewise-graph check), through
`KVConnectorFactory.get_connector_class(kv_transfer_config)`. `register()` wraps that lookup so
that resolving LLMDConnector validates the config it was resolved for.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from vllm_llmd import CONNECTOR_NAME
from vllm_llmd.compat import UnsupportedVLLMVersion, check_vllm_version
from vllm_llmd.log import get_logger

logger = get_logger(__name__)

CONNECTOR_MODULE = "vllm_llmd.connector.connector"


def register() -> None:
    """Register LLMDConnector with vLLM's connector factory, once per process."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    validate_config_on_lookup(KVConnectorFactory)
    secure_kv_events()
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    try:
        check_vllm_version()
    except UnsupportedVLLMVersion as exc:
        # Still register: selecting the connector then fails at construction with this same
        # message, instead of vLLM's vaguer "Unsupported connector type".
        logger.error("%s", exc)
    KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)


def secure_kv_events() -> None:
    """Put CURVE on vLLM's KV-event publisher when the environment asks for it (events/curve.py;
    nothing is imported or changed otherwise)."""
    from vllm_llmd.events.curve import CLIENTS_ENV, SECRET_KEY_ENV

    if os.environ.get(SECRET_KEY_ENV) or os.environ.get(CLIENTS_ENV):
        from vllm_llmd.connector.curve_publisher import install

        install()


def validate_config_on_lookup(factory: Any) -> None:
    """Wrap `factory.get_connector_class` (once): when it resolves LLMDConnector (or a subclass)
    for a KVTransferConfig, that config's `kv_connector_extra_config` is validated, and a bad
    one raises the ValueError of `LLMDConnectorConfig.from_extra_config`."""
    lookup = factory.get_connector_class
    if getattr(lookup, "_llmd_validates_config", False):
        return
    resolve = lookup.__func__

    @functools.wraps(resolve)
    def get_connector_class(cls: Any, kv_transfer_config: Any) -> Any:
        connector_cls = resolve(cls, kv_transfer_config)
        module = sys.modules.get(CONNECTOR_MODULE)  # loaded when it resolved to our class
        connector = getattr(module, CONNECTOR_NAME, None)
        if connector is not None and issubclass(connector_cls, connector):
            from vllm_llmd.connector.config import LLMDConnectorConfig

            LLMDConnectorConfig.from_extra_config(kv_transfer_config.kv_connector_extra_config)
        return connector_cls

    get_connector_class._llmd_validates_config = True  # type: ignore[attr-defined]
    factory.get_connector_class = classmethod(get_connector_class)
