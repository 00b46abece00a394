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
   recorded on it never completes (a hung engine); cuStreamWaitValue32 holds a stream until a
   host word meets its condition (tests/test_gpu_cuda.py gates streams so). Destroyed events and streams and closed
   IPC mappings stay known, so using one again returns CUDA_ERROR_INVALID_HANDLE (400).
   While stub_gate_ipc_open (or _close) is set, cuIpcOpenMemHandle (cuIpcCloseMemHandle) waits
   until it is cleared (stub_gate), at most 3 s (then stub_gate_timeouts counts it), as a slow
   mapping would; stub_ipc_blocked says how many wait now, stub_wait_blocked waits for one. */

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct { char bytes[16]; } CUuuid;
typedef struct { char reserved[64]; } Handle;
typedef struct { int type; int id; } Loc;
typedef struct { int srcAccessOrder; Loc src; Loc dst; unsigned int flags; } Attrs;

enum { LIVE = 0x11, DEAD = 0xDD };
typedef struct Event { int magic; unsigned int flags; long recorded, completed; struct Event *origin; } Event;
typedef struct Op { int kind; CUdeviceptr d, s; size_t n; Event *e; long seq; struct Op *next; } Op;
enum { COPY, SET, RECORD, WAIT, WAIT_VALUE };
typedef struct Stream { int magic; int held; Op *head, *tail; } Stream;

long stub_batch_calls, stub_memcpy_calls, stub_waits, stub_syncs, stub_queries, stub_registered, stub_unregistered;
long stub_ipc_open, stub_ipc_close, stub_live_streams, stub_live_events, stub_sync_sleep_us = 1000;
long stub_copies_done;
int stub_fail_batch, stub_fail_ipc_get, stub_gate_ipc_open, stub_gate_ipc_close;
int stub_fail_sync;  /* what cuEventSynchronize returns once the work is done (700: an illegal address) */
long stub_ipc_blocked, stub_gate_timeouts;
static __thread void *current;
static CUdeviceptr bases[4096]; static size_t sizes[4096]; static int nalloc;
static CUdeviceptr mapped[4096]; static int nmapped;  /* open IPC mappings */
static Stream null_stream = {LIVE, 0, 0, 0};
static Stream *streams[4096]; static int nstreams;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t progress_made = PTHREAD_COND_INITIALIZER, work_queued = PTHREAD_COND_INITIALIZER;
static pthread_once_t worker_once = PTHREAD_ONCE_INIT;
static pthread_cond_t gate_changed = PTHREAD_COND_INITIALIZER;

static struct timespec after_ms(long ms) {
    struct timespec t; clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += ms / 1000; t.tv_nsec += ms % 1000 * 1000000;
    if (t.tv_nsec >= 1000000000) { t.tv_sec++; t.tv_nsec -= 1000000000; }
    return t; }
static void pass_gate(int *gate) {  /* lock held */
    if (!*gate) return;
    struct timespec t = after_ms(3000);
    stub_ipc_blocked++; pthread_cond_broadcast(&gate_changed);
    while (*gate) if (pthread_cond_timedwait(&gate_changed, &lock, &t)) { stub_gate_timeouts++; break; }
    stub_ipc_blocked--; pthread_cond_broadcast(&gate_changed); }
void stub_gate(int open_calls, int close_calls) {
    pthread_mutex_lock(&lock); stub_gate_ipc_open = open_calls; stub_gate_ipc_close = close_calls;
    pthread_cond_broadcast(&gate_changed); pthread_mutex_unlock(&lock); }
int stub_wait_blocked(long n, long timeout_ms) {  /* 1 once n calls wait at a gate, 0 after the timeout */
    struct timespec t = after_ms(timeout_ms); pthread_mutex_lock(&lock);
    while (stub_ipc_blocked < n) if (pthread_cond_timedwait(&gate_changed, &lock, &t)) break;
    int ok = stub_ipc_blocked >= n; pthread_mutex_unlock(&lock); return ok; }

static Stream *S(void *s) { return s ? (Stream *)s : &null_stream; }
static Event *origin(Event *e) { return e->origin ? e->origin : e; }
static int live_event(void *e) { return e && ((Event *)e)->magic == LIVE && origin(e)->magic == LIVE; }
static int live_stream(void *s) { return S(s)->magic == LIVE; }

static void push(Stream *s, Op op) {  /* lock held */
    Op *o = malloc(sizeof(Op)); *o = op; o->next = 0;
    if (s->tail) s->tail->next = o; else s->head = o;
    s->tail = o; pthread_cond_signal(&work_queued); }

static int value_reached(Op *o) {  /* cuStreamWaitValue32: GEQ, EQ, AND, NOR (flush bit ignored) */
    unsigned int word = *(volatile unsigned int *)o->d, value = (unsigned int)o->s;
    switch (o->n & 3) {
    case 0: return (int)(word - value) >= 0;
    case 1: return word == value;
    case 2: return (word & value) != 0;
    default: return ~(word | value) != 0; } }

static int run_stream(Stream *s) {  /* lock held: do what can be done; returns ops done */
    int done = 0;
    while (s->head && !s->held) {
        Op *o = s->head;
        if (o->kind == WAIT && origin(o->e)->completed < o->seq) break;
        if (o->kind == WAIT_VALUE && !value_reached(o)) break;
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
/* STUB_BATCH_ENTRY=none: no cuMemcpyBatchAsync entry point; =fail: its lookup is an error. */
long stub_batch_lookups;
CUresult cuGetProcAddress_v2(const char *s, void **f, int v, unsigned long long fl, int *st) {
    const char *entry = getenv("STUB_BATCH_ENTRY");
    if (!strcmp(s, "cuMemcpyBatchAsync")) {
        __sync_fetch_and_add(&stub_batch_lookups, 1);
        if (entry && !strcmp(entry, "fail")) return 500;
        *f = version() < 12080 || (entry && !strcmp(entry, "none")) ? 0
           : v >= 13000 ? (void *)batch_13000 : (void *)batch_12080; }
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
CUresult cuCtxGetStreamPriorityRange(int *least, int *greatest) {
    NEED_CTX; if (least) *least = 0; if (greatest) *greatest = -5; return 0; }
long stub_priority_streams;
CUresult cuStreamCreateWithPriority(void **s, unsigned int f, int priority) {
    if (priority < -5 || priority > 0) return 1;
    CUresult r = cuStreamCreate(s, f); if (!r && priority) __sync_fetch_and_add(&stub_priority_streams, 1); return r; }
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
    int ok = live_event(e); pthread_mutex_unlock(&lock); return ok ? stub_fail_sync : 400; }
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
CUresult cuIpcGetMemHandle(Handle *h, CUdeviceptr p) { if (stub_fail_ipc_get) return 1; memset(h, 0, 64); memcpy(h->reserved, "MEMH", 4); memcpy(h->reserved + 8, &p, 8); return 0; }
CUresult cuIpcOpenMemHandle(CUdeviceptr *p, Handle h, unsigned int f) {
    NEED_CTX; if (memcmp(h.reserved, "MEMH", 4) || f != 1) return 400; memcpy(p, h.reserved + 8, 8);
    pthread_mutex_lock(&lock); pass_gate(&stub_gate_ipc_open);
    mapped[nmapped++] = *p; stub_ipc_open++; pthread_mutex_unlock(&lock); return 0; }
CUresult cuIpcCloseMemHandle(CUdeviceptr p) {
    CUresult r = 400; pthread_mutex_lock(&lock); pass_gate(&stub_gate_ipc_close);
    for (int i = 0; i < nmapped; i++) if (mapped[i] == p) { mapped[i] = mapped[--nmapped]; stub_ipc_close++; r = 0; break; }
    pthread_mutex_unlock(&lock); return r; }
CUresult cuMemHostRegister(void *p, size_t n, unsigned int f) { NEED_CTX; if (f != 3) return 1; stub_registered++; return 0; }
CUresult cuMemHostUnregister(void *p) { stub_unregistered++; return 0; }
CUresult cuMemHostGetDevicePointer(CUdeviceptr *d, void *p, unsigned int f) { *d = (CUdeviceptr)p; return 0; }
/* A real libcuda exports both names; cuda-bindings looks up both. The worker re-checks a waiting
   stream every 2 ms. */
CUresult cuStreamWaitValue32(void *s, CUdeviceptr a, unsigned int v, unsigned int f) {
    if (!live_stream(s) || !a) return 400;
    pthread_mutex_lock(&lock); push(S(s), (Op){WAIT_VALUE, a, v, f, 0, 0, 0}); pthread_mutex_unlock(&lock); return 0; }
CUresult cuStreamWaitValue32_v2(void *s, CUdeviceptr a, unsigned int v, unsigned int f) {
    return cuStreamWaitValue32(s, a, v, f); }
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
