"""The CUDA path against a stub libcuda.so.1, on hosts without a GPU.

The stub (C source below, compiled with the host's C compiler; skipped without
one) answers cuda-bindings' loader (``cuGetProcAddress_v2``) and implements the
driver calls trio-kv makes, with host memory as "device" memory and copies done
at enqueue time. So these tests check what cannot be checked by reading: that
cuda-bindings accepts every argument as trio-kv passes it, that results are
unpacked right, that bytes land where the CPU path puts them, that waiting for
completion releases the GIL, and that a failed enqueue is still waited for.
They say nothing about a real driver's behaviour or speed (tests/test_gpu_cuda.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

STUB_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct { char bytes[16]; } CUuuid;
typedef struct { char reserved[64]; } Handle;
typedef struct { int type; int id; } Loc;
typedef struct { int srcAccessOrder; Loc src; Loc dst; unsigned int flags; } Attrs;
typedef struct { int waited; } Stream;

long stub_batch_calls, stub_memcpy_calls, stub_waits, stub_syncs, stub_registered, stub_unregistered;
long stub_ipc_open, stub_ipc_close, stub_live_streams, stub_sync_sleep_us = 1000;
int stub_fail_batch;
static __thread void *current;
static CUdeviceptr bases[4096]; static size_t sizes[4096]; static int nalloc;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static CUresult batch(CUdeviceptr *d, CUdeviceptr *s, size_t *n, size_t count, Attrs *a, size_t *ai, size_t na,
                      size_t *fail, void *st) {
    if (stub_fail_batch || !st || na != 1 || ai[0] != 0 || a[0].srcAccessOrder != 1) { if (fail) *fail = 0; return 1; }
    for (size_t i = 0; i < count; i++) memcpy((void *)d[i], (void *)s[i], n[i]);
    stub_batch_calls++; return 0; }
/* CUDA 12.8's signature (with failIdx) and CUDA 13's (without), as a real driver serves both. */
static CUresult batch_12080(CUdeviceptr *d, CUdeviceptr *s, size_t *n, size_t c, Attrs *a, size_t *ai, size_t na,
                            size_t *fail, void *st) { return batch(d, s, n, c, a, ai, na, fail, st); }
static CUresult batch_13000(CUdeviceptr *d, CUdeviceptr *s, size_t *n, size_t c, Attrs *a, size_t *ai, size_t na,
                            void *st) { return batch(d, s, n, c, a, ai, na, 0, st); }
CUresult cuGetProcAddress_v2(const char *s, void **f, int v, unsigned long long fl, int *st) {
    if (!strcmp(s, "cuMemcpyBatchAsync")) *f = v >= 13000 ? (void *)batch_13000 : (void *)batch_12080;
    else *f = dlsym(RTLD_DEFAULT, s);
    if (st) *st = *f ? 0 : 1; return 0; }
CUresult cuGetProcAddress(const char *s, void **f, int v, unsigned long long fl, int *st) {
    return cuGetProcAddress_v2(s, f, v, fl, st); }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuInit(unsigned int f) { return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGet(int *d, int o) { if (o) return 101; *d = 0; return 0; }
CUresult cuDeviceGetUuid(CUuuid *u, int d) { for (int i = 0; i < 16; i++) u->bytes[i] = (char)(0xA0 + i); return 0; }
CUresult cuDevicePrimaryCtxRetain(void **c, int d) { *c = (void *)0x1000; return 0; }
CUresult cuCtxSetCurrent(void *c) { current = c; return 0; }
CUresult cuCtxPushCurrent(void *c) { current = c; return 0; }
CUresult cuCtxPopCurrent(void **c) { if (c) *c = current; current = 0; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { static char b[32]; snprintf(b, 32, "STUB_ERROR_%d", e); *s = b; return 0; }
#define NEED_CTX if (!current) return 201
CUresult cuStreamCreate(void **s, unsigned int f) { NEED_CTX; *s = calloc(1, sizeof(Stream)); __sync_fetch_and_add(&stub_live_streams, 1); return 0; }
CUresult cuStreamDestroy(void *s) { free(s); __sync_fetch_and_sub(&stub_live_streams, 1); return 0; }
CUresult cuStreamWaitEvent(void *s, void *e, unsigned int f) { if (!s || !e) return 400; ((Stream *)s)->waited = 1; __sync_fetch_and_add(&stub_waits, 1); return 0; }
CUresult cuStreamSynchronize(void *s) { usleep(stub_sync_sleep_us); return 0; }
CUresult cuEventCreate(void **e, unsigned int f) { NEED_CTX; *e = calloc(1, 8); return 0; }
CUresult cuEventDestroy(void *e) { free(e); return 0; }
CUresult cuEventRecord(void *e, void *s) { return e ? 0 : 400; }
CUresult cuEventSynchronize(void *e) { NEED_CTX; __sync_fetch_and_add(&stub_syncs, 1); usleep(stub_sync_sleep_us); return 0; }
CUresult cuIpcGetEventHandle(Handle *h, void *e) { memset(h, 0, 64); memcpy(h->reserved, "EVNT", 4); return 0; }
CUresult cuIpcOpenEventHandle(void **e, Handle h) { if (memcmp(h.reserved, "EVNT", 4)) return 400; *e = calloc(1, 8); return 0; }
CUresult cuMemAlloc(CUdeviceptr *p, size_t n) {
    void *m = aligned_alloc(256, (n + 255) / 256 * 256); if (!m) return 2;
    pthread_mutex_lock(&lock); bases[nalloc] = (CUdeviceptr)m; sizes[nalloc++] = n; pthread_mutex_unlock(&lock);
    *p = (CUdeviceptr)m; return 0; }
CUresult cuMemFree(CUdeviceptr p) { free((void *)p); return 0; }
CUresult cuMemGetAddressRange(CUdeviceptr *b, size_t *n, CUdeviceptr p) {
    for (int i = 0; i < nalloc; i++) if (p >= bases[i] && p < bases[i] + sizes[i]) {
        if (b) *b = bases[i]; if (n) *n = sizes[i]; return 0; }
    return 500; }
CUresult cuIpcGetMemHandle(Handle *h, CUdeviceptr p) { memset(h, 0, 64); memcpy(h->reserved, "MEMH", 4); memcpy(h->reserved + 8, &p, 8); return 0; }
CUresult cuIpcOpenMemHandle(CUdeviceptr *p, Handle h, unsigned int f) {
    NEED_CTX; if (memcmp(h.reserved, "MEMH", 4) || f != 1) return 400; memcpy(p, h.reserved + 8, 8); stub_ipc_open++; return 0; }
CUresult cuIpcCloseMemHandle(CUdeviceptr p) { stub_ipc_close++; return 0; }
CUresult cuMemHostRegister(void *p, size_t n, unsigned int f) { NEED_CTX; if (f != 3) return 1; stub_registered++; return 0; }
CUresult cuMemHostUnregister(void *p) { stub_unregistered++; return 0; }
CUresult cuMemHostGetDevicePointer(CUdeviceptr *d, void *p, unsigned int f) { *d = (CUdeviceptr)p; return 0; }
CUresult cuStreamWaitValue32(void *s, CUdeviceptr a, unsigned int v, unsigned int f) { return 801; }
CUresult cuMemcpyAsync(CUdeviceptr d, CUdeviceptr s, size_t n, void *st) { if (!st) return 1; memcpy((void *)d, (void *)s, n); stub_memcpy_calls++; return 0; }
CUresult cuMemcpyHtoD(CUdeviceptr d, const void *s, size_t n) { memcpy((void *)d, s, n); return 0; }
CUresult cuMemcpyDtoH(void *d, CUdeviceptr s, size_t n) { memcpy(d, (void *)s, n); return 0; }
CUresult cuMemcpyHtoDAsync(CUdeviceptr d, const void *s, size_t n, void *st) { memcpy((void *)d, s, n); return 0; }
CUresult cuMemcpyDtoHAsync(void *d, CUdeviceptr s, size_t n, void *st) { memcpy(d, (void *)s, n); return 0; }
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void *s) { memset((void *)d, v, n); return 0; }
"""

# Checks that need the stub's counters; run in a subprocess whose libcuda.so.1 is the stub.
CHECKS = textwrap.dedent(
    """
    import ctypes, threading, time
    import torch, trio
    from cuda.bindings import driver
    from trio_kv.transfer.cpu import CopyJob
    from trio_kv.transfer.cuda import CudaTransfer, MappedCudaKVCache
    from trio_kv.export.cuda_driver import call
    from trio_kv.export.ipc import CudaKVCacheExport
    from trio_kv.protocol import decode_request, encode

    stub = ctypes.CDLL("libcuda.so.1")
    def counter(name, kind=ctypes.c_long):
        return kind.in_dll(stub, name)

    class Tensor:  # what CudaKVCacheExport reads from a torch CUDA tensor
        def __init__(self, host, pointer):
            self.host, self.pointer = host, pointer
            self.device, self.dtype, self.shape = torch.device("cuda", 0), host.dtype, host.shape
        def data_ptr(self):
            return self.pointer
        def stride(self):
            return self.host.stride()

    async def main():
        transfer = CudaTransfer()
        arena = torch.zeros(1 << 20, dtype=torch.uint8)
        transfer.pin_host(arena)
        shape, nbytes = (2, 8, 4, 2, 8), 2 * 8 * 4 * 2 * 8 * 2
        tensors = []
        for _ in range(2):
            pointer = int(call(driver.cuMemAlloc, nbytes))
            host = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(pointer), dtype=torch.bfloat16)
            host = host.view(*shape)
            host.copy_(torch.randn(shape))
            tensors.append(Tensor(host, pointer))
        export = CudaKVCacheExport.from_tensors(tensors, block_dim=1, block_size=4)
        cache = transfer.open(decode_request(encode(export.register_request("w")), 1 << 20))
        assert isinstance(cache, MappedCudaKVCache) and counter("stub_ipc_open").value == 2
        size = cache.layout.chunk_bytes(2)
        jobs = [CopyJob([5, 2], arena[:size]), CopyJob([7, 0], arena[size : 2 * size])]

        waits, batches = counter("stub_waits").value, counter("stub_batch_calls").value
        await transfer.store(cache, jobs, ipc_event=export.record_event(stream=0))
        assert counter("stub_waits").value == waits + 1, "waited on the request's event"
        assert counter("stub_batch_calls").value == batches + 1, "one batch call for 16 pieces"
        expected = torch.cat([torch.cat([t.host[kv, b].flatten() for b in ids]).view(torch.uint8)
                              for ids in ([5, 2], [7, 0]) for t in tensors for kv in (0, 1)])
        assert torch.equal(arena[: 2 * size], expected), "store bytes"

        counter("stub_sync_sleep_us").value = 300_000
        ticks = []
        done = threading.Event()
        def tick():
            while not done.is_set():
                ticks.append(1)
                time.sleep(0.001)
        thread = threading.Thread(target=tick)
        thread.start()
        with trio.move_on_after(0.01) as scope:
            started = time.perf_counter()
            await transfer.store(cache, jobs)
            returned_after = time.perf_counter() - started
            await trio.lowlevel.checkpoint()
        done.set()
        thread.join()
        assert scope.cancelled_caught and returned_after >= 0.29, "cancelled copy still waited for"
        assert len(ticks) > 50, "the GIL was held while waiting"
        counter("stub_sync_sleep_us").value = 1000

        counter("stub_fail_batch", ctypes.c_int).value = 1
        syncs = counter("stub_syncs").value
        try:
            await transfer.store(cache, jobs)
        except Exception as exc:
            assert "cuMemcpyBatchAsync" in str(exc), exc
        else:
            raise AssertionError("a failed batch call was not reported")
        assert counter("stub_syncs").value == syncs + 1, "a failed enqueue was not waited for"
        counter("stub_fail_batch", ctypes.c_int).value = 0

        del cache
        import gc; gc.collect()
        assert counter("stub_ipc_close").value == 2 and counter("stub_live_streams").value == 0
        del jobs, arena
        gc.collect()
        assert counter("stub_unregistered").value == 1, "arena unpinned when freed"
        print("stub checks ok")

    trio.run(main)
    """
)


@pytest.fixture(scope="module")
def stub_env(tmp_path_factory) -> dict[str, str]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler to build the stub driver")
    where = tmp_path_factory.mktemp("stub-cuda")
    source = where / "stub.c"
    source.write_text(STUB_C)
    subprocess.run(
        [
            compiler,
            "-shared",
            "-fPIC",
            "-O1",
            "-o",
            str(where / "libcuda.so.1"),
            str(source),
            "-ldl",
            "-lpthread",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    env = {**os.environ, "LD_LIBRARY_PATH": f"{where}{os.pathsep}{os.environ.get('LD_LIBRARY_PATH', '')}"}
    probe = "from trio_kv.transfer.events import driver_status; print(driver_status())"
    status = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    if status.stdout.strip() != "None":
        pytest.skip(
            f"cuda-bindings did not load the stub driver: {status.stdout.strip() or status.stderr[-500:]}"
        )
    return env


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)


def test_ipc_export_open_store_wait_cancel_and_release_against_the_stub(stub_env):
    done = run([sys.executable, "-c", CHECKS], stub_env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "stub checks ok" in done.stdout


def test_device_tests_pass_against_the_stub(stub_env):
    done = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_cuda.py"], stub_env
    )
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout


def test_bench_gpu_runs_and_verifies_against_the_stub(stub_env):
    code = (
        "import argparse, sys\n"
        "from trio_kv.tools import bench_gpu\n"
        "parser = argparse.ArgumentParser()\n"
        "bench_gpu.add_parser(parser.add_subparsers(dest='bench'))\n"
        "args = parser.parse_args(['gpu', '--json', '--chunks', '1', '--layers', '2', '--rounds', '1'])\n"
        "sys.exit(bench_gpu.main(args))\n"
    )
    done = run([sys.executable, "-c", code], stub_env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert '"verified": true' in done.stdout and '"per_layer"' in done.stdout
