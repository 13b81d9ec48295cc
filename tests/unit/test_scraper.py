"""Reading the engine's load from a vLLM /metrics page."""

from __future__ import annotations

from sluice.upstream.scraper import parse_load, parse_max_loras

PAGE = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="gemma"} 3.0
vllm:num_requests_running{engine="1",model_name="gemma"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="gemma"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="gemma"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="gemma"} 0.5
vllm:num_requests_running_total_fake{engine="0"} 99.0
vllm:time_to_first_token_seconds_bucket{le="0.01",model_name="gemma"} 12.0
"""


def test_sums_requests_and_takes_the_fullest_cache() -> None:
    assert parse_load(PAGE) == (4.0, 7.0, 0.5)


def test_older_cache_metric_name_and_missing_metrics() -> None:
    old = b'vllm:gpu_cache_usage_perc{model_name="m"} 0.9\nvllm:num_requests_waiting 2\n'
    assert parse_load(old) == (0.0, 2.0, 0.9)
    assert parse_load(b"# nothing here\nother_metric 1\n") is None
    assert parse_load(b"vllm:num_requests_running NaN\n") is None


def test_max_loras_is_read_from_the_lora_info_gauge() -> None:
    page = PAGE + (
        b"# TYPE vllm:lora_requests_info gauge\n"
        b'vllm:lora_requests_info{max_lora="2",running_lora_adapters="medical",waiting_lora_adapters=""} 1.7e9\n'
    )
    assert parse_max_loras(page) == 2
    assert parse_max_loras(PAGE) is None  # an engine started without --enable-lora
