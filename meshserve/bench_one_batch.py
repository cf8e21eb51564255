"""`python -m meshserve.bench_one_batch ...` — see meshserve/bench/one_batch.py."""

from meshserve.bench.one_batch import main

if __name__ == "__main__":
    main()
