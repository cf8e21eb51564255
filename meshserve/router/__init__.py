"""meshserve's router: one HTTP front for several meshserve (or SGLang) servers, regular or
prefill/decode disaggregated, with sglang-router's command line. Imports no torch, so it runs
on a machine without one (checked by tests/unit/test_router_args.py)."""
