#!/usr/bin/env bash
# Rehearse devcheck/device_check.sh on a host without a GPU, so a device run spends its minutes
# on the device and not on a broken script: libcuda.so.1 is the test suite's stub driver
# (tests/stub_libcuda.c: host memory as device memory, streams that run later).
#
# Run from the repository root, with DC_PYTHON a Python 3.12 (the device image's version, which
# the carried wheels are built for) that has torch, numpy, pytest and anyio, and the wheels in
# devcheck/wheels/ (docs/gpu.md, "Device check"):
#     DC_PYTHON=/path/to/python3.12 bash devcheck/rehearse_on_stub.sh
# What it shows: the wheels install, the preflight, the GPU pytest files (all but the
# engine-process test run against the stub), serve --transfer cuda starting and stopping,
# bench gpu verifying its bytes, and the summary. The engine steps (e2e, probes) need PyTorch
# with CUDA and report NOT RUN (PyTorch's CUDA probe of the stub then crashes: rc 139).
# The figures are the stub's memcpy, not a GPU's.
set -eu
[[ -f tests/stub_libcuda.c ]] || { echo "run me from the trio-kv repository root"; exit 2; }
STUB=${TMPDIR:-/tmp}/dc-stub-cuda
mkdir -p "$STUB"
cc -shared -fPIC -O1 -o "$STUB/libcuda.so.1" tests/stub_libcuda.c -ldl -lpthread
export LD_LIBRARY_PATH="$STUB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DC_L1=${DC_L1:-256MiB}
exec bash devcheck/device_check.sh
