#!/usr/bin/env bash
# Starts and stops the stages and llm-sim in the background against a running local
# stack (deploy/local/stack.sh up), from the binaries in target/debug.
#
#   deploy/local/services.sh up      start what is not running, wait until each is ready
#   deploy/local/services.sh down    SIGTERM each (graceful drain), SIGKILL after 30 s
#   deploy/local/services.sh status
#
# Environment: ENRICH_CONFIG (default config/pipeline.toml), LLM_SIM_LATENCY (default fixed:50),
# CARGO_TARGET_DIR (default target).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
stack_dir=${ENRICH_STACK_DIR:-$root/.stack}
bin_dir=${CARGO_TARGET_DIR:-$root/target}/debug
config=${ENRICH_CONFIG:-$root/config/pipeline.toml}
run_dir=$stack_dir/run
logs=$stack_dir/logs
mkdir -p "$run_dir" "$logs"

# service:port:path (ports as in config/pipeline.toml; llm-sim's as in llm.base_url)
services=(
  "llm-sim:8080:/healthz"
  "ingest-dedup:9101:/readyz"
  "enricher:9102:/readyz"
  "publisher:9103:/readyz"
  "dlq-replayer:9104:/readyz"
)

say() { printf '[services] %s\n' "$*"; }
running() { [ -f "$run_dir/$1.pid" ] && kill -0 "$(cat "$run_dir/$1.pid")" 2>/dev/null; }

up() {
  for entry in "${services[@]}"; do
    IFS=: read -r name port path <<<"$entry"
    if running "$name"; then
      say "$name already running (pid $(cat "$run_dir/$name.pid"))"
      continue
    fi
    [ -x "$bin_dir/$name" ] || { say "error: $bin_dir/$name is missing; run 'make build'"; exit 1; }
    if [ "$name" = llm-sim ]; then
      nohup "$bin_dir/$name" --port "$port" --latency "${LLM_SIM_LATENCY:-fixed:50}" >"$logs/$name.log" 2>&1 </dev/null &
    else
      nohup "$bin_dir/$name" --config "$config" >"$logs/$name.log" 2>&1 </dev/null &
    fi
    echo $! >"$run_dir/$name.pid"
    local i=0
    until curl -sf "http://127.0.0.1:$port$path" >/dev/null 2>&1; do
      if ! running "$name"; then
        say "error: $name exited; last lines of $logs/$name.log:"; tail -n 20 "$logs/$name.log" >&2; exit 1
      fi
      i=$((i + 1)); [ $i -lt 240 ] || { say "error: $name not ready on :$port after 60 s; see $logs/$name.log"; exit 1; }
      sleep 0.25
    done
    say "$name ready on :$port (pid $(cat "$run_dir/$name.pid"), log $logs/$name.log)"
  done
}

down() {
  # Reverse order: stop consuming before the LLM goes away.
  for (( idx=${#services[@]}-1 ; idx>=0 ; idx-- )); do
    IFS=: read -r name _ _ <<<"${services[$idx]}"
    if running "$name"; then
      local pid; pid=$(cat "$run_dir/$name.pid")
      kill -TERM "$pid" 2>/dev/null || true
      local i=0
      while kill -0 "$pid" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -ge 120 ]; then say "$name did not drain in 30 s; killing"; kill -KILL "$pid" 2>/dev/null || true; break; fi
        sleep 0.25
      done
      say "$name stopped"
    fi
    rm -f "$run_dir/$name.pid"
  done
}

status() {
  for entry in "${services[@]}"; do
    IFS=: read -r name _ _ <<<"$entry"
    if running "$name"; then say "$name: running (pid $(cat "$run_dir/$name.pid"))"; else say "$name: stopped"; fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
