#!/bin/sh
# test_server_curl.sh - the server with plain curl (run by with_server.mjs, which sets CM_BASE_URL):
# health, models, a completion, an SSE stream ending in [DONE], error statuses, request ids.
set -u
B="${CM_BASE_URL:?run me through with_server.mjs}"
fails=0
check() { # name expected actual
    if [ "$2" = "$3" ]; then echo "ok   $1"; else echo "FAIL $1: expected '$2', got '$3'"; fails=$((fails + 1)); fi
}
has() { # name needle haystack
    case "$3" in *"$2"*) echo "ok   $1" ;; *) echo "FAIL $1: '$2' not in: $3"; fails=$((fails + 1)) ;; esac
}
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }

check health 200 "$(code "$B/health")"
has models '"id":"qwen2-gqa"' "$(curl -s "$B/v1/models")"
out=$(curl -s "$B/v1/completions" -H 'Content-Type: application/json' -d '{"prompt":"int main(","max_tokens":4,"temperature":0}')
has completion '"object":"text_completion"' "$out"
has usage '"completion_tokens":' "$out"
sse=$(curl -sN "$B/v1/completions" -H 'Content-Type: application/json' -d '{"prompt":"int main(","max_tokens":4,"stream":true}')
has sse_data 'data: {' "$sse"
last=$(printf '%s\n' "$sse" | grep '^data: ' | tail -n 1)
check sse_done 'data: [DONE]' "$last"
ctype=$(curl -s -o /dev/null -w '%{content_type}' "$B/v1/completions" -d '{"prompt":"x","max_tokens":1,"stream":true}')
check sse_content_type 'text/event-stream' "$ctype"
check malformed 400 "$(code "$B/v1/completions" -d '{"prompt":')"
check method 405 "$(code -X PUT "$B/v1/completions")"
check unknown_path 404 "$(code "$B/v2/anything")"
check any_model_name 200 "$(code "$B/v1/completions" -d '{"model":"nope","prompt":"x","max_tokens":1}')"
check no_prompt 400 "$(code "$B/v1/completions" -d '{"max_tokens":1}')"
rid=$(curl -s -D - -o /dev/null -H 'X-Request-Id: curl-test-1' "$B/health" | tr -d '\r' | grep -i '^x-request-id:' | cut -d' ' -f2)
check request_id curl-test-1 "$rid"
has metrics 'codemoe_requests_total{route="completions",status="200"}' "$(curl -s "$B/metrics")"
echo "$fails failed"
[ "$fails" -eq 0 ]
