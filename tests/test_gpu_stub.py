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
#include <time.h>
#include <unistd.h>

/* A stub libcuda.so.1: host memory as device memory, with streams that run later.
   Work enqueued on a stream (copies, memsets, event records, waits on events) is done in
   stream order by a worker thread, or by whoever waits (cuEventSynchronize, cuEventQuery,
   cuStreamSynchronize). An event is complete once the work enqueued before its latest
   record is done; a stream held by stub_hold() does nothing until released, so an event
   recorded on it never completes (a hung engine). Destroyed events and streams and closed
   IPC mappings stay known, so using one again returns CUDA_ERROR_INVALID_HANDLE (400). */

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct { char bytes[16]; } CUuuid;
typedef struct { char reserved[64]; } Handle;
typedef struct { int type; int id; } Loc;
typedef struct { int srcAccessOrder; Loc src; Loc dst; unsigned int flags; } Attrs;

enum { LIVE = 0x11, DEAD = 0xDD };
typedef struct Event { int magic; unsigned int flags; long recorded, completed; struct Event *origin; } Event;
typedef struct Op { int kind; CUdeviceptr d, s; size_t n; Event *e; long seq; struct Op *next; } Op;
enum { COPY, SET, RECORD, WAIT };
typedef struct Stream { int magic; int held; Op *head, *tail; } Stream;

long stub_batch_calls, stub_memcpy_calls, stub_waits, stub_syncs, stub_queries, stub_registered, stub_unregistered;
long stub_ipc_open, stub_ipc_close, stub_live_streams, stub_live_events, stub_sync_sleep_us = 1000;
long stub_copies_done;
int stub_fail_batch;
static __thread void *current;
static CUdeviceptr bases[4096]; static size_t sizes[4096]; static int nalloc;
static CUdeviceptr mapped[4096]; static int nmapped;  /* open IPC mappings */
static Stream null_stream = {LIVE, 0, 0, 0};
static Stream *streams[4096]; static int nstreams;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t progress_made = PTHREAD_COND_INITIALIZER, work_queued = PTHREAD_COND_INITIALIZER;
static pthread_once_t worker_once = PTHREAD_ONCE_INIT;

static Stream *S(void *s) { return s ? (Stream *)s : &null_stream; }
static Event *origin(Event *e) { return e->origin ? e->origin : e; }
static int live_event(void *e) { return e && ((Event *)e)->magic == LIVE && origin(e)->magic == LIVE; }
static int live_stream(void *s) { return S(s)->magic == LIVE; }

static void push(Stream *s, Op op) {  /* lock held */
    Op *o = malloc(sizeof(Op)); *o = op; o->next = 0;
    if (s->tail) s->tail->next = o; else s->head = o;
    s->tail = o; pthread_cond_signal(&work_queued); }

static int run_stream(Stream *s) {  /* lock held: do what can be done; returns ops done */
    int done = 0;
    while (s->head && !s->held) {
        Op *o = s->head;
        if (o->kind == WAIT && origin(o->e)->completed < o->seq) break;
        if (o->kind == COPY) { memcpy((void *)o->d, (void *)o->s, o->n); stub_copies_done++; }
        if (o->kind == SET) memset((void *)o->d, (int)o->s, o->n);
        if (o->kind == RECORD && origin(o->e)->completed < o->seq) origin(o->e)->completed = o->seq;
        s->head = o->next; if (!s->head) s->tail = 0;
        free(o); done++; }
    return done; }

static int run_all(void) {  /* lock held */
    int done = 0, more;
    do { more = run_stream(&null_stream);
         for (int i = 0; i < nstreams; i++) more += run_stream(streams[i]);
         done += more; } while (more);
    if (done) pthread_cond_broadcast(&progress_made);
    return done; }

static void wait_progress(void) {  /* lock held: until more work may be doable */
    struct timespec t; clock_gettime(CLOCK_REALTIME, &t); t.tv_nsec += 2000000;
    if (t.tv_nsec >= 1000000000) { t.tv_sec++; t.tv_nsec -= 1000000000; }
    pthread_cond_timedwait(&progress_made, &lock, &t); }

static void *worker(void *unused) {
    pthread_mutex_lock(&lock);
    for (;;) {
        struct timespec t; clock_gettime(CLOCK_REALTIME, &t); t.tv_nsec += 2000000;
        if (t.tv_nsec >= 1000000000) { t.tv_sec++; t.tv_nsec -= 1000000000; }
        pthread_cond_timedwait(&work_queued, &lock, &t);
        pthread_mutex_unlock(&lock); usleep(200); pthread_mutex_lock(&lock);  /* "later" */
        run_all(); }
    return 0; }
static void start_worker(void) { pthread_t t; pthread_create(&t, 0, worker, 0); pthread_detach(t); }

/* Hold a stream: what was enqueued on it so far completes, nothing after until released. */
void stub_hold(void *s, int held) { pthread_mutex_lock(&lock); run_all(); S(s)->held = held; run_all(); pthread_mutex_unlock(&lock); }
int stub_event_done(void *e) { pthread_mutex_lock(&lock); run_all(); int d = origin(e)->completed >= origin(e)->recorded; pthread_mutex_unlock(&lock); return d; }

static int version(void) { const char *v = getenv("STUB_CUDA_VERSION"); return v ? atoi(v) : 13000; }

static CUresult batch(CUdeviceptr *d, CUdeviceptr *s, size_t *n, size_t count, Attrs *a, size_t *ai, size_t na,
                      size_t *fail, void *st) {
    if (stub_fail_batch || !st || !live_stream(st) || na != 1 || ai[0] != 0 || a[0].srcAccessOrder != 1) {
        if (fail) *fail = 0; return 1; }
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < count; i++) push(S(st), (Op){COPY, d[i], s[i], n[i], 0, 0, 0});
    stub_batch_calls++; pthread_mutex_unlock(&lock); return 0; }
/* CUDA 12.8's signature (with failIdx) and CUDA 13's (without), as a real driver serves both. */
static CUresult batch_12080(CUdeviceptr *d, CUdeviceptr *s, size_t *n, size_t c, Attrs *a, size_t *ai, size_t na,
                            size_t *fail, void *st) { return batch(d, s, n, c, a, ai, na, fail, st); }
static CUresult batch_13000(CUdeviceptr *d, CUdeviceptr *s, size_t *n, size_t c, Attrs *a, size_t *ai, size_t na,
                            void *st) { return batch(d, s, n, c, a, ai, na, 0, st); }
CUresult cuGetProcAddress_v2(const char *s, void **f, int v, unsigned long long fl, int *st) {
    if (!strcmp(s, "cuMemcpyBatchAsync"))
        *f = version() < 12080 ? 0 : v >= 13000 ? (void *)batch_13000 : (void *)batch_12080;
    else *f = dlsym(RTLD_DEFAULT, s);
    if (st) *st = *f ? 0 : 1; return 0; }
CUresult cuGetProcAddress(const char *s, void **f, int v, unsigned long long fl, int *st) {
    return cuGetProcAddress_v2(s, f, v, fl, st); }
CUresult cuDriverGetVersion(int *v) { *v = version(); return 0; }
CUresult cuInit(unsigned int f) { pthread_once(&worker_once, start_worker); return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGet(int *d, int o) { if (o) return 101; *d = 0; return 0; }
CUresult cuDeviceGetUuid(CUuuid *u, int d) { for (int i = 0; i < 16; i++) u->bytes[i] = (char)(0xA0 + i); return 0; }
CUresult cuDevicePrimaryCtxRetain(void **c, int d) { *c = (void *)0x1000; return 0; }
CUresult cuCtxSetCurrent(void *c) { current = c; return 0; }
CUresult cuCtxPushCurrent(void *c) { current = c; return 0; }
CUresult cuCtxPopCurrent(void **c) { if (c) *c = current; current = 0; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { static char b[32]; snprintf(b, 32, "STUB_ERROR_%d", e); *s = b; return 0; }
#define NEED_CTX if (!current) return 201
CUresult cuStreamCreate(void **s, unsigned int f) {
    NEED_CTX; Stream *n = calloc(1, sizeof(Stream)); n->magic = LIVE;
    pthread_mutex_lock(&lock); streams[nstreams++] = n; pthread_mutex_unlock(&lock);
    *s = n; __sync_fetch_and_add(&stub_live_streams, 1); return 0; }
CUresult cuStreamDestroy(void *s) {
    if (!s || !live_stream(s)) return 400;
    pthread_mutex_lock(&lock); run_all(); ((Stream *)s)->magic = DEAD;  /* pending work is dropped */
    for (int i = 0; i < nstreams; i++) if (streams[i] == s) streams[i] = streams[--nstreams];
    pthread_mutex_unlock(&lock); __sync_fetch_and_sub(&stub_live_streams, 1); return 0; }
CUresult cuStreamWaitEvent(void *s, void *e, unsigned int f) {
    if (!live_stream(s) || !live_event(e)) return 400;
    pthread_mutex_lock(&lock); push(S(s), (Op){WAIT, 0, 0, 0, e, origin(e)->recorded, 0}); pthread_mutex_unlock(&lock);
    __sync_fetch_and_add(&stub_waits, 1); return 0; }
CUresult cuStreamSynchronize(void *s) {
    if (!live_stream(s)) return 400;
    usleep(stub_sync_sleep_us);
    pthread_mutex_lock(&lock); while (run_all(), S(s)->head) wait_progress(); pthread_mutex_unlock(&lock); return 0; }
CUresult cuEventCreate(void **e, unsigned int f) {
    NEED_CTX; Event *n = calloc(1, sizeof(Event)); n->magic = LIVE; n->flags = f; *e = n;
    __sync_fetch_and_add(&stub_live_events, 1); return 0; }
CUresult cuEventDestroy(void *e) {
    if (!e || ((Event *)e)->magic != LIVE) return 400;
    ((Event *)e)->magic = DEAD; __sync_fetch_and_sub(&stub_live_events, 1); return 0; }  /* kept: later uses are 400 */
CUresult cuEventRecord(void *e, void *s) {
    if (!live_event(e) || !live_stream(s)) return 400;
    pthread_mutex_lock(&lock); Event *o = origin(e); o->recorded++;
    push(S(s), (Op){RECORD, 0, 0, 0, e, o->recorded, 0}); pthread_mutex_unlock(&lock); return 0; }
CUresult cuEventQuery(void *e) {
    if (!live_event(e)) return 400;
    __sync_fetch_and_add(&stub_queries, 1);
    pthread_mutex_lock(&lock); run_all(); int done = origin(e)->completed >= origin(e)->recorded;
    pthread_mutex_unlock(&lock); return done ? 0 : 600; }
CUresult cuEventSynchronize(void *e) {
    NEED_CTX; if (!live_event(e)) return 400;
    __sync_fetch_and_add(&stub_syncs, 1); usleep(stub_sync_sleep_us);
    pthread_mutex_lock(&lock);
    while (run_all(), live_event(e) && origin(e)->completed < origin(e)->recorded) wait_progress();
    int ok = live_event(e); pthread_mutex_unlock(&lock); return ok ? 0 : 400; }
CUresult cuIpcGetEventHandle(Handle *h, void *e) {
    if (!live_event(e)) return 400; if (!(((Event *)e)->flags & 4)) return 1;  /* needs CU_EVENT_INTERPROCESS */
    memset(h, 0, 64); memcpy(h->reserved, "EVNT", 4); memcpy(h->reserved + 8, &e, sizeof(e)); return 0; }
CUresult cuIpcOpenEventHandle(void **e, Handle h) {
    Event *o; NEED_CTX; if (memcmp(h.reserved, "EVNT", 4)) return 400;
    memcpy(&o, h.reserved + 8, sizeof(o)); if (!live_event(o)) return 400;
    Event *n = calloc(1, sizeof(Event)); n->magic = LIVE; n->origin = o; *e = n;
    __sync_fetch_and_add(&stub_live_events, 1); return 0; }
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
    NEED_CTX; if (memcmp(h.reserved, "MEMH", 4) || f != 1) return 400; memcpy(p, h.reserved + 8, 8);
    pthread_mutex_lock(&lock); mapped[nmapped++] = *p; stub_ipc_open++; pthread_mutex_unlock(&lock); return 0; }
CUresult cuIpcCloseMemHandle(CUdeviceptr p) {
    CUresult r = 400; pthread_mutex_lock(&lock);
    for (int i = 0; i < nmapped; i++) if (mapped[i] == p) { mapped[i] = mapped[--nmapped]; stub_ipc_close++; r = 0; break; }
    pthread_mutex_unlock(&lock); return r; }
CUresult cuMemHostRegister(void *p, size_t n, unsigned int f) { NEED_CTX; if (f != 3) return 1; stub_registered++; return 0; }
CUresult cuMemHostUnregister(void *p) { stub_unregistered++; return 0; }
CUresult cuMemHostGetDevicePointer(CUdeviceptr *d, void *p, unsigned int f) { *d = (CUdeviceptr)p; return 0; }
CUresult cuStreamWaitValue32(void *s, CUdeviceptr a, unsigned int v, unsigned int f) { return 801; }
static CUresult enqueue(int kind, CUdeviceptr d, CUdeviceptr s, size_t n, void *st) {
    if (!live_stream(st)) return 400;
    pthread_mutex_lock(&lock); push(S(st), (Op){kind, d, s, n, 0, 0, 0}); pthread_mutex_unlock(&lock); return 0; }
CUresult cuMemcpyAsync(CUdeviceptr d, CUdeviceptr s, size_t n, void *st) {
    if (!st) return 1; __sync_fetch_and_add(&stub_memcpy_calls, 1); return enqueue(COPY, d, s, n, st); }
CUresult cuMemcpyHtoD(CUdeviceptr d, const void *s, size_t n) { memcpy((void *)d, s, n); return 0; }
CUresult cuMemcpyDtoH(void *d, CUdeviceptr s, size_t n) { memcpy(d, (void *)s, n); return 0; }
CUresult cuMemcpyHtoDAsync(CUdeviceptr d, const void *s, size_t n, void *st) { return enqueue(COPY, d, (CUdeviceptr)s, n, st); }
CUresult cuMemcpyDtoHAsync(void *d, CUdeviceptr s, size_t n, void *st) { return enqueue(COPY, (CUdeviceptr)d, s, n, st); }
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void *s) { return enqueue(SET, d, v, n, s); }
"""

# What every check below starts from, in a subprocess whose libcuda.so.1 is the stub.
PRELUDE = textwrap.dedent(
    """
    import ctypes, gc, threading, time
    import torch, trio, trio.testing
    from cuda.bindings import driver
    from trio_kv.errors import ErrorCode, TrioKVError
    from trio_kv.transfer import cuda as cuda_module
    from trio_kv.transfer.cpu import CopyJob
    from trio_kv.transfer.cuda import CudaTransfer, MappedCudaKVCache
    from trio_kv.export.cuda_driver import call, handle_bytes
    from trio_kv.export.ipc import CudaKVCacheExport
    from trio_kv.protocol import decode_request, encode

    stub = ctypes.CDLL("libcuda.so.1")
    stub.stub_hold.argtypes = [ctypes.c_void_p, ctypes.c_int]
    def counter(name, kind=ctypes.c_long):
        return kind.in_dll(stub, name)
    def hang_engine(hung=True):  # the engine records on the legacy stream (0): hold it
        stub.stub_hold(None, int(hung))

    class Tensor:  # what CudaKVCacheExport reads from a torch CUDA tensor
        def __init__(self, host, pointer):
            self.host, self.pointer = host, pointer
            self.device, self.dtype, self.shape = torch.device("cuda", 0), host.dtype, host.shape
        def data_ptr(self):
            return self.pointer
        def stride(self):
            return self.host.stride()

    SHAPE, NBYTES = (2, 8, 4, 2, 8), 2 * 8 * 4 * 2 * 8 * 2

    def device_tensors():
        tensors = []
        for _ in range(2):
            pointer = int(call(driver.cuMemAlloc, NBYTES))
            host = torch.frombuffer((ctypes.c_uint8 * NBYTES).from_address(pointer), dtype=torch.bfloat16)
            host = host.view(*SHAPE)
            host.copy_(torch.randn(SHAPE))
            tensors.append(Tensor(host, pointer))
        return tensors

    def setup(**options):
        transfer = CudaTransfer(**options)
        arena = torch.zeros(1 << 20, dtype=torch.uint8)
        transfer.pin_host(arena)
        tensors = device_tensors()
        export = CudaKVCacheExport.from_tensors(tensors, block_dim=1, block_size=4)
        cache = transfer.open(decode_request(encode(export.register_request("w")), 1 << 20))
        return transfer, arena, tensors, export, cache

    def jobs_for(cache, arena, block_ids=([5, 2], [7, 0]), at=0):
        size = cache.layout.chunk_bytes(2)
        return [CopyJob(list(ids), arena[at + i * size : at + (i + 1) * size]) for i, ids in enumerate(block_ids)]

    def expected_store(tensors, block_ids=([5, 2], [7, 0])):
        return torch.cat([torch.cat([t.host[kv, b].flatten() for b in ids]).view(torch.uint8)
                          for ids in block_ids for t in tensors for kv in (0, 1)])

    def interprocess_event():
        flags = driver.CUevent_flags.CU_EVENT_INTERPROCESS | driver.CUevent_flags.CU_EVENT_DISABLE_TIMING
        event = call(driver.cuEventCreate, flags)
        return event, handle_bytes(call(driver.cuIpcGetEventHandle, event))
    """
)

# Export, IPC open, a batched store, the GIL released while waiting, a cancelled copy still
# waited for, a failed enqueue still waited for, and release of every driver object.
CHECKS = PRELUDE + textwrap.dedent(
    """
    async def main():
        transfer, arena, tensors, export, cache = setup()
        assert isinstance(cache, MappedCudaKVCache) and counter("stub_ipc_open").value == 2
        jobs = jobs_for(cache, arena)
        size = cache.layout.chunk_bytes(2)

        batches = counter("stub_batch_calls").value
        await transfer.store(cache, jobs, ipc_event=export.record_event(stream=0))
        assert counter("stub_batch_calls").value == batches + 1, "one batch call for 16 pieces"
        assert torch.equal(arena[: 2 * size], expected_store(tensors)), "store bytes"

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
            try:
                await transfer.store(cache, jobs)
                await trio.lowlevel.checkpoint()
            finally:
                returned_after = time.perf_counter() - started
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
        gc.collect()
        assert counter("stub_ipc_close").value == 2 and counter("stub_live_streams").value == 0
        del jobs, arena
        gc.collect()
        assert counter("stub_unregistered").value == 1, "arena unpinned when freed"
        print("stub checks ok")

    trio.run(main)
    """
)

# A store waits for the work recorded before its event, not for the engine's later work.
EACH_REQUEST_ITS_OWN_EVENT = PRELUDE + textwrap.dedent(
    """
    async def main():
        transfer, arena, tensors, export, cache = setup()
        first = export.record_event(stream=0)  # after the step that wrote the blocks
        hang_engine()
        second = export.record_event(stream=0)  # after the next step's work, which never finishes
        assert first != second, "both records name one event: the first request waits for the second step"
        jobs = jobs_for(cache, arena)
        await transfer.store(cache, jobs, ipc_event=first)
        assert torch.equal(arena[: 2 * cache.layout.chunk_bytes(2)], expected_store(tensors))
        hang_engine(False)
        print("own event ok")

    trio.run(main)
    """
)

# A copy whose engine event never completes fails in time, enqueues nothing, frees its slot.
HUNG_ENGINE_TIMES_OUT = PRELUDE + textwrap.dedent(
    """
    async def main():
        transfer, arena, tensors, export, cache = setup()
        transfer.copy_timeout_s = 0.3
        hang_engine()
        event = export.record_event(stream=0)
        batches, copied = counter("stub_batch_calls").value, counter("stub_copies_done").value
        started = time.perf_counter()
        try:
            await transfer.store(cache, jobs_for(cache, arena), ipc_event=event)
        except TrioKVError as exc:
            assert exc.code is ErrorCode.TRANSFER_FAILED, exc
            assert "engine" in exc.message and "0.3" in exc.message, exc.message
        else:
            raise AssertionError("a copy behind a hung engine's event succeeded")
        waited = time.perf_counter() - started
        assert 0.3 <= waited < 5, waited
        assert counter("stub_batch_calls").value == batches, "copies enqueued behind a hung engine"
        assert counter("stub_copies_done").value == copied
        assert transfer.copy_slots.borrowed_tokens == 0, "the copy slot was not freed"
        hang_engine(False)
        await transfer.store(cache, jobs_for(cache, arena), ipc_event=export.record_event(stream=0))
        assert torch.equal(arena[: 2 * cache.layout.chunk_bytes(2)], expected_store(tensors))
        print("hung engine ok")

    trio.run(main)
    """
)

# Cancelling (server shutdown) a copy that waits on a hung engine returns at once.
HUNG_ENGINE_CANCELLED = PRELUDE + textwrap.dedent(
    """
    async def main():
        transfer, arena, tensors, export, cache = setup()
        transfer.copy_timeout_s = 600
        hang_engine()
        event = export.record_event(stream=0)
        started = time.perf_counter()
        with trio.move_on_after(0.2) as scope:
            await transfer.store(cache, jobs_for(cache, arena), ipc_event=event)
        assert scope.cancelled_caught
        assert time.perf_counter() - started < 5, "cancellation waited for the hung engine"
        assert transfer.copy_slots.borrowed_tokens == 0
        hang_engine(False)
        print("cancelled ok")

    trio.run(main)
    """
)

# With room for one opened event, an event a queued copy still needs is not destroyed.
QUEUED_EVENTS_ARE_KEPT = PRELUDE + textwrap.dedent(
    """
    async def main():
        cuda_module.MAX_OPEN_EVENTS = 1
        transfer, arena, tensors, export, cache = setup(copies_in_flight=1)
        transfer.copy_timeout_s = 600
        events = [interprocess_event() for _ in range(3)]
        hang_engine()
        for event, _ in events:
            call(driver.cuEventRecord, event, 0)
        size = cache.layout.chunk_bytes(2)
        failures = []
        async def store(n):
            try:
                await transfer.store(cache, jobs_for(cache, arena, at=n * 2 * size), ipc_event=events[n][1])
            except TrioKVError as exc:
                failures.append((n, exc.message))
        async with trio.open_nursery() as nursery:
            for n in range(3):  # the first copies, the next two queue for the one slot
                nursery.start_soon(store, n)
                await trio.testing.wait_all_tasks_blocked()
            hang_engine(False)
        assert failures == [], failures
        for n in range(3):
            assert torch.equal(arena[n * 2 * size : (n + 1) * 2 * size], expected_store(tensors)), n
        assert len(cache._events) <= 1 + (cache.registered_event is not None), "idle events were not evicted"
        print("queued events ok")

    trio.run(main)
    """
)

# Dropping a CUDA registration (its connection went away) closes its IPC mappings.
DROPPED_REGISTRATION_IS_UNMAPPED = PRELUDE + textwrap.dedent(
    """
    from trio_kv.client import AsyncClient
    from trio_kv.testing import running_server

    async def main():
        async with running_server(transfer="cuda", chunk_size=8, l1_size="8MiB") as server:
            export = CudaKVCacheExport.from_tensors(device_tensors(), block_dim=1, block_size=4)
            closed_before = server.server.connections.closed_count
            opened, closed = counter("stub_ipc_open").value, counter("stub_ipc_close").value
            client = await AsyncClient.connect(server.url)
            await client.register(export.register_request("engine"))
            assert isinstance(server.engine.instances["engine"], MappedCudaKVCache)
            assert counter("stub_ipc_open").value == opened + 2
            client.close()
            with trio.fail_after(10):
                await server.server.connections.wait_closed(closed_before + 1)
            assert server.engine.instances == {}
            gc.collect()
            assert counter("stub_ipc_close").value == closed + 2, "the dead engine's memory is still mapped"
        print("dropped ok")

    trio.run(main)
    """
)

# Below CUDA 12.8 (no cuMemcpyBatchAsync) every piece is copied with cuMemcpyAsync.
PER_PIECE_BELOW_12_8 = PRELUDE + textwrap.dedent(
    """
    import logging
    from trio_kv.transfer.events import driver_status
    logging.basicConfig(level=logging.INFO)

    async def main():
        assert driver_status() is None, driver_status()
        transfer, arena, tensors, export, cache = setup()
        batches, pieces = counter("stub_batch_calls").value, counter("stub_memcpy_calls").value
        await transfer.store(cache, jobs_for(cache, arena), ipc_event=export.record_event(stream=0))
        assert counter("stub_batch_calls").value == batches
        assert counter("stub_memcpy_calls").value == pieces + 16, "one cuMemcpyAsync per piece"
        assert torch.equal(arena[: 2 * cache.layout.chunk_bytes(2)], expected_store(tensors))
        print("per piece ok")

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


def run(command: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    pytest.fail(f"still running after {timeout} s (a wait without bound?)")


def check(script: str, env: dict[str, str], ok: str, timeout: float = 120) -> None:
    done = run([sys.executable, "-c", script], env, timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert ok in done.stdout


def test_ipc_export_open_store_wait_cancel_and_release_against_the_stub(stub_env):
    check(CHECKS, stub_env, "stub checks ok")


def test_a_request_waits_for_its_own_event_not_the_engines_next_step(stub_env):
    check(EACH_REQUEST_ITS_OWN_EVENT, stub_env, "own event ok", timeout=60)


def test_a_copy_behind_a_hung_engine_fails_in_time_and_frees_its_slot(stub_env):
    check(HUNG_ENGINE_TIMES_OUT, stub_env, "hung engine ok", timeout=60)


def test_cancelling_a_copy_behind_a_hung_engine_returns_at_once(stub_env):
    check(HUNG_ENGINE_CANCELLED, stub_env, "cancelled ok", timeout=60)


def test_an_event_a_queued_copy_needs_is_not_evicted(stub_env):
    check(QUEUED_EVENTS_ARE_KEPT, stub_env, "queued events ok", timeout=60)


def test_dropping_a_cuda_registration_closes_its_ipc_mappings(stub_env):
    check(DROPPED_REGISTRATION_IS_UNMAPPED, stub_env, "dropped ok")


def test_below_cuda_12_8_pieces_are_copied_one_by_one(stub_env):
    env = {**stub_env, "STUB_CUDA_VERSION": "12040"}
    done = run([sys.executable, "-c", PER_PIECE_BELOW_12_8], env, 60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "per piece ok" in done.stdout
    assert "cuMemcpyAsync" in done.stderr and "12.4" in done.stderr, "the backend's choice was not logged"


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
