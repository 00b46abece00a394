#!/usr/bin/env bash
# trio-kv CUDA path: one-shot device check for an NVIDIA GPU machine (designed for the H200 device
# machine: python3 = the image torch venv, torch+cu13, driver 580, no network).
#
# Run from the repository root:   bash devcheck/device_check.sh
# (docs/gpu.md, "Device check"). Wheels for the packages the image lacks (trio, pynng, msgspec,
# hypercorn, boto3, pytest-trio, cuda-bindings $CUDA_BINDINGS_VERSION, ...) must be in
# devcheck/wheels/ (not in git: copy them in first); they are installed with --no-index into
# $T/dc-site; trio_kv itself is imported from the working tree (PYTHONPATH). The summary goes to
# $OUT/summary.txt (the log, e2e.json, server logs and bench output beside it), or $T/dc-out.
# Never run by the tests or CI.
#
# Steps (each with a hard timeout; the whole run is budgeted to < 8 min):
#   0 preflight      versions, driver, device, cuda-bindings features            (30 s)
#   1 pytest         tests/test_gpu_cuda.py + tests/test_gpu_backend.py             (200 s)
#   2 serve + e2e    `trio-kv serve --transfer cuda` in its own process; an engine process
#                    registers vLLM-shaped torch CUDA KV caches by CUDA IPC, stores/retrieves,
#                    compares bytes exactly, checks event ordering, times store/retrieve through
#                    the server vs a raw pinned torch memcpy in the same process        (150 s)
#   3 bench gpu      `trio-kv bench gpu --json` (server-side path vs cuMemcpy*Async)     (150 s)
#   4 probes         expandable_segments export error; dead engine's GPU memory still held by
#                    the server (expected 0: its registration is dropped with its connection);
#                    engine killed while the server waits on its event (server run with
#                    TRIO_KV_GPU_COPY_TIMEOUT_S=10), then server shutdown time             (90 s)
# Env: DC_BUDGET_S (default 450) skips later steps when the budget is spent;
#      DC_CUDA_BINDINGS=image|carried|auto (default auto: image's unless it lacks what trio-kv uses);
#      DC_SKIP="pytest bench probes" to skip steps.
set -u
CUDA_BINDINGS_VERSION=13.4.4  # the carried wheel; pyproject's [cuda] floor (tests/test_devcheck.py)
T=${TMPDIR:-$(dirname "$(mktemp -u)")}
START=$(date +%s)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(pwd)"
BUDGET=${DC_BUDGET_S:-450}
OUTDIR=${OUT:-$T/dc-out}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/device_check.log"
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

say() { echo "[dc $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
result() { echo "$*" | tee -a "$SUMMARY" >>"$LOG"; echo "RESULT $*"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
skip_requested() { case " ${DC_SKIP:-} " in *" $1 "*) return 0 ;; esac; return 1; }
# run_step NAME TIMEOUT CMD...: runs with a hard timeout, output to the log and the console
run_step() {
    local name=$1 limit=$2; shift 2
    local remaining; remaining=$(left)
    if ((remaining < 20)); then result "$name: SKIPPED (budget spent, ${remaining}s left)"; return 99; fi
    ((limit > remaining)) && limit=$remaining
    say "== $name (timeout ${limit}s)"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then result "$name: TIMEOUT after ${limit}s"; else result "$name: rc=$rc"; fi
    return "$rc"
}

[[ -d "$REPO/trio_kv/transfer" ]] || { echo "run me from the trio-kv repository root (no trio_kv/transfer in $REPO)"; exit 2; }
PY=${DC_PYTHON:-python3}
command -v "$PY" >/dev/null || { echo "no $PY on PATH"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 | tee -a "$LOG"

# ---------------------------------------------------------------- packages
SITE=$T/dc-site CUDASITE=$T/dc-cuda-site
WHEELS=${DC_WHEELS:-$HERE/wheels}
if [[ ! -d "$WHEELS" ]]; then echo "no wheels folder $WHEELS (copy them in: see docs/gpu.md)"; exit 2; fi
CUDA_WHEEL=$(ls "$WHEELS"/cuda_bindings-"$CUDA_BINDINGS_VERSION"-*.whl 2>/dev/null | head -1)
[[ -n $CUDA_WHEEL ]] || say "warning: no cuda_bindings-$CUDA_BINDINGS_VERSION wheel in $WHEELS"
say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE (cuda-bindings into $CUDASITE)"
rm -rf "$SITE" "$CUDASITE"
timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    $(ls "$WHEELS"/*.whl | grep -v -E 'cuda_bindings|cuda_pathfinder') >>"$LOG" 2>&1 \
    || { say "pip install of the wheels failed (see $LOG)"; tail -20 "$LOG"; exit 2; }
timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$CUDASITE" \
    $CUDA_WHEEL "$WHEELS"/cuda_pathfinder-*.whl >>"$LOG" 2>&1 \
    || say "warning: could not unpack the carried cuda-bindings (the image's will be used)"
export PYTHONPATH="$REPO:$SITE"

# Which cuda-bindings: the image's, unless it lacks what trio-kv calls (or DC_CUDA_BINDINGS says so).
CHOICE=${DC_CUDA_BINDINGS:-auto}
if [[ $CHOICE == auto ]]; then
    if timeout 60 "$PY" "$HERE/dc_preflight.py" --features-only >>"$LOG" 2>&1; then CHOICE=image; else CHOICE=carried; fi
fi
[[ $CHOICE == carried ]] && export PYTHONPATH="$REPO:$CUDASITE:$SITE"
result "cuda-bindings: $CHOICE"

# ---------------------------------------------------------------- 0 preflight
run_step preflight 60 "$PY" "$HERE/dc_preflight.py"
rc=$?
if ((rc != 0)); then
    if ((rc == 3)); then why="no usable CUDA device/driver for trio-kv"; else why="see $LOG"; fi
    result "preflight failed (rc=$rc): $why; stopping"
    echo "===== SUMMARY"; cat "$SUMMARY"; exit 3
fi

# ---------------------------------------------------------------- 1 pytest
if ! skip_requested pytest; then
    PT_TIMEOUT=""; "$PY" -c "import pytest_timeout" 2>/dev/null && PT_TIMEOUT="--timeout=90"
    run_step pytest 200 "$PY" -m pytest -q -p no:cacheprovider -rs --durations=5 $PT_TIMEOUT \
        tests/test_gpu_cuda.py tests/test_gpu_backend.py
fi

# ---------------------------------------------------------------- 2 server + engine (e2e)
RUN=$T/dc-run; rm -rf "$RUN"; mkdir -p "$RUN"
URL="ipc://$RUN/trio-kv.sock"
SERVER_PID=""
# start_server [VAR=value ...]: the server runs with these settings in its environment
start_server() {
    say "starting trio-kv serve --transfer cuda at $URL $*"
    env "$@" setsid "$PY" -m trio_kv serve --listen "$URL" --transfer cuda --l1-size "${DC_L1:-6GiB}" \
        --no-admin --log-level info >"$RUN/server.log" 2>&1 &
    SERVER_PID=$!
    timeout 90 "$PY" "$HERE/dc_engine.py" wait --url "$URL" --pid "$SERVER_PID" || {
        result "server: did not come up"; tail -30 "$RUN/server.log" | tee -a "$LOG"; return 1; }
    result "server: up (pid $SERVER_PID) after $(($(date +%s) - START))s"
}
stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    local t0; t0=$(date +%s%N)
    kill -INT "$SERVER_PID" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        result "server shutdown ($1): still running 10 s after SIGINT (HANG); killing"
        kill -KILL -- "-$SERVER_PID" 2>/dev/null; kill -KILL "$SERVER_PID" 2>/dev/null
    else
        result "server shutdown ($1): exited $(( ($(date +%s%N) - t0) / 1000000 )) ms after SIGINT"
    fi
    cp "$RUN/server.log" "$OUTDIR/server-$1.log" 2>/dev/null
    SERVER_PID=""
}
trap 'kill -KILL -- "-$SERVER_PID" 2>/dev/null; kill -KILL "$SERVER_PID" 2>/dev/null' EXIT

if start_server; then
    run_step e2e 150 "$PY" "$HERE/dc_engine.py" e2e --url "$URL" --json "$OUTDIR/e2e.json"
    grep -E 'ERROR|Traceback|failed' "$RUN/server.log" | head -20 | tee -a "$LOG"
    if ! skip_requested probes && (($(left) > 60)); then
        run_step probe-expandable 40 "$PY" "$HERE/dc_engine.py" expandable --url "$URL"
        run_step probe-dead-engine 60 "$PY" "$HERE/dc_engine.py" dead --url "$URL"
    fi
    stop_server e2e
fi

# ---------------------------------------------------------------- 3 bench gpu
if ! skip_requested bench; then
    run_step bench-gpu 150 "$PY" -m trio_kv.cli bench gpu --json --chunks 16 --rounds 5 \
        | tee "$OUTDIR/bench_gpu.out"
    "$PY" "$HERE/dc_engine.py" summarize-bench "$OUTDIR/bench_gpu.out" 2>&1 | tee -a "$SUMMARY"
fi

# ---------------------------------------------------------------- 4 probe: engine killed mid-wait
if ! skip_requested probes && (($(left) > 60)); then
    # A 10 s bound on the wait for the engine's event (30 s by default): the probe watches 15 s.
    if start_server TRIO_KV_GPU_COPY_TIMEOUT_S=10; then
        run_step probe-killed-engine 60 "$PY" "$HERE/dc_engine.py" killed --url "$URL"
        stop_server killed
    fi
fi

echo "===== SUMMARY ($(($(date +%s) - START)) s)"
cat "$SUMMARY"
[[ -f "$OUTDIR/e2e.json" ]] && cat "$OUTDIR/e2e.json"
exit 0
