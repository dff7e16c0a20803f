"""LLMDConnectorConfig.from_extra_config: bad `kv_connector_extra_config` values are refused
with a message naming the key, the value and what is accepted (issue #26).

More checks of the same parser: test_transfer.py (unknown keys, types), test_connector_scheduler
(allowed_prefill_hosts), test_shared_tier_scheduler (shared-tier keys). The real-server proof
that this runs before weights load is tests/test_connector_config_early.py.
"""

from __future__ import annotations

import typing

import pytest

from vllm_llmd.connector.config import LLMDConnectorConfig, OffloadPolicy, parse_byte_size

GiB = 1 << 30


def parse(**extra: object) -> LLMDConnectorConfig:
    return LLMDConnectorConfig.from_extra_config(extra)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (4096, 4096),
        (0, 0),
        (16e9, 16_000_000_000),
        ("4096", 4096),
        ("512MiB", 512 << 20),
        ("16GiB", 16 * GiB),
        ("16gib", 16 * GiB),
        ("16G", 16 * GiB),
        ("4k", 4096),
        ("2GB", 2_000_000_000),
        ("2 kb", 2000),
        ("1TB", 10**12),
        ("1TiB", 1 << 40),
        ("1.5 GiB", 3 * GiB // 2),
        (" 64 MiB ", 64 << 20),
        ("16e9", 16_000_000_000),
        ("100B", 100),
        ("0.3KiB", 307),  # a unit's fraction of a byte is dropped
    ],
)
def test_byte_sizes_parse(value, size):
    assert parse_byte_size(value) == size


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (-1, "must be >= 0"),
        ("-1GiB", "must be >= 0"),
        (16.5, "whole number of bytes"),
        ("16.5", "whole number of bytes"),
        ("16 EB", "unknown size unit 'EB'"),
        ("16 gigs", "unknown size unit"),
        ("GiB", "not a byte size"),
        ("", "not a byte size"),
        ("1 2", "not a byte size"),
        (True, "not a byte size"),
        (None, "not a byte size"),
        (float("inf"), "not a byte size"),
        (float("nan"), "not a byte size"),
        ("1e30TB", "too large"),
    ],
)
def test_bad_byte_sizes_say_why_and_what_is_accepted(value, why):
    with pytest.raises(ValueError, match=why) as err:
        parse_byte_size(value)
    assert '"16GiB"' in str(err.value) and repr(value) in str(err.value)


@pytest.mark.parametrize(
    "key", ["host_offload_bytes", "disk_offload_bytes", "offload_staging_bytes", "max_chunk_bytes"]
)
def test_every_byte_size_key_takes_units(key):
    assert key.endswith("_bytes")
    extra = {key: "2GiB"}
    if key == "disk_offload_bytes":
        extra |= {"disk_offload_path": "/tmp/x", "host_offload_bytes": "1GiB"}
    assert getattr(LLMDConnectorConfig.from_extra_config(extra), key) == 2 * GiB
    with pytest.raises(ValueError, match=rf"kv_connector_extra_config\['{key}'\].*'2 zettabytes'"):
        LLMDConnectorConfig.from_extra_config({key: "2 zettabytes"})


def test_unknown_key_names_the_closest_known_key():
    with pytest.raises(ValueError) as err:
        parse(host_ofload_bytes=1)
    message = str(err.value)
    assert "unknown kv_connector_extra_config key(s) ['host_ofload_bytes']" in message
    assert "(did you mean 'host_offload_bytes'?)" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match=r"\['lease', 'xyz'\]; 'lease' \(did you mean 'lease_s'"):
        parse(lease=1, xyz=2)
    with pytest.raises(ValueError, match=r"\['xyz'\]; known keys: \["):  # nothing close
        parse(xyz=2)


def test_offload_policy_is_one_of_the_policies():
    from vllm_llmd.offload.policy import _POLICIES

    assert set(typing.get_args(OffloadPolicy)) == set(_POLICIES)
    assert parse(offload_policy="lru").offload_policy == "lru"
    with pytest.raises(
        ValueError, match=r"must be one of \['lru'\], got 'lur' \(did you mean 'lru'"
    ):
        parse(offload_policy="lur")
    with pytest.raises(
        ValueError, match=r"'offload_policy'\] must be one of \['lru'\], got 'fifo'$"
    ):
        parse(offload_policy="fifo")


@pytest.mark.parametrize(
    "url",
    ["tcp://127.0.0.1:5601", "tcp://localhost:1", "tcp://[::1]:5601", "tcp://lmcache.ns.svc:5601"],
)
def test_shared_tier_url_accepts_tcp_host_port(url):
    assert parse(shared_tier_url=url).shared_tier_url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5601",
        "tcp://127.0.0.1",
        "127.0.0.1:5601",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:70000",
        "tcp://a b:5601",
        "tcp://[nope]:5601",
        "tcp://127.0.0.1:5601/x",
    ],
)
def test_shared_tier_url_refuses_other_forms(url):
    with pytest.raises(
        ValueError, match=r"\['shared_tier_url'\] must be \"tcp://HOST:PORT\""
    ) as err:
        parse(shared_tier_url=url)
    assert repr(url) in str(err.value)


def test_hosts_ports_and_numbers_are_checked():
    assert parse(side_channel_host="0.0.0.0").side_channel_host == "0.0.0.0"
    assert parse(side_channel_host="prefill-0.svc").side_channel_host == "prefill-0.svc"
    for host in ("", "a b", "http://x"):
        with pytest.raises(ValueError, match=r"\['side_channel_host'\] must be an IP address"):
            parse(side_channel_host=host)
    with pytest.raises(ValueError, match=r"side_channel_port must be in 0\.\.65535, got 65536"):
        parse(side_channel_port=65536)
    with pytest.raises(ValueError, match="side_channel_port must be in"):
        parse(side_channel_port=-1)
    with pytest.raises(ValueError, match="allowed_prefill_hosts entry 'x/y'"):
        parse(allowed_prefill_hosts="10.0.0.0/8, x/y")
    with pytest.raises(ValueError, match="transfer_timeout_s must be a finite number"):
        parse(transfer_timeout_s=float("inf"))
    for key in ("num_transfer_threads", "offload_disk_threads", "shared_tier_chunk_tokens"):
        with pytest.raises(ValueError, match=f"{key} must be > 0"):
            parse(**{key: 0})


def test_the_plugin_validates_when_vllm_resolves_the_connector_class():
    """vLLM resolves the class while it builds VllmConfig in the API server (see plugin.py)."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from vllm_llmd.connector.connector import LLMDConnector
    from vllm_llmd.plugin import register

    register()
    register()  # idempotent: one wrapper
    lookup = KVConnectorFactory.get_connector_class
    assert lookup.__func__.__wrapped__.__name__ == "get_connector_class"
    assert not hasattr(lookup.__func__.__wrapped__, "__wrapped__")

    def transfer(**extra):
        return KVTransferConfig(
            kv_connector="LLMDConnector", kv_role="kv_both", kv_connector_extra_config=extra
        )

    assert KVConnectorFactory.get_connector_class(transfer(lease_s=5)) is LLMDConnector
    with pytest.raises(ValueError, match=r"did you mean 'lease_s'"):
        KVConnectorFactory.get_connector_class(transfer(lease=5))
    # other connectors are untouched
    other = KVTransferConfig(
        kv_connector="ExampleConnector", kv_role="kv_both", kv_connector_extra_config={"x": 1}
    )
    assert KVConnectorFactory.get_connector_class(other).__name__ == "ExampleConnector"
