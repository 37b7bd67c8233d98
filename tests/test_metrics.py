"""server/metrics.py: what a Prometheus scrape reads, parsed by prometheus_client's own parser."""

import time

from prometheus_client.parser import text_string_to_metric_families

from server.metrics import ApiMetrics


def scrape(metrics) -> dict:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_requests_tokens_and_state():
    state = {"waiting": 3, "running": 2, "decoding": 2}
    m = ApiMetrics(state=lambda: state)
    m.observe_request("/v1/chat/completions", 200)
    m.observe_request("/v1/chat/completions", 200)
    m.observe_request("/v1/chat/completions", 400)
    m.observe_request("/wp-login.php", 404)
    timer = m.request_timer()
    timer.finish(prompt_tokens=11, completion_tokens=5)
    timer.finish(prompt_tokens=11, completion_tokens=5)  # counted once
    m.observe_batch(3)
    s = scrape(m)
    assert s[("bitnet_requests_total", (("path", "/v1/chat/completions"), ("status", "200")))] == 2
    assert s[("bitnet_requests_total", (("path", "/v1/chat/completions"), ("status", "400")))] == 1
    assert s[("bitnet_requests_total", (("path", "other"), ("status", "404")))] == 1
    assert s[("bitnet_prompt_tokens_total", ())] == 11 and s[("bitnet_completion_tokens_total", ())] == 5
    assert s[("bitnet_queue_length", ())] == 3 and s[("bitnet_running_requests", ())] == 2
    assert s[("bitnet_batch_size_current", ())] == 2
    assert s[("bitnet_batch_size_count", ())] == 1 and s[("bitnet_batch_size_sum", ())] == 3
    assert s[("bitnet_batch_size_bucket", (("le", "2.0"),))] == 0
    assert s[("bitnet_batch_size_bucket", (("le", "3.0"),))] == 1


def test_ttft_and_time_between_tokens():
    m = ApiMetrics()
    timer = m.request_timer(started=time.monotonic() - 0.3)  # the request came 0.3 s ago
    timer.tokens(1)
    time.sleep(0.05)
    timer.tokens(2)  # two tokens in one event: two gaps of half the time
    timer.tokens(0)
    s = scrape(m)
    assert s[("bitnet_time_to_first_token_seconds_count", ())] == 1
    assert 0.3 <= s[("bitnet_time_to_first_token_seconds_sum", ())] < 5
    assert s[("bitnet_time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 0
    assert s[("bitnet_time_between_tokens_seconds_count", ())] == 2
    assert 0.05 <= s[("bitnet_time_between_tokens_seconds_sum", ())] < 5


def test_each_api_has_its_own_registry():
    a, b = ApiMetrics(), ApiMetrics()
    a.observe_request("/metrics", 200)
    assert ("bitnet_requests_total", (("path", "/metrics"), ("status", "200"))) not in scrape(b)
