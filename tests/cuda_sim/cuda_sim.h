// A CPU simulator for the CUDA kernels of gpt2np/backends/cuda/*.cu, for tests on machines without
// a GPU (CI has none). Each kernel is compiled as plain C++ with this header force-included;
// a launch runs the blocks one after another, and the threads of a block as coroutines
// (ucontext) on one OS thread, switched at every barrier:
//   __syncthreads()        waits until every live thread of the block arrives,
//   __shfl_*_sync(...)     exchange through a slot per thread, between two warp barriers,
//   threads that return    count as arrived (as on the GPU since Volta),
//   a barrier nobody can pass (threads of a warp split across different barriers, or a
//   __syncthreads that only part of the block reaches) is reported as a deadlock.
// Static __shared__ memory is a static local: shared by the threads of the running block.
// Dynamic shared memory (`extern __shared__ T name[];`) is rewritten by the Python side
// into a pointer to one buffer of the launch's size (cuda_sim/__init__.py).
// Not simulated: memory-model races (all threads interleave only at barriers), atomics'
// nondeterminism and anything
// beyond what the kernels here use.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace sim {
enum State { RUNNABLE, AT_WARP_BARRIER, AT_BLOCK_BARRIER, DONE };

// Switching threads: on x86-64 a hand-written switch of the stack pointer and the
// callee-saved registers (swapcontext also saves the signal mask, a system call per switch:
// far slower); elsewhere ucontext.
#if defined(__x86_64__)
#define SIM_FAST_SWITCH 1
extern "C" void gpt2np_sim_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .hidden gpt2np_sim_switch
    .globl gpt2np_sim_switch
    .type gpt2np_sim_switch, @function
gpt2np_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gpt2np_sim_switch, .-gpt2np_sim_switch
)");
#else
#define SIM_FAST_SWITCH 0
#endif

struct Thread {
    ucontext_t ctx;
    void* sp = nullptr;  // SIM_FAST_SWITCH: the saved stack pointer
    State state = RUNNABLE;
    dim3 idx;
};

inline std::vector<Thread> threads;
inline std::vector<char> stacks;
inline ucontext_t scheduler;
inline void* scheduler_sp = nullptr;
inline int current = 0;
inline std::function<void()> body;
inline unsigned long long slots[1024];  // shuffle exchange, one per thread of the block
inline dim3 thread_idx, block_idx, grid_dim, block_dim;
inline std::vector<double> dynamic_smem_storage;  // doubles: 8-byte aligned
inline void* dynamic_smem = nullptr;  // `extern __shared__ T name[];` points here
constexpr size_t STACK = 64 * 1024;
inline const char* fault = nullptr;  // set by an emulated instruction used wrongly: the launch fails

inline void wait_at(State s) {
    threads[current].state = s;
#if SIM_FAST_SWITCH
    gpt2np_sim_switch(&threads[current].sp, scheduler_sp);
#else
    swapcontext(&threads[current].ctx, &scheduler);
#endif
}

inline void entry() {
    body();
    threads[current].state = DONE;  // then back to the scheduler through uc_link
}

#if SIM_FAST_SWITCH
[[noreturn]] inline void trampoline() {
    entry();
    void* dead;
    gpt2np_sim_switch(&dead, scheduler_sp);  // never resumed
    __builtin_unreachable();
}

// a fresh stack that "returns" into trampoline() with 16-byte alignment as after a call
inline void* initial_sp(char* stack_lo, size_t size) {
    uintptr_t top = ((uintptr_t)(stack_lo + size)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;                   // trampoline's (never used) return address
    *--sp = (void*)&trampoline;        // popped by gpt2np_sim_switch's ret
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12-r15
    return sp;
}
#endif

inline void resume(int t) {
#if SIM_FAST_SWITCH
    gpt2np_sim_switch(&scheduler_sp, threads[t].sp);
#else
    swapcontext(&scheduler, &threads[t].ctx);
#endif
}

// run one block; 0 on success, 1 on a deadlock
inline int run_block(dim3 bidx) {
    const int n = (int)(block_dim.x * block_dim.y * block_dim.z);
    block_idx = bidx;
    for (int t = 0; t < n; ++t) {
        Thread& th = threads[t];
        th.state = RUNNABLE;
        th.idx = {t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)};
#if SIM_FAST_SWITCH
        th.sp = initial_sp(stacks.data() + (size_t)t * STACK, STACK);
#else
        getcontext(&th.ctx);
        th.ctx.uc_stack.ss_sp = stacks.data() + (size_t)t * STACK;
        th.ctx.uc_stack.ss_size = STACK;
        th.ctx.uc_link = &scheduler;
        makecontext(&th.ctx, entry, 0);
#endif
    }
    for (;;) {
        bool ran = false;
        for (int t = 0; t < n; ++t) {
            if (threads[t].state != RUNNABLE) continue;
            current = t;
            thread_idx = threads[t].idx;
            resume(t);
            ran = true;
        }
        if (ran) continue;
        // nobody can run: release whole warps waiting at a warp barrier, else the block
        bool released = false, all_done = true;
        for (int w = 0; w < (n + 31) / 32; ++w) {
            int live = 0, waiting = 0;
            for (int t = w * 32; t < std::min(n, w * 32 + 32); ++t) {
                if (threads[t].state == DONE) continue;
                ++live;
                waiting += threads[t].state == AT_WARP_BARRIER;
            }
            if (live) all_done = false;
            if (live && waiting == live) {
                for (int t = w * 32; t < std::min(n, w * 32 + 32); ++t)
                    if (threads[t].state == AT_WARP_BARRIER) threads[t].state = RUNNABLE;
                released = true;
            }
        }
        if (all_done) return 0;
        if (released) continue;
        int live = 0, waiting = 0;
        for (int t = 0; t < n; ++t) {
            if (threads[t].state == DONE) continue;
            ++live;
            waiting += threads[t].state == AT_BLOCK_BARRIER;
        }
        if (waiting == live) {
            for (int t = 0; t < n; ++t)
                if (threads[t].state == AT_BLOCK_BARRIER) threads[t].state = RUNNABLE;
            continue;
        }
        std::fprintf(stderr, "cuda_sim: deadlock in block (%u,%u,%u): %d live threads, "
                     "%d at __syncthreads, the rest at a warp barrier of a split warp\n",
                     bidx.x, bidx.y, bidx.z, live, waiting);
        return 1;
    }
}

inline int launch(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> kernel) {
    const size_t n = (size_t)block.x * block.y * block.z;
    if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        std::fprintf(stderr, "cuda_sim: invalid launch grid (%u,%u,%u) block (%u,%u,%u)\n",
                     grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return 2;
    }
    grid_dim = grid;
    block_dim = block;
    body = std::move(kernel);
    dynamic_smem_storage.assign(smem_bytes / sizeof(double) + 1, 0.0);
    dynamic_smem = dynamic_smem_storage.data();
    threads.assign(n, Thread());
    stacks.assign(n * STACK, 0);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                if (run_block({x, y, z})) return 1;
                if (fault) {
                    std::fprintf(stderr, "cuda_sim: fault in block (%u,%u,%u): %s\n", x, y, z, fault);
                    fault = nullptr;
                    return 3;
                }
            }
    return 0;
}

inline int lane() { return current & 31; }

template <class T>
inline T shuffle(T v, int src_lane, bool valid) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    std::memcpy(&slots[current], &v, sizeof(T));
    wait_at(AT_WARP_BARRIER);  // every lane has written
    T r = v;
    if (valid) std::memcpy(&r, &slots[(current & ~31) + src_lane], sizeof(T));
    wait_at(AT_WARP_BARRIER);  // every lane has read: the slots may be written again
    return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, warp-collective: d += a . b with
// the PTX ISA's fragment layouts (g = lane / 4, t = lane % 4; two bf16 per register, the
// lower index in the low half):
//   a[0..3] = A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]
//   b[0..1] = B[2t..2t+1][g], B[2t+8..2t+9][g]
//   d[0..3] = D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]
// Every lane posts its registers, then computes its own four outputs from the whole tile.
// Products of bf16 values are exact in float32; the sums run in float32, in k order.
inline unsigned mma_regs[1024][6];
inline float bf16_value(unsigned bits) {
    const unsigned u = (bits & 0xffffu) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline void mma_bf16_m16n8k16(float* d, const unsigned* a, const unsigned* b) {
    const int warp0 = current & ~31;
    std::memcpy(mma_regs[current], a, 4 * sizeof(unsigned));
    std::memcpy(mma_regs[current] + 4, b, 2 * sizeof(unsigned));
    wait_at(AT_WARP_BARRIER);  // every lane has posted its fragments
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const unsigned* r = mma_regs[warp0 + l];
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {  // a[i]: rows g (+8 for odd i), columns 2t (+8 for i >= 2)
            const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
            A[row][col] = bf16_value(r[i]);
            A[row][col + 1] = bf16_value(r[i] >> 16);
        }
        for (int i = 0; i < 2; ++i) {
            B[2 * t + 8 * i][g] = bf16_value(r[4 + i]);
            B[2 * t + 8 * i + 1][g] = bf16_value(r[4 + i] >> 16);
        }
    }
    wait_at(AT_WARP_BARRIER);  // every lane has read: the slots may be written again
    const int g = (current & 31) >> 2, t = current & 3;
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float acc = 0.0f;
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        d[i] += acc;
    }
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16, warp-collective: lane l posts the
// address of row l % 8 of matrix l / 8 (16 bytes); r[i] of lane l gets matrix i's row
// l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (trans: column l / 4, rows 2 (l % 4) and
// 2 (l % 4) + 1), the lower index in the low half. A row address not 16-byte aligned is
// a fault, as on the GPU.
inline const unsigned short* ldmatrix_rows[1024];
inline void ldmatrix(unsigned* r, const void* row, bool trans) {
    if (reinterpret_cast<uintptr_t>(row) % 16) fault = "ldmatrix: a row address not 16-byte aligned";
    const int warp0 = current & ~31, l = current & 31;
    ldmatrix_rows[current] = static_cast<const unsigned short*>(row);
    wait_at(AT_WARP_BARRIER);  // every lane has posted its row
    unsigned out[4];
    for (int i = 0; i < 4; ++i) {
        const unsigned short* const* m = ldmatrix_rows + warp0 + 8 * i;  // matrix i's rows
        const int a = l >> 2, b = 2 * (l & 3);
        const unsigned lo = trans ? m[b][a] : m[a][b];
        const unsigned hi = trans ? m[b + 1][a] : m[a][b + 1];
        out[i] = lo | (hi << 16);
    }
    wait_at(AT_WARP_BARRIER);  // every lane has read: the slots may be written again
    std::memcpy(r, out, sizeof(out));
}
inline void ldmatrix_x4(unsigned* r, const void* row) { ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(unsigned* r, const void* row) { ldmatrix(r, row, true); }
}  // namespace sim

#define GPT2NP_CUDA_SIM 1  // kernels swap in the emulations above for inline PTX
#define threadIdx (sim::thread_idx)
#define blockIdx (sim::block_idx)
#define blockDim (sim::block_dim)
#define gridDim (sim::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define warpSize 32

inline void __syncthreads() { sim::wait_at(sim::AT_BLOCK_BARRIER); }
inline void __syncwarp(unsigned = 0xffffffffu) { sim::wait_at(sim::AT_WARP_BARRIER); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
    return sim::shuffle(v, sim::lane() ^ mask, true);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
    return sim::shuffle(v, sim::lane() + (int)delta, sim::lane() + (int)delta < 32);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32) {
    return sim::shuffle(v, sim::lane() - (int)delta, sim::lane() >= (int)delta);
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int = 32) {
    return sim::shuffle(v, src & 31, true);
}

inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <class T> inline T __ldg(const T* p) { return *p; }
// IEEE round-to-nearest intrinsics: plain float arithmetic on the host (built with
// -ffp-contract=off, so nothing is fused into an FMA behind our back)
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint4 { unsigned int x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
// one OS thread: an atomic is a plain read-modify-write
template <class T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
using std::max;
using std::min;
