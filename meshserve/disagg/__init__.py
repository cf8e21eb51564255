"""Prefill-decode disaggregation: KV byte ranges (kv_ranges.py) and the transfer backends that
move them between servers (transfer/)."""
