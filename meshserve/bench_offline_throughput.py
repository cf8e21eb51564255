"""`python -m meshserve.bench_offline_throughput ...` — see meshserve/bench/offline.py."""

from meshserve.bench.offline import main

if __name__ == "__main__":
    main()
