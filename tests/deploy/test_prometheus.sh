#!/usr/bin/env bash
# test_prometheus.sh - deploy/prometheus/ checked by Prometheus's own tool (Debian's `prometheus` package):
# the scrape config and the rules it loads (`promtool check config`), the rules alone (`promtool check
# rules`), and the alerts' unit tests (`promtool test rules`). Then the unit tests must fail against a
# copy of the rules with one threshold changed, so they are known to test something.
set -euo pipefail
cd "$(dirname "$0")/../../deploy/prometheus"
command -v promtool >/dev/null || { echo "promtool not found (apt-get install prometheus)" >&2; exit 1; }

promtool check config prometheus.yml
promtool check rules codemoe-rules.yml
promtool test rules codemoe-rules.test.yml

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for edit in 's/kv_used:ratio > 0.9$/kv_used:ratio > 0.95/' 's/min_over_mean30m < 0.2$/min_over_mean30m < 0.05/' \
            's/request_error_ratio:rate5m > 0.05$/request_error_ratio:rate5m > 0.2/'; do
    cp codemoe-rules.yml codemoe-rules.test.yml "$tmp/"
    sed -i "$edit" "$tmp/codemoe-rules.yml"
    if cmp -s codemoe-rules.yml "$tmp/codemoe-rules.yml"; then
        echo "test_prometheus.sh: the edit '$edit' changed nothing (rules renamed?)" >&2
        exit 1
    fi
    if promtool test rules "$tmp/codemoe-rules.test.yml" >/dev/null 2>&1; then
        echo "test_prometheus.sh: the unit tests pass against rules changed by '$edit'" >&2
        exit 1
    fi
done
echo "test_prometheus.sh: config, rules and alert tests pass; broken thresholds are caught"
