"""Prefill→decode KV transfer: side channel, wire messages, leases."""
