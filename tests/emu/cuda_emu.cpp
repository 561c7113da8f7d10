/*
 * tests/emu/cuda_emu.cpp — the CUDA emulator's runtime: the host API subset
 * the project calls (memory, copies, streams and events as synchronous
 * no-ops, stream capture into graphs replayed at launch, device properties
 * of an H100), the launch checks, and the block
 * scheduler that runs a block's threads as fibers on the calling thread.
 * Linked into every program `make test-gpu-emu` builds; see cuda_emu.h for
 * the model and tests/emu/README for what it cannot catch.
 *
 * Fibers switch with a 14-instruction x86-64 routine (callee-saved registers
 * and the stack pointer; no signal mask, unlike swapcontext, whose
 * sigprocmask system call cost half the time of an earlier prototype), or
 * with ucontext elsewhere. Under AddressSanitizer every switch is announced
 * with __sanitizer_{start,finish}_switch_fiber.
 *
 * Environment: CUDAEMU_STRICT=1 makes a __syncthreads after some thread of
 * the block exited an error. Fault injection (README, "Injected device
 * errors"): CUDAEMU_FAIL_LAUNCH=N / CUDAEMU_FAIL_MEMCPY=N make the Nth kernel
 * launch / cudaMemcpyAsync of the process fail with the sticky
 * cudaErrorIllegalAddress; CUDAEMU_DEVICES=0 makes cudaGetDeviceCount report
 * no device (cudaErrorNoDevice).
 */
#include <chrono>

#include "cuda_emu.h"

#include <stdarg.h>
#include <stdio.h>
#include <sys/mman.h>

#include <atomic>
#include <map>
#include <set>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
extern "C" {
void __sanitizer_start_switch_fiber(void **fake_stack_save, const void *bottom, size_t size);
void __sanitizer_finish_switch_fiber(void *fake_stack_save, const void **bottom_old,
                                     size_t *size_old);
}
#else
#define EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

/* Streams, events and graphs. A stream is a capture state: work enqueued on
 * a stream that does not capture runs at once on the calling thread; on a
 * capturing one it is appended to ops (tests/emu/README, "Stream capture"). */
struct CUstream_st {
    int capture;                           /* cudaStreamCaptureStatus */
    int mode;                              /* cudaStreamCaptureMode of the capture */
    std::vector<std::function<void()>> ops; /* the capture so far */
};
struct CUevent_st {
    unsigned flags;
    bool recorded;
    std::chrono::steady_clock::time_point at; /* host time of the last record */
};
struct CUgraph_st {
    std::vector<std::function<void()>> ops;
};
struct CUgraphExec_st {
    std::vector<std::function<void()>> ops;
};

namespace emu {

fiber *g_cur;
uint3 g_blockIdx;
dim3 g_blockDim, g_gridDim;
void *g_dyn_smem;

namespace {

/* ---- errors ---- */

cudaError_t g_last = cudaSuccess;
bool g_strict;

void set_error(cudaError_t e) {
    if (g_last == cudaSuccess) g_last = e;
}

run_stats g_stats;
int g_replaying; /* inside cudaGraphLaunch */

/* ---- injected sticky errors ---- */

/* A sticky error corrupts the context on a GPU: every later runtime call
 * returns it and cudaGetLastError does not clear it; only cudaDeviceReset
 * (here) or a new process ends it. */
std::atomic<int> g_sticky{cudaSuccess};
std::atomic<long> g_n_launch{0}, g_n_memcpy_async{0};

long fault_at(const char *var) {
    const char *v = getenv(var); /* read per call: tests switch it */
    return v && *v ? strtol(v, nullptr, 10) : 0;
}

void make_sticky(const char *what, long n, const char *name) {
    g_sticky.store(cudaErrorIllegalAddress);
    g_last = cudaErrorIllegalAddress;
    fprintf(stderr, "cudaemu: injected sticky cudaErrorIllegalAddress at %s #%ld%s%s\n", what, n,
            name ? " " : "", name ? name : "");
}

} // namespace

void set_last(cudaError_t e) { set_error(e); }

run_stats stats() { return g_stats; }

/* ---- stream capture ---- */

/* Streams that capture (active or invalidated); those not in relaxed mode
 * forbid the unsafe calls (unsafe_call below). */
std::set<CUstream_st *> g_captures;

bool capturing(cudaStream_t s) { return s && s->capture != cudaStreamCaptureStatusNone; }

void capture_invalidate(cudaStream_t s) {
    if (s && s->capture == cudaStreamCaptureStatusActive) s->capture = cudaStreamCaptureStatusInvalidated;
}

cudaError_t capture_record(cudaStream_t s, std::function<void()> op) {
    if (s->capture == cudaStreamCaptureStatusInvalidated) return cudaErrorStreamCaptureInvalidated;
    s->ops.push_back(std::move(op));
    return cudaSuccess;
}

cudaError_t submit_lib(cudaStream_t s, std::function<void()> op) {
    if (capturing(s)) return capture_record(s, std::move(op));
    g_stats.lib_calls++;
    op();
    return cudaSuccess;
}

/* A call that is not enqueued on a stream and would synchronise or allocate
 * (cudaMalloc, cudaMallocHost, cudaMemcpy, cudaMemset, the synchronisations):
 * while a capture in global or thread-local mode is under way (one host
 * thread here, so the two are the same) CUDA refuses it with
 * cudaErrorStreamCaptureUnsupported and invalidates that capture. */
cudaError_t unsafe_call() {
    cudaError_t e = cudaSuccess;
    for (CUstream_st *c : g_captures)
        if (c->mode != cudaStreamCaptureModeRelaxed) {
            capture_invalidate(c);
            e = cudaErrorStreamCaptureUnsupported;
        }
    return e;
}

/* The sticky error, or cudaSuccess (used by every host API entry below). */
cudaError_t sticky() { return (cudaError_t)g_sticky.load(); }

bool launch_faulted(const char *name) {
    if (sticky() != cudaSuccess) {
        g_last = sticky();
        return true;
    }
    long n = ++g_n_launch, at = fault_at("CUDAEMU_FAIL_LAUNCH");
    if (at > 0 && n == at) {
        make_sticky("kernel launch", n, name);
        return true;
    }
    return false;
}

/* cudaMemcpyAsync's count and injection; true when this copy must fail. */
bool memcpy_async_faulted() {
    if (sticky() != cudaSuccess) return true;
    long n = ++g_n_memcpy_async, at = fault_at("CUDAEMU_FAIL_MEMCPY");
    if (at > 0 && n == at) {
        make_sticky("cudaMemcpyAsync", n, nullptr);
        return true;
    }
    return false;
}

void fault_reset() {
    g_sticky.store(cudaSuccess);
    g_n_launch = 0;
    g_n_memcpy_async = 0;
    g_last = cudaSuccess;
}

namespace {

/* ---- context switch ---- */

#if defined(__x86_64__)
extern "C" void emu_ctx_switch(void **save_sp, void *to_sp);
asm(".text\n"
    ".p2align 4\n"
    ".type emu_ctx_switch,@function\n"
    "emu_ctx_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size emu_ctx_switch, .-emu_ctx_switch\n");
#endif

enum fstate { F_RUN, F_BAR, F_WARP, F_DONE };

struct xfiber {
    fiber pub;
    int state;
    const char *file; /* where it waits */
    int line;
    const char *what;
    char *stack;      /* lowest usable byte */
    size_t stack_size;
#if defined(__x86_64__)
    void *sp;
#else
    ucontext_t uc;
#endif
    void *fake; /* ASan fake stack of this fiber */
};

struct warp_state {
    int size;            /* lanes that exist (the last warp may be partial) */
    uint32_t exited;     /* lanes that returned */
    uint32_t arrived;    /* lanes waiting in the current operation */
    uint32_t mask;       /* its mask */
    int kind;
    const char *file;
    int line;
    uint64_t val[32], res[32];
    int param[32], width[32];
    const void *ptr[32];
    /* wmma::mma_sync operands per lane */
    void *md[32];
    const void *ma[32], *mb[32], *mc[32];
    int nd, na, nb;
    void (*mma)(void *, const void *, const void *, const void *);
};

const size_t STACK_SIZE = 256 * 1024;

struct block_run {
    int n, n_done, bar_waiting;
    const char *bar_file;
    int bar_line;
    std::vector<xfiber> f;
    std::vector<warp_state> w;
    void (*body)(void *);
    void *ctx;
    const char *kname, *lfile;
    int lline;
} B;

#if defined(__x86_64__)
void *g_sched_sp;
#else
ucontext_t g_sched_uc;
#endif
const void *g_sched_bottom;
size_t g_sched_size;
void *g_sched_fake;
xfiber *g_x; /* running fiber */

const char *kind_name(int k) {
    static const char *n[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                              "__shfl_xor_sync", "__ballot_sync", "__any_sync", "__all_sync",
                              "__syncwarp", "wmma::load_matrix_sync",
                              "wmma::store_matrix_sync", "wmma::mma_sync"};
    return k >= 0 && k < W_KIND_COUNT ? n[k] : "?";
}

bool same_site(const char *f1, int l1, const char *f2, int l2) {
    return l1 == l2 && (f1 == f2 || strcmp(f1, f2) == 0);
}

/* ---- switching ---- */

void to_scheduler(bool exiting) {
    xfiber *x = g_x;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(exiting ? nullptr : &x->fake, g_sched_bottom, g_sched_size);
#endif
#if defined(__x86_64__)
    static void *dead_sp;
    emu_ctx_switch(exiting ? &dead_sp : &x->sp, g_sched_sp);
#else
    static ucontext_t dead;
    swapcontext(exiting ? &dead : &x->uc, &g_sched_uc);
#endif
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(x->fake, nullptr, nullptr);
#endif
    (void)exiting;
}

void fiber_exit();

void fiber_main() {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
    B.body(B.ctx);
    fiber_exit();
}

#if defined(__x86_64__)
extern "C" void emu_fiber_entry() { fiber_main(); }
#else
void emu_fiber_entry_uc() { fiber_main(); }
#endif

void switch_to(xfiber *x) {
    g_x = x;
    g_cur = &x->pub;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&g_sched_fake, x->stack, x->stack_size);
#endif
#if defined(__x86_64__)
    emu_ctx_switch(&g_sched_sp, x->sp);
#else
    swapcontext(&g_sched_uc, &x->uc);
#endif
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(g_sched_fake, nullptr, nullptr);
#endif
}

/* Fiber stacks: mapped once, reused by every block. A guard page under each. */
std::vector<char *> g_stacks;

char *stack_for(int i) {
    while ((int)g_stacks.size() <= i) {
        size_t page = 4096;
        char *m = (char *)mmap(nullptr, STACK_SIZE + page, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            fprintf(stderr, "cudaemu: cannot map a fiber stack\n");
            abort();
        }
        mprotect(m, page, PROT_NONE);
        g_stacks.push_back(m + page);
    }
    return g_stacks[i];
}

void init_fiber(xfiber &x, int i) {
    x.stack = stack_for(i);
    x.stack_size = STACK_SIZE;
    x.state = F_RUN;
    x.file = nullptr;
    x.line = 0;
    x.what = "running";
    x.fake = nullptr;
#if defined(__x86_64__)
    uintptr_t top = ((uintptr_t)(x.stack + STACK_SIZE)) & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = nullptr;                       /* entry's return address: never used */
    *--sp = (void *)&emu_fiber_entry;      /* popped by ret */
    for (int r = 0; r < 6; r++) *--sp = nullptr; /* rbp rbx r12-r15 */
    x.sp = sp;
#else
    getcontext(&x.uc);
    x.uc.uc_stack.ss_sp = x.stack;
    x.uc.uc_stack.ss_size = STACK_SIZE;
    x.uc.uc_link = nullptr;
    makecontext(&x.uc, emu_fiber_entry_uc, 0);
#endif
}

/* ---- reporting ---- */

void where(FILE *o) {
    fprintf(o, "  kernel %s launched at %s:%d, grid (%u,%u,%u) block (%u,%u,%u)\n", B.kname,
            B.lfile, B.lline, g_gridDim.x, g_gridDim.y, g_gridDim.z, g_blockDim.x, g_blockDim.y,
            g_blockDim.z);
    fprintf(o, "  in block (%u,%u,%u)", g_blockIdx.x, g_blockIdx.y, g_blockIdx.z);
    if (g_x)
        fprintf(o, ", thread (%u,%u,%u) (warp %d lane %d)", g_x->pub.tid.x, g_x->pub.tid.y,
                g_x->pub.tid.z, g_x->pub.warp, g_x->pub.lane);
    fprintf(o, "\n");
}

/* Every fiber's state, runs of equal states folded into one line. */
void dump_fibers(FILE *o) {
    int i = 0;
    while (i < B.n) {
        const xfiber &a = B.f[i];
        int j = i + 1;
        while (j < B.n && B.f[j].state == a.state && B.f[j].what == a.what &&
               B.f[j].line == a.line && B.f[j].file == a.file)
            j++;
        const char *st = a.state == F_DONE ? "exited" : a.state == F_RUN ? "runnable" : "waits at";
        if (j - i == 1)
            fprintf(o, "    thread %d:", i);
        else
            fprintf(o, "    threads %d-%d:", i, j - 1);
        if (a.state == F_DONE || a.state == F_RUN)
            fprintf(o, " %s\n", st);
        else
            fprintf(o, " %s %s %s:%d\n", st, a.what, a.file ? a.file : "?", a.line);
        i = j;
    }
}

} // namespace

void fail(const char *file, int line, const char *fmt, ...) {
    fflush(stdout);
    fprintf(stderr, "cudaemu: ERROR at %s:%d: ", file, line);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    if (B.kname) {
        where(stderr);
        dump_fibers(stderr);
    }
    fflush(stderr);
    abort();
}

namespace {

void wait_here(int state, const char *what, const char *file, int line) {
    g_x->state = state;
    g_x->what = what;
    g_x->file = file;
    g_x->line = line;
    to_scheduler(false);
}

void release_barrier() {
    for (auto &x : B.f)
        if (x.state == F_BAR) x.state = F_RUN;
    B.bar_waiting = 0;
}

/* Computes every lane's result of the completed warp operation. */
void complete_warp(warp_state &w) {
    uint32_t m = w.mask;
    int lo = __builtin_ctz(m);
    switch (w.kind) {
    case W_SHFL_IDX:
    case W_SHFL_UP:
    case W_SHFL_DOWN:
    case W_SHFL_XOR:
        for (int l = 0; l < 32; l++) {
            if (!(m >> l & 1u)) continue;
            int wd = w.width[l], base = l / wd * wd, p = w.param[l], src = l;
            if (w.kind == W_SHFL_IDX) src = base + ((p % wd) + wd) % wd;
            if (w.kind == W_SHFL_UP) src = l - base >= p ? l - p : l;
            if (w.kind == W_SHFL_DOWN) src = l - base + p < wd ? l + p : l;
            if (w.kind == W_SHFL_XOR) {
                src = l ^ p;
                if (src >= base + wd) src = l;
            }
            if (src < 0 || src >= 32 || !(m >> src & 1u))
                fail(w.file, w.line, "%s: lane %d reads lane %d, which is not in mask 0x%08x",
                     kind_name(w.kind), l, src, m);
            w.res[l] = w.val[src];
        }
        break;
    case W_BALLOT:
    case W_ANY:
    case W_ALL: {
        uint32_t b = 0;
        for (int l = 0; l < 32; l++)
            if ((m >> l & 1u) && w.val[l]) b |= 1u << l;
        uint64_t r = w.kind == W_BALLOT ? b : w.kind == W_ANY ? (b != 0) : (b == m);
        for (int l = 0; l < 32; l++) w.res[l] = r;
        break;
    }
    case W_WMMA_LOAD:
    case W_WMMA_STORE:
        for (int l = 0; l < 32; l++)
            if ((m >> l & 1u) && (w.ptr[l] != w.ptr[lo] || w.param[l] != w.param[lo]))
                fail(w.file, w.line,
                     "%s: lanes pass different pointers or ldm (lane %d: %p/%d, lane %d: %p/%d)",
                     kind_name(w.kind), lo, w.ptr[lo], w.param[lo], l, w.ptr[l], w.param[l]);
        break;
    case W_WMMA_MMA: {
        std::vector<unsigned char> tmp(w.nd);
        w.mma(tmp.data(), w.ma[lo], w.mb[lo], w.mc[lo]);
        for (int l = 0; l < 32; l++)
            if (m >> l & 1u) memcpy(w.md[l], tmp.data(), w.nd);
        break;
    }
    default:
        break;
    }
}

/* Arrival of the running lane at a warp operation; returns when the whole
 * mask has arrived. */
void warp_arrive(int kind, uint32_t mask, const char *file, int line) {
    fiber &me = g_x->pub;
    warp_state &w = B.w[me.warp];
    uint32_t exist = w.size == 32 ? 0xffffffffu : ((1u << w.size) - 1u);
    if (!(mask >> me.lane & 1u))
        fail(file, line, "%s: mask 0x%08x does not name the calling lane %d", kind_name(kind),
             mask, me.lane);
    if (mask & ~exist)
        fail(file, line, "%s: mask 0x%08x names lanes that do not exist (this warp has %d)",
             kind_name(kind), mask, w.size);
    if (mask & w.exited)
        fail(file, line, "%s: mask 0x%08x names exited lane %d", kind_name(kind), mask,
             __builtin_ctz(mask & w.exited));
    if (w.arrived) {
        if (w.kind != kind || !same_site(w.file, w.line, file, line))
            fail(file, line, "warp operation reached from different places: %s here, %s at %s:%d",
                 kind_name(kind), kind_name(w.kind), w.file, w.line);
        if (w.mask != mask)
            fail(file, line, "%s: lanes pass different masks (0x%08x and 0x%08x)",
                 kind_name(kind), mask, w.mask);
    } else {
        w.kind = kind;
        w.mask = mask;
        w.file = file;
        w.line = line;
    }
    w.arrived |= 1u << me.lane;
    if (w.arrived == mask) {
        complete_warp(w);
        w.arrived = 0;
        for (int l = 0; l < w.size; l++) {
            xfiber &x = B.f[me.warp * 32 + l];
            if ((mask >> l & 1u) && x.state == F_WARP) x.state = F_RUN;
        }
        return;
    }
    wait_here(F_WARP, kind_name(kind), file, line);
}

void fiber_exit() {
    xfiber *x = g_x;
    fiber &me = x->pub;
    warp_state &w = B.w[me.warp];
    w.exited |= 1u << me.lane;
    if (w.arrived && (w.mask >> me.lane & 1u))
        fail(w.file, w.line, "%s: mask 0x%08x names exited lane %d (it returned instead of "
             "arriving)", kind_name(w.kind), w.mask, me.lane);
    x->state = F_DONE;
    x->what = "exited";
    B.n_done++;
    if (B.bar_waiting) {
        if (g_strict)
            fail(B.bar_file, B.bar_line,
                 "(strict) a thread exits while others wait at __syncthreads");
        if (B.bar_waiting == B.n - B.n_done) release_barrier();
    }
    to_scheduler(true);
    abort(); /* never resumed */
}

/* ---- device memory bookkeeping ---- */

std::set<void *> g_dev, g_host;
std::map<const void *, int> g_func_smem; /* cudaFuncAttributeMaxDynamicSharedMemorySize */

const size_t SMEM_DEFAULT = 48 * 1024, SMEM_OPTIN = 227 * 1024;

/* The static __shared__ variables of every kernel (tests/emu/cuda_emu.h). */
extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

/* Writes 0xff over the static shared memory without ASan's checks (the
 * section holds ASan's redzones between the variables). */
__attribute__((no_sanitize_address)) void poison_static_shared() {
    volatile unsigned char *p = (volatile unsigned char *)__start_emu_shared;
    volatile unsigned char *e = (volatile unsigned char *)__stop_emu_shared;
    if (!p || !e) return;
    for (; p < e; p++) *p = 0xff;
}

} // namespace

uint64_t warp_op(int kind, uint32_t mask, uint64_t val, int param, int width, const void *ptr,
                 const char *file, int line) {
    fiber &me = g_x->pub;
    warp_state &w = B.w[me.warp];
    if (kind <= W_SHFL_XOR && (width < 1 || width > 32 || (width & (width - 1))))
        fail(file, line, "%s: width %d is not a power of two <= 32", kind_name(kind), width);
    w.val[me.lane] = val;
    w.param[me.lane] = param;
    w.width[me.lane] = width;
    w.ptr[me.lane] = ptr;
    warp_arrive(kind, mask, file, line);
    return w.res[me.lane];
}

void warp_mma(void *d, const void *a, const void *b, const void *c, int nd, int na, int nb,
              void (*compute)(void *, const void *, const void *, const void *), const char *file,
              int line) {
    fiber &me = g_x->pub;
    warp_state &w = B.w[me.warp];
    w.md[me.lane] = d;
    w.ma[me.lane] = a;
    w.mb[me.lane] = b;
    w.mc[me.lane] = c;
    w.nd = nd;
    w.na = na;
    w.nb = nb;
    w.mma = compute;
    warp_arrive(W_WMMA_MMA, 0xffffffffu, file, line);
}

void syncthreads(const char *file, int line) {
    if (g_strict && B.n_done)
        fail(file, line, "(strict) __syncthreads after %d thread(s) of the block exited",
             B.n_done);
    if (B.bar_waiting == 0) {
        B.bar_file = file;
        B.bar_line = line;
    } else if (!same_site(B.bar_file, B.bar_line, file, line)) {
        fail(file, line, "__syncthreads reached from different places: here and at %s:%d",
             B.bar_file, B.bar_line);
    }
    B.bar_waiting++;
    if (B.bar_waiting == B.n - B.n_done) {
        release_barrier();
        return;
    }
    wait_here(F_BAR, "__syncthreads", file, line);
}

bool launch_check(const void *kernel, const char *name, dim3 g, dim3 b, size_t smem) {
    (void)name;
    uint64_t nt = (uint64_t)b.x * b.y * b.z;
    if (!g.x || !g.y || !g.z || !b.x || !b.y || !b.z || nt > 1024 || b.x > 1024 || b.y > 1024 ||
        b.z > 64 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
        set_error(cudaErrorInvalidConfiguration);
        return false;
    }
    size_t lim = SMEM_DEFAULT;
    auto it = g_func_smem.find(kernel);
    if (it != g_func_smem.end()) lim = (size_t)it->second;
    if (smem > lim || smem > SMEM_OPTIN) {
        set_error(cudaErrorInvalidValue);
        return false;
    }
    return true;
}

void run_grid(const void *kernel, const char *name, const char *file, int line, dim3 g, dim3 b,
              size_t smem, void (*body)(void *), void *ctx) {
    (void)kernel;
    if (!g_replaying) g_stats.kernels++;
    const char *e = getenv("CUDAEMU_STRICT"); /* read per launch: tests switch it */
    g_strict = e && *e && strcmp(e, "0") != 0;
    const int n = (int)(b.x * b.y * b.z), n_warps = (n + 31) / 32;
    B.n = n;
    B.body = body;
    B.ctx = ctx;
    B.kname = name;
    B.lfile = file;
    B.lline = line;
    B.f.resize(n);
    B.w.resize(n_warps);
    g_gridDim = g;
    g_blockDim = b;
    for (unsigned bz = 0; bz < g.z; bz++)
        for (unsigned by = 0; by < g.y; by++)
            for (unsigned bx = 0; bx < g.x; bx++) {
                g_blockIdx = uint3{bx, by, bz};
                poison_static_shared();
                /* Dynamic shared memory: exactly smem bytes on the heap (ASan
                 * sees overruns), 0xff garbage. */
                void *dyn = nullptr;
                if (smem) {
                    if (posix_memalign(&dyn, 128, smem)) abort();
                    memset(dyn, 0xff, smem);
                }
                g_dyn_smem = dyn;
                B.n_done = 0;
                B.bar_waiting = 0;
                for (int w = 0; w < n_warps; w++) {
                    warp_state &ws = B.w[w];
                    ws.size = n - w * 32 < 32 ? n - w * 32 : 32;
                    ws.exited = 0;
                    ws.arrived = 0;
                }
                for (int i = 0; i < n; i++) {
                    xfiber &x = B.f[i];
                    init_fiber(x, i);
                    x.pub.tid = uint3{(unsigned)i % b.x, (unsigned)i / b.x % b.y,
                                      (unsigned)i / (b.x * b.y)};
                    x.pub.lin = i;
                    x.pub.warp = i / 32;
                    x.pub.lane = i % 32;
                }
                while (B.n_done < n) {
                    bool progress = false;
                    for (int i = 0; i < n; i++)
                        if (B.f[i].state == F_RUN) {
                            switch_to(&B.f[i]);
                            progress = true;
                        }
                    if (!progress && B.n_done < n) {
                        g_x = nullptr;
                        fflush(stdout);
                        fprintf(stderr, "cudaemu: ERROR: deadlock: no thread of the block can go on\n");
                        where(stderr);
                        dump_fibers(stderr);
                        abort();
                    }
                }
                g_x = nullptr;
                g_cur = nullptr;
                free(dyn);
                g_dyn_smem = nullptr;
            }
    B.kname = nullptr;
}

} // namespace emu

/* ---- host API ---- */

using emu::set_error;

static const size_t EMU_TOTAL_MEM = (size_t)80 << 30;

cudaError_t cudaMalloc(void **p, size_t n) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (!p) return cudaErrorInvalidValue;
    if (cudaError_t ce = emu::unsafe_call()) {
        *p = nullptr;
        return ce;
    }
    void *m = nullptr;
    /* 256-byte alignment as cudaMalloc; exactly n bytes so ASan sees overruns;
     * 0xff garbage (NaN floats) so reads of unwritten data show. */
    if (posix_memalign(&m, 256, n ? n : 1)) {
        *p = nullptr;
        set_error(cudaErrorMemoryAllocation);
        return cudaErrorMemoryAllocation;
    }
    memset(m, 0xff, n);
    emu::g_dev.insert(m);
    *p = m;
    return cudaSuccess;
}

cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    if (!emu::g_dev.erase(p)) {
        set_error(cudaErrorInvalidValue);
        return cudaErrorInvalidValue;
    }
    free(p);
    return cudaSuccess;
}

cudaError_t cudaMallocHost(void **p, size_t n) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (!p) return cudaErrorInvalidValue;
    if (cudaError_t ce = emu::unsafe_call()) {
        *p = nullptr;
        return ce;
    }
    *p = malloc(n ? n : 1);
    if (!*p) return cudaErrorMemoryAllocation;
    emu::g_host.insert(*p);
    return cudaSuccess;
}
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags) {
    (void)flags;
    return cudaMallocHost(p, n);
}
cudaError_t cudaFreeHost(void *p) {
    if (!p) return cudaSuccess;
    if (!emu::g_host.erase(p)) return cudaErrorInvalidValue;
    free(p);
    return cudaSuccess;
}

namespace emu {
/* The copy itself, counted by direction (run_stats). */
void do_copy(void *dst, const void *src, size_t n, cudaMemcpyKind k) {
    if (k == cudaMemcpyHostToDevice) {
        g_stats.h2d_bytes += n;
        g_stats.h2d_copies++;
    } else if (k == cudaMemcpyDeviceToHost) {
        g_stats.d2h_bytes += n;
        g_stats.d2h_copies++;
    }
    if (n) memmove(dst, src, n);
}
} // namespace emu

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind k) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (k < cudaMemcpyHostToHost || k > cudaMemcpyDefault) return cudaErrorInvalidMemcpyDirection;
    if (n && (!dst || !src)) return cudaErrorInvalidValue;
    if (cudaError_t ce = emu::unsafe_call()) return ce;
    emu::do_copy(dst, src, n, k);
    return cudaSuccess;
}
/* On a capturing stream the copy is recorded with its pointers and size (a
 * graph's memcpy node reads the source when it runs, not now). */
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k,
                            cudaStream_t s) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (k < cudaMemcpyHostToHost || k > cudaMemcpyDefault) return cudaErrorInvalidMemcpyDirection;
    if (n && (!dst || !src)) return cudaErrorInvalidValue;
    if (emu::capturing(s))
        return emu::capture_record(s, [=]() {
            if (emu::memcpy_async_faulted()) return;
            emu::do_copy(dst, src, n, k);
        });
    if (emu::memcpy_async_faulted()) return emu::sticky();
    emu::do_copy(dst, src, n, k);
    return cudaSuccess;
}
cudaError_t cudaMemset(void *p, int v, size_t n) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (n && !p) return cudaErrorInvalidValue;
    if (cudaError_t ce = emu::unsafe_call()) return ce;
    if (n) memset(p, v, n);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (n && !p) return cudaErrorInvalidValue;
    if (emu::capturing(s))
        return emu::capture_record(s, [=]() {
            if (emu::sticky() == cudaSuccess && n) memset(p, v, n);
        });
    if (n) memset(p, v, n);
    return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (free_b) *free_b = EMU_TOTAL_MEM;
    if (total_b) *total_b = EMU_TOTAL_MEM;
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    return emu::unsafe_call();
}
cudaError_t cudaDeviceReset(void) {
    emu::fault_reset();
    return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int *n) {
    if (!n) return cudaErrorInvalidValue;
    const char *dv = getenv("CUDAEMU_DEVICES"); /* "0": a machine without a GPU */
    *n = dv && strcmp(dv, "0") == 0 ? 0 : 1;
    return *n ? cudaSuccess : cudaErrorNoDevice;
}
cudaError_t cudaGetDevice(int *d) {
    if (!d) return cudaErrorInvalidValue;
    *d = 0;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (!p || d != 0) return cudaErrorInvalidValue;
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "CUDA emulator (tests/emu, H100 SXM limits)");
    p->totalGlobalMem = EMU_TOTAL_MEM;
    p->sharedMemPerBlock = 48 * 1024;
    p->sharedMemPerBlockOptin = 227 * 1024;
    p->sharedMemPerMultiprocessor = 228 * 1024;
    p->regsPerBlock = 65536;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = 1024;
    p->maxThreadsDim[1] = 1024;
    p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 0x7fffffff;
    p->maxGridSize[1] = 65535;
    p->maxGridSize[2] = 65535;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 132;
    p->maxThreadsPerMultiProcessor = 2048;
    p->l2CacheSize = 50 * 1024 * 1024;
    p->memoryBusWidth = 5120;
    p->clockRate = 1980000;
    p->memoryClockRate = 2619000;
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
    if (emu::sticky() != cudaSuccess) return emu::sticky(); /* not cleared */
    cudaError_t e = emu::g_last;
    emu::g_last = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError(void) {
    return emu::sticky() != cudaSuccess ? emu::sticky() : emu::g_last;
}

const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    }
    return "cudaErrorUnknown";
}
const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    }
    return "unknown error";
}

/* Streams and events: distinct non-null handles; work runs at once unless
 * the stream captures. */
cudaError_t cudaStreamCreate(cudaStream_t *s) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (!s) return cudaErrorInvalidValue;
    *s = new CUstream_st();
    (*s)->capture = cudaStreamCaptureStatusNone;
    (*s)->mode = cudaStreamCaptureModeGlobal;
    return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags) {
    (void)flags;
    return cudaStreamCreate(s);
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (s) emu::g_captures.erase(s);
    delete s;
    return cudaSuccess;
}
/* Synchronising a capturing stream is an error whatever the mode (its work
 * has not run and will not until a graph launch); it invalidates the
 * capture. */
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (emu::capturing(s)) {
        emu::capture_invalidate(s);
        return cudaErrorStreamCaptureUnsupported;
    }
    return emu::unsafe_call();
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    (void)s;
    (void)e;
    (void)flags;
    return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t *e) { return cudaEventCreateWithFlags(e, 0); }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (!e) return cudaErrorInvalidValue;
    *e = new CUevent_st();
    (*e)->flags = flags;
    (*e)->recorded = false;
    return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}
/* Work runs at once on the calling thread, so the host time at the record is
 * when everything queued before it finished: elapsed times between two
 * records are the emulated work's CPU time between them (plausible values,
 * nothing like a GPU's). */
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (!e) return cudaErrorInvalidValue;
    if (emu::capturing(s)) /* a record node: the time of the replay */
        return emu::capture_record(s, [=]() {
            e->recorded = true;
            e->at = std::chrono::steady_clock::now();
        });
    e->recorded = true;
    e->at = std::chrono::steady_clock::now();
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (!e) return cudaErrorInvalidValue;
    return emu::unsafe_call();
}
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (!ms || !a || !b) return cudaErrorInvalidValue;
    /* as CUDA: both recorded, and both created with timing */
    if ((a->flags | b->flags) & cudaEventDisableTiming) return cudaErrorInvalidValue;
    if (!a->recorded || !b->recorded) return cudaErrorInvalidValue;
    *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
    return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void *func, cudaFuncAttribute attr, int value) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (!func) return cudaErrorInvalidDeviceFunction;
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || (size_t)value > emu::SMEM_OPTIN) {
            set_error(cudaErrorInvalidValue);
            return cudaErrorInvalidValue;
        }
        emu::g_func_smem[func] = value;
    }
    return cudaSuccess;
}

/* ---- stream capture and graphs (tests/emu/README, "Stream capture") ---- */

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (!s) return cudaErrorStreamCaptureUnsupported; /* the legacy stream cannot capture */
    if (mode < cudaStreamCaptureModeGlobal || mode > cudaStreamCaptureModeRelaxed)
        return cudaErrorInvalidValue;
    if (emu::capturing(s)) return cudaErrorIllegalState;
    s->capture = cudaStreamCaptureStatusActive;
    s->mode = mode;
    s->ops.clear();
    emu::g_captures.insert(s);
    return cudaSuccess;
}

/* Ends the capture whatever its state; an invalidated one gives no graph. */
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g) {
    if (!g) return cudaErrorInvalidValue;
    *g = nullptr;
    if (!s || !emu::capturing(s)) return cudaErrorIllegalState;
    bool ok = s->capture == cudaStreamCaptureStatusActive;
    s->capture = cudaStreamCaptureStatusNone;
    emu::g_captures.erase(s);
    std::vector<std::function<void()>> ops;
    ops.swap(s->ops);
    if (!ok) return cudaErrorStreamCaptureInvalidated;
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    *g = new CUgraph_st();
    (*g)->ops = std::move(ops);
    return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus *status) {
    if (!status) return cudaErrorInvalidValue;
    *status = s ? (cudaStreamCaptureStatus)s->capture : cudaStreamCaptureStatusNone;
    return emu::sticky();
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *e, cudaGraph_t g, unsigned long long flags) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (!e || !g || flags != 0) return cudaErrorInvalidValue;
    *e = new CUgraphExec_st();
    (*e)->ops = g->ops; /* a copy: the graph may be destroyed at once */
    return cudaSuccess;
}

/* Runs the operations in capture order on the calling thread (or records
 * the whole graph when s captures: a child graph). Faults injected into one
 * operation make the rest see the sticky error, as on a device. */
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s) {
    if (emu::sticky() != cudaSuccess) return emu::sticky();
    if (!e) return cudaErrorInvalidResourceHandle;
    if (emu::capturing(s)) return emu::capture_record(s, [=]() {
        for (auto &op : e->ops) op();
    });
    emu::g_stats.graph_launches++;
    emu::g_replaying++;
    for (auto &op : e->ops) {
        emu::g_stats.graph_ops++;
        op();
    }
    emu::g_replaying--;
    return emu::sticky();
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
    delete e;
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t g) {
    delete g;
    return cudaSuccess;
}
