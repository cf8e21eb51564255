"""``python -m meshserve.bench_serving``: the online serving benchmark (see meshserve.bench.serving)."""

from meshserve.bench.serving import main

if __name__ == "__main__":
    raise SystemExit(main())
