// Causal softmax over blocks of score rows, for backends/cupy_attention.py.
// Scores are float32, (B, NH, n, L) contiguous: n queries q0..q0+n-1 (a block of the
// sequence) against keys 0..L-1, L = q0 + n. Row r is query position i = q0 + r % n, which
// sees keys j <= i. The masked entries are written as 0, so the GEMMs that read P (P @ v,
// P^T @ dy) need no mask of their own.

#define NEG_INF (-__int_as_float(0x7f800000))  // no math headers under plain NVRTC

// sum or max of one value per thread over the block; every thread gets the result
template <bool IS_MAX>
__device__ __forceinline__ float block_reduce(float x, float* shared) {
    for (int o = 16; o > 0; o >>= 1) {
        float y = __shfl_xor_sync(0xffffffffu, x, o);
        x = IS_MAX ? fmaxf(x, y) : x + y;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n_warps = (blockDim.x + 31) >> 5;
    __syncthreads();  // shared may still be read by a previous call
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    x = lane < n_warps ? shared[lane] : (IS_MAX ? NEG_INF : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        float y = __shfl_xor_sync(0xffffffffu, x, o);
        x = IS_MAX ? fmaxf(x, y) : x + y;
    }
    return x;
}

// forward: att (rows, L) scores -> P in place; lse[r] = log sum_j<=i exp(att[r, j]).
// One block per row. The row (4 KB at L = 1024) is read three times, from L1/L2 after the first.
extern "C" __global__ void causal_softmax_forward(float* __restrict__ att,
                                                  float* __restrict__ lse,
                                                  int n, int L, int q0) {
    __shared__ float shared[32];
    const long long r = blockIdx.x;
    const int i = q0 + (int)(r % n);  // query position: keys 0..i are visible
    float* row = att + r * (long long)L;
    float m = NEG_INF;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_reduce<true>(m, shared);  // finite: the diagonal is always visible
    float s = 0.0f;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) s += expf(row[j] - m);
    s = block_reduce<false>(s, shared);
    const float inv = 1.0f / s;
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        row[j] = j <= i ? expf(row[j] - m) * inv : 0.0f;
    }
    if (threadIdx.x == 0) lse[r] = m + logf(s);
}

// backward, step 1: recompute P = exp(S - lse) in place from the scores S (0 where masked).
// size = rows * L elements, grid-stride; lse (rows,) as the forward wrote it for these rows.
extern "C" __global__ void causal_softmax_recompute(float* __restrict__ att,
                                                    const float* __restrict__ lse,
                                                    int n, int L, int q0, long long size) {
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < size;
         e += (long long)gridDim.x * blockDim.x) {
        const long long r = e / L;
        const int j = (int)(e - r * L), i = q0 + (int)(r % n);
        att[e] = j <= i ? expf(att[e] - lse[r]) : 0.0f;
    }
}

// backward, step 2: dS = P * (dP - D[r]) in place over dP, with D[r] = dy[r] . y[r]
// (= sum_j P[r, j] dP[r, j]). Masked entries have P = 0, hence dS = 0.
extern "C" __global__ void causal_softmax_backward(float* __restrict__ datt,
                                                   const float* __restrict__ att,
                                                   const float* __restrict__ D,
                                                   int L, long long size) {
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < size;
         e += (long long)gridDim.x * blockDim.x) {
        const long long r = e / L;
        datt[e] = att[e] * (datt[e] - D[r]);
    }
}
