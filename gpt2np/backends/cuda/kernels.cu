// Fused float32 kernels for gpt2np's CuPy backend (wrappers: backends/cupy_kernels.py).
//
// Each kernel computes what its reference in gpt2np/layers.py or gpt2np/optim.py computes;
// the names mirror the reference functions. Conventions:
//   - arrays are row-major (C-contiguous) float32; N rows of C channels (or V logits);
//   - offsets into big arrays are 64-bit: B*T*V can pass 2^31;
//   - reductions run in a fixed order (warp shuffles, then shared memory read in warp
//     order), never through atomics: every result is bit-identical from run to run;
//   - block sizes are multiples of 32 (the wrappers choose them), at most 1024.
// Plain NVRTC, no headers: only builtins (math functions, shuffles, float2). CuPy compiles
// with -ftz=true (denormals flush to zero) and without --use_fast_math (IEEE division and
// sqrt, accurate expf/logf/tanhf).

#include "bf16.cuh"

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)
#define QUIET_NAN __int_as_float(0x7fc00000)

// Sum over the 32 lanes of a warp. The xor butterfly leaves the total in every lane.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Sums of a and b over the whole block, returned to every thread. buf: 64 floats of shared
// memory. Every thread adds the per-warp sums in the same order, so all get the same value.
// Must be reached by every thread of the block (it synchronises).
__device__ float2 block_sum2(float a, float b, float* buf) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
        buf[warp] = a;
        buf[32 + warp] = b;
    }
    __syncthreads();
    float2 s = make_float2(0.f, 0.f);
    for (int w = 0; w < n_warps; w++) {
        s.x += buf[w];
        s.y += buf[32 + w];
    }
    __syncthreads();  // everyone has read buf before the next call writes it
    return s;
}

// --------------------------------------------------------------------------------------
// LayerNorm over the last axis (layers.layernorm_forward / layernorm_backward)

// An output element: float32, or the bf16 bits of a GEMM operand (precision "bf16": the
// next matmul reads bf16 anyway, so no float32 copy is written and cast afterwards)
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(unsigned short* p, float v) { *p = f32_to_bf16_bits(v); }

// x, out (N, C); weight, bias (C,); mean, rstd (N,): saved for the backward.
// One warp per row, blockDim.x / 32 rows per block. Two passes for the statistics (mean,
// then the biased variance around it), as the reference: no E[x^2] - E[x]^2 cancellation.
template <typename OUT>
__device__ __forceinline__ void layernorm_forward(
    const float* x, const float* weight, const float* bias, OUT* out,
    float* mean, float* rstd, long long N, int C, float eps)
{
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= N) return;  // the whole warp leaves together: no shuffle is left half-done
    const float* xr = x + row * C;
    float s = 0.f;
    for (int c = lane; c < C; c += 32) s += xr[c];
    const float m = warp_sum(s) / C;
    float ss = 0.f;
    for (int c = lane; c < C; c += 32) {
        const float d = xr[c] - m;
        ss += d * d;
    }
    const float r = 1.0f / sqrtf(warp_sum(ss) / C + eps);
    OUT* outr = out + row * C;
    for (int c = lane; c < C; c += 32) store(outr + c, (xr[c] - m) * r * weight[c] + bias[c]);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

extern "C" __global__ void layernorm_forward_kernel(
    const float* x, const float* weight, const float* bias, float* out,
    float* mean, float* rstd, long long N, int C, float eps)
{
    layernorm_forward(x, weight, bias, out, mean, rstd, N, C, eps);
}

extern "C" __global__ void layernorm_forward_bf16_kernel(
    const float* x, const float* weight, const float* bias, unsigned short* out,
    float* mean, float* rstd, long long N, int C, float eps)
{
    layernorm_forward(x, weight, bias, out, mean, rstd, N, C, eps);
}

// dout, x, dx (N, C); weight (C,); mean, rstd (N,) from the forward;
// dweight_part, dbias_part (gridDim.x, C): this block's sums over its rows, summed over
// blocks afterwards (deterministic, unlike atomics into one (C,) array).
// Block b takes rows [b * rows_per_block, (b + 1) * rows_per_block), one row at a time,
// threads over channels; a thread owns channels threadIdx.x + k * blockDim.x, so its shared
// dweight/dbias accumulators need no synchronisation.
// Dynamic shared memory: (64 + 2 * C) floats.
extern "C" __global__ void layernorm_backward_kernel(
    const float* dout, const float* x, const float* weight, const float* mean,
    const float* rstd, float* dx, float* dweight_part, float* dbias_part,
    long long N, int C, long long rows_per_block)
{
    extern __shared__ float smem[];
    float* buf = smem;              // (64,) for block_sum2
    float* dw_acc = smem + 64;      // (C,)
    float* db_acc = smem + 64 + C;  // (C,)
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        dw_acc[c] = 0.f;
        db_acc[c] = 0.f;
    }
    const long long r0 = (long long)blockIdx.x * rows_per_block;
    const long long r1 = (r0 + rows_per_block < N) ? r0 + rows_per_block : N;
    for (long long row = r0; row < r1; row++) {  // r0, r1 are the same in every thread
        const float* xr = x + row * C;
        const float* dr = dout + row * C;
        const float m = mean[row], rs = rstd[row];
        // pass 1: the row sums of dnorm and dnorm * norm; this thread's dweight, dbias
        float sum_dn = 0.f, sum_dn_norm = 0.f;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            const float norm = (xr[c] - m) * rs;  // recomputed: the forward kept x, not norm
            const float d = dr[c];
            const float dn = d * weight[c];
            sum_dn += dn;
            sum_dn_norm += dn * norm;
            dw_acc[c] += d * norm;
            db_acc[c] += d;
        }
        const float2 sums = block_sum2(sum_dn, sum_dn_norm, buf);
        const float mean_dn = sums.x / C, mean_dn_norm = sums.y / C;
        // pass 2: dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
        float* dxr = dx + row * C;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            const float norm = (xr[c] - m) * rs;
            const float dn = dr[c] * weight[c];
            dxr[c] = rs * (dn - mean_dn - norm * mean_dn_norm);
        }
    }
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        dweight_part[(long long)blockIdx.x * C + c] = dw_acc[c];
        dbias_part[(long long)blockIdx.x * C + c] = db_acc[c];
    }
}

// --------------------------------------------------------------------------------------
// GELU, tanh approximation (layers.gelu_forward / gelu_backward); x, out, dout, dx (n,)
// Grid-stride loops: any n with any grid. As the reference: x * s with
// s = 0.5 * (1 + tanh u) = 1 / (1 + exp(-2u)), which keeps its relative precision where
// tanh u ~ -1 (exp(-2u) = inf below x ~ -10: then s = 0, as it should be).

#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_A 0.044715f

__device__ __forceinline__ float gelu_s(float x) {
    return 1.f / (1.f + expf(-2.f * GELU_K * (x + GELU_A * x * x * x)));
}

extern "C" __global__ void gelu_forward_kernel(const float* x, float* out, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float xi = x[i];
        out[i] = xi * gelu_s(xi);
    }
}

// The MLP's c_fc bias fused into its GELU: h (n / OC rows, OC) is read, pre = h + bias is
// written (the pre-activation that gelu_backward_kernel reads), out = gelu(h + bias), in
// float32 or as bf16 bits for c_proj's bf16 GEMM. One pass over h instead of two (the bias
// add, then the GELU), and in bf16 no float32 output to cast afterwards.
template <typename OUT>
__device__ __forceinline__ void bias_gelu_forward(const float* h, const float* bias, float* pre,
                                                  OUT* out, long long n, int OC)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float xi = h[i] + bias[i % OC];
        pre[i] = xi;
        store(out + i, xi * gelu_s(xi));
    }
}

extern "C" __global__ void bias_gelu_forward_kernel(
    const float* h, const float* bias, float* pre, float* out, long long n, int OC)
{
    bias_gelu_forward(h, bias, pre, out, n, OC);
}

extern "C" __global__ void bias_gelu_forward_bf16_kernel(
    const float* h, const float* bias, float* pre, unsigned short* out, long long n, int OC)
{
    bias_gelu_forward(h, bias, pre, out, n, OC);
}

// Only x is saved: s is recomputed (one expf) instead of keeping a second (n,) array.
extern "C" __global__ void gelu_backward_kernel(
    const float* x, const float* dout, float* dx, long long n)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float xi = x[i];
        const float s = gelu_s(xi);
        // ds/du = 2 s (1 - s) (not 2 exp(-2u) / (1 + exp(-2u))^2, which overflows)
        const float du = 2.f * GELU_K * (1.f + 3.f * GELU_A * xi * xi);
        dx[i] = dout[i] * (s + xi * s * (1.f - s) * du);
    }
}

// --------------------------------------------------------------------------------------
// cross-entropy with ignored targets (layers.cross_entropy_forward / cross_entropy_backward)

// A running max m and the sum s of exp(x - m) over the values seen (online softmax).
struct MaxSum {
    float m, s;
};

__device__ __forceinline__ MaxSum maxsum_merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == NEG_INF) return {m, a.s + b.s};  // nothing seen on either side (-inf - -inf = nan)
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// logits (N, V); targets (N,) int64; lse, losses (N,) out: the log-sum-exp of each row and
// lse - logits[row, target] (0 for an ignored row; nan for a target outside [0, V)).
// One block per row (grid-stride over rows), threads over the vocabulary, one read of the
// row. Nothing of size (N, V) is written.
extern "C" __global__ void crossentropy_forward_kernel(
    const float* logits, const long long* targets, float* lse, float* losses,
    long long N, int V, long long ignore_index)
{
    __shared__ float buf_m[32], buf_s[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    for (long long row = blockIdx.x; row < N; row += gridDim.x) {
        const long long t = targets[row];
        if (t == ignore_index) {  // the same branch in every thread of the block
            if (threadIdx.x == 0) {
                lse[row] = 0.f;
                losses[row] = 0.f;
            }
            continue;
        }
        const float* lr = logits + row * V;
        MaxSum ms = {NEG_INF, 0.f};
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            const float v = lr[j];
            if (v > ms.m) {  // a new max: rescale the sum (0 * exp(-inf) = 0 at the start)
                ms.s = ms.s * expf(ms.m - v) + 1.f;
                ms.m = v;
            } else if (v != NEG_INF) {  // exp(-inf) adds 0; skipping it avoids -inf - -inf
                ms.s += expf(v - ms.m);  // a nan logit makes s nan, as in the reference
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const MaxSum other = {__shfl_xor_sync(FULL_MASK, ms.m, o),
                                  __shfl_xor_sync(FULL_MASK, ms.s, o)};
            ms = maxsum_merge(ms, other);
        }
        if (lane == 0) {
            buf_m[warp] = ms.m;
            buf_s[warp] = ms.s;
        }
        __syncthreads();
        if (threadIdx.x == 0) {  // warps merged in a fixed order
            MaxSum total = {buf_m[0], buf_s[0]};
            for (int w = 1; w < n_warps; w++) total = maxsum_merge(total, {buf_m[w], buf_s[w]});
            const float l = total.m + logf(total.s);
            lse[row] = l;
            losses[row] = (t >= 0 && t < V) ? l - lr[t] : QUIET_NAN;
        }
        __syncthreads();  // thread 0 has read buf_* before the next row writes them
    }
}

// dlogits[r, j] = dloss * inv_n * (exp(logits[r, j] - lse[r]) - [j == target_r]);
// all zeros on an ignored row. inv_n: device pointer to 1 / (number of counted rows), so
// that no host sync is needed. One block per row (grid-stride), threads over V.
// dlogits in float32, or as the bf16 bits of the lm_head backward's GEMM operand.
// In float32, logits and dlogits may be the same buffer (each element is read, then
// written, by the same thread). In bf16 they must not overlap at all: row r's uint16
// output lands in bytes [2rV, 2(r+1)V), inside float rows r/2..(r+1)/2 of logits that other
// blocks have not read yet (cupy_kernels.cross_entropy_backward refuses such an out).
template <typename OUT>
__device__ __forceinline__ void crossentropy_backward(
    const float* logits, const long long* targets, const float* lse, const float* inv_n,
    float dloss, OUT* dlogits, long long N, int V, long long ignore_index)
{
    const float w = dloss * inv_n[0];  // each counted row's weight in the mean
    for (long long row = blockIdx.x; row < N; row += gridDim.x) {
        const long long t = targets[row];
        OUT* dr = dlogits + row * V;
        if (t == ignore_index) {
            for (int j = threadIdx.x; j < V; j += blockDim.x) store(dr + j, 0.f);
            continue;
        }
        const float* lr = logits + row * V;
        const float l = lse[row];
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            const float p = expf(lr[j] - l);  // softmax, recomputed from the saved lse
            store(dr + j, w * (j == t ? p - 1.f : p));
        }
    }
}

extern "C" __global__ void crossentropy_backward_kernel(
    const float* logits, const long long* targets, const float* lse, const float* inv_n,
    float dloss, float* dlogits, long long N, int V, long long ignore_index)
{
    crossentropy_backward(logits, targets, lse, inv_n, dloss, dlogits, N, V, ignore_index);
}

extern "C" __global__ void crossentropy_backward_bf16_kernel(
    const float* logits, const long long* targets, const float* lse, const float* inv_n,
    float dloss, unsigned short* dlogits, long long N, int V, long long ignore_index)
{
    crossentropy_backward(logits, targets, lse, inv_n, dloss, dlogits, N, V, ignore_index);
}

// --------------------------------------------------------------------------------------
// token embedding backward (layers.embedding_backward's dwte); dwpe is a plain sum

// dx (N, C) in token order; ids, pos (N,): the token ids sorted, with equal ids in
// increasing position, and each one's position in dx (the wrapper sorts); dwte (V, C):
// dwte[id] += the sum of the dx rows of that id, in increasing position. One block per run
// of equal ids (a block at a position inside a run does nothing), threads over channels:
// no two blocks write the same row, and the order of the additions is fixed.
// Ids outside [0, V) are skipped (they would write out of bounds).
extern "C" __global__ void embedding_backward_kernel(
    const float* dx, const long long* ids, const long long* pos, float* dwte,
    long long N, int C, long long V)
{
    for (long long i = blockIdx.x; i < N; i += gridDim.x) {
        const long long id = ids[i];
        if (i > 0 && ids[i - 1] == id) continue;  // not the start of a run
        if (id < 0 || id >= V) continue;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float acc = 0.f;
            for (long long j = i; j < N && ids[j] == id; j++) acc += dx[pos[j] * C + c];
            dwte[id * C + c] += acc;
        }
    }
}

// --------------------------------------------------------------------------------------
// AdamW, multi-tensor (optim.AdamW._update), in place

// ptrs (4, n_tensors): the addresses of params, grads, ms, vs; sizes (n_tensors,);
// chunk_tensor, chunk_start (n_chunks,): chunk k is elements [chunk_start[k],
// chunk_start[k] + chunk_size) of tensor chunk_tensor[k], cut at its size. One block per
// chunk (grid-stride). All tensors of a launch share one decay factor.
// The arithmetic is the reference's, op for op, each rounded to float32: the _rn
// intrinsics are never fused into FMAs, so the result is bit-identical to the unfused
// float32 sequence (CuPy compiles both with -ftz=true: denormals flush to zero alike).
extern "C" __global__ void adamw_kernel(
    const unsigned long long* ptrs, const long long* sizes, const int* chunk_tensor,
    const long long* chunk_start, int n_tensors, long long n_chunks, long long chunk_size,
    float decay, float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
    float eps, float step_size, float sqrt_bias2)
{
    for (long long k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        const int i = chunk_tensor[k];
        float* p = (float*)ptrs[i];
        const float* g = (const float*)ptrs[n_tensors + i];
        float* m = (float*)ptrs[2 * n_tensors + i];
        float* v = (float*)ptrs[3 * n_tensors + i];
        const long long start = chunk_start[k];
        const long long end = (start + chunk_size < sizes[i]) ? start + chunk_size : sizes[i];
        for (long long e = start + threadIdx.x; e < end; e += blockDim.x) {
            const float gi = g[e];
            const float pi = __fmul_rn(p[e], decay);  // decoupled weight decay (x 1.0 is exact)
            const float mi = __fadd_rn(__fmul_rn(m[e], beta1), __fmul_rn(gi, one_minus_beta1));
            const float vi = __fadd_rn(__fmul_rn(v[e], beta2),
                                       __fmul_rn(__fmul_rn(gi, gi), one_minus_beta2));
            // p -= step_size * m / (sqrt(v) / sqrt_bias2 + eps), in torch's order
            const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), sqrt_bias2), eps);
            p[e] = __fsub_rn(pi, __fmul_rn(__fdiv_rn(mi, denom), step_size));
            m[e] = mi;
            v[e] = vi;
        }
    }
}
