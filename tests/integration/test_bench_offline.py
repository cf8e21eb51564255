"""bench_offline_throughput end to end on the CPU: a real engine over a tiny random model, every
request streamed; the report counts every requested token and gives first-token times that are
ordered and fall inside the run."""

from __future__ import annotations

import json

from meshserve.bench.offline import main
from tests.models import make_tiny_llama


def test_offline_bench_reports_tokens_and_first_token_times(tmp_path, tokenizer_dir, capsys):
    model_dir = make_tiny_llama(tmp_path / "m", tokenizer_dir=tokenizer_dir)
    report_file = tmp_path / "report.jsonl"
    main(["--model-path", str(model_dir), "--num-prompts", "6", "--random-input-len", "40", "--random-output-len", "5",
          "--random-range-ratio", "1", "--device", "cpu", "--max-total-tokens", "2048",
          "--output-file", str(report_file)])
    report = json.loads(report_file.read_text())
    assert report["input_tokens"] == 6 * 40 and report["output_tokens"] == 6 * 5  # exact lengths, ignore_eos
    assert 0 < report["median_ttft_s"] <= report["p90_ttft_s"] <= report["p99_ttft_s"] < report["duration_s"]
    assert "First token: median" in capsys.readouterr().out
