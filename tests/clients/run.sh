#!/usr/bin/env bash
# Real clients against `disagg up` in disagg mode: lm-evaluation-harness (vs its own hf model),
# guidellm and the openai SDK. Builds their venv beside .venv (they pin other versions): torch's
# CPU wheel first, every later install constrained to it. Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-clients
TORCH=torch==2.13.0
if [ ! -f "$VENV/.installed" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "$TORCH"
    echo "$TORCH" > "$VENV/constraints.txt"
    "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" "lm-eval[api,hf]" guidellm openai
    touch "$VENV/.installed"
fi
make setup >/dev/null
exec .venv/bin/python tests/clients/run_clients.py --venv "$VENV" "$@"
