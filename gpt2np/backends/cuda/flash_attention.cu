// Causal flash attention for precision "bf16": FlashAttention-2's algorithm on the tensor
// cores (mma.sync m16n8k16, bf16 operands, float32 accumulation; sm_80 and later), for
// backends/cupy_attention.py. No (T, T) array is ever written: scores live in registers.
//
// Layout. One pass (flash_pack) turns the fused c_attn output qkv (B, T, 3C) float32 into
// bf16 heads, q * scale, k and v, each (B, NH, T, D) contiguous: every later read of a tile
// is 16-byte vectors of a head's rows, already rounded (k and v tiles are read by every
// later query tile: ~T/128 times each). The backward packs dy the same way and keeps the
// bf16 q, k, v (half the bytes of qkv). The kernels write y (B, T, C), the layer's merged-
// heads output, and dqkv (B, T, 3C) in the layers' layouts: no head split/merge copies.
//
// Tiles: a block is 4 warps; it owns 64 queries (forward, dq) or 64 keys (dk, dv), each warp
// 16 of them, and walks the other side in tiles of 64. Causal: query tile i needs key tiles
// 0..i only; only the diagonal tile is masked.
//
// Numerics, as the reference in bf16 (gpt2np.layers.attention_forward under
// matmul_precision("bf16")): the GEMM operands q*scale, k, v, dy, P and dS are rounded to
// bf16 (to nearest, ties to even), everything else (scores, the online softmax, lse, D,
// accumulators, outputs) is float32. What differs: P is rounded before it is normalised
// (FlashAttention's running max and sum), so results match the reference to bf16 tolerance,
// not bit for bit.
//
// Fragments of mma.m16n8k16 (PTX ISA), g = lane / 4, t = lane % 4, two bf16 per 32-bit
// register, the lower column (or row, for b) in the low half:
//   a (16x16, row major): a0 = A[g][2t..2t+1]   a1 = A[g+8][2t..]   a2 = A[g][2t+8..]
//                         a3 = A[g+8][2t+8..]
//   b (16x8, col major):  b0 = B[2t..2t+1][g]   b1 = B[2t+8..2t+9][g]
//   c (16x8, float32):    c0, c1 = C[g][2t], C[g][2t+1]   c2, c3 = C[g+8][2t], C[g+8][2t+1]
// Two neighbouring c tiles (columns 0-7, 8-15) hold exactly an a fragment's elements, so a
// warp's probabilities P feed the next product straight from its registers.

#include "bf16.cuh"

#define NEG_INF (-__int_as_float(0x7f800000))  // no math headers under plain NVRTC
#define TILE 64                                 // queries or keys per tile
#define FLASH_THREADS 128                       // 4 warps x 16 rows

#ifdef GPT2NP_CUDA_SIM  // tests/cuda_sim emulates the instructions
#define mma_bf16_16816 sim::mma_bf16_m16n8k16
#define ldmatrix_x4 sim::ldmatrix_x4
#define ldmatrix_x4_trans sim::ldmatrix_x4_trans
#else
// d (16x8) += a (16x16) . b (16x8), one warp
__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ldmatrix .x4: four 8x8 b16 matrices from shared memory, one warp. Lane l gives the
// address of row l % 8 of matrix l / 8 (16 bytes, 16-byte aligned). Matrix i lands in r[i]:
// lane l holds row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (the c/a fragment layout);
// with .trans, column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1 (the b layout of a row-major B).
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* row) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* row) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}
#endif

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)f32_to_bf16_bits(lo) | ((unsigned)f32_to_bf16_bits(hi) << 16);
}

// ---------------------------------------------------------------- shared-memory tiles
// A tile is TILE rows x D bf16, stored as 32-bit words with a row stride of D + 8 halves
// (the padding puts the 8 rows a fragment load touches in different banks).

template <int D>
struct Tile {
    static constexpr int LDW = (D + 8) / 2;  // words per row: a multiple of 4 (16 bytes)
    static constexpr int WORDS = TILE * LDW;
};

// tile <- rows r0..r0+TILE-1 of one head's (T, D) bf16 rows, 16 bytes at a time; rows at
// or beyond T are zeros (keys past the end then score 0 and carry v = 0, never NaN garbage)
template <int D>
__device__ __forceinline__ void load_tile(unsigned* tile, const unsigned short* __restrict__ src,
                                          int r0, int T) {
    constexpr int V = D / 8;  // 16-byte vectors per row
    for (int e = threadIdx.x; e < TILE * V; e += blockDim.x) {
        const int r = e / V, c = e - r * V;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (r0 + r < T) x = reinterpret_cast<const uint4*>(src + (long long)(r0 + r) * D)[c];
        *reinterpret_cast<uint4*>(tile + r * Tile<D>::LDW + 4 * c) = x;  // LDW % 4 == 0
    }
}

// Fragments from a tile, one ldmatrix.x4 each (the padded rows put the 8 rows of a matrix
// in 8 different 16-byte bank groups: no conflicts). half(tile, r, c): the address of
// element (r, c).
template <int D>
__device__ __forceinline__ const unsigned short* half(const unsigned* tile, int r, int c) {
    return reinterpret_cast<const unsigned short*>(tile + r * Tile<D>::LDW) + c;
}

// a fragment of rows r0..r0+15, columns k0..k0+15 of a tile (A = tile): matrices
// (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8) = a0..a3
template <int D>
__device__ __forceinline__ void frag_a(unsigned* a, const unsigned* tile, int r0, int k0) {
    const int l = threadIdx.x & 31;
    ldmatrix_x4(a, half<D>(tile, r0 + (l & 15), k0 + (l >> 4) * 8));
}

// b fragments of column tiles n0 and n0 + 8 with B[k][n] = tile[n + ...][k0 + k] (B = tile^T:
// k^T in q k^T): matrices (rows n0, cols k0), (n0, k0+8), (n0+8, k0), (n0+8, k0+8) =
// b0, b1 of tile n0, then b0, b1 of tile n0 + 8
template <int D>
__device__ __forceinline__ void frag_b_t2(unsigned (*b)[2], const unsigned* tile, int n0, int k0) {
    const int l = threadIdx.x & 31, m = l >> 3;
    unsigned r[4];
    ldmatrix_x4(r, half<D>(tile, n0 + (l & 7) + (m >> 1) * 8, k0 + (m & 1) * 8));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// b fragments of column tiles n0 and n0 + 8 with B[k][n] = tile[k0 + k][n + ...] (B = tile:
// v in P v), transposed by ldmatrix: matrices (rows k0, cols n0), (k0+8, n0), (k0, n0+8),
// (k0+8, n0+8)
template <int D>
__device__ __forceinline__ void frag_b2(unsigned (*b)[2], const unsigned* tile, int k0, int n0) {
    const int l = threadIdx.x & 31, m = l >> 3;
    unsigned r[4];
    ldmatrix_x4_trans(r, half<D>(tile, k0 + (l & 7) + (m & 1) * 8, n0 + (m >> 1) * 8));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// c tiles 2kk and 2kk+1 (16 x 16 float32) -> the a fragment of k columns 16kk..16kk+15, bf16
__device__ __forceinline__ void c_to_a(unsigned* a, const float (*c)[4], int kk) {
    a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// s (16 x TILE) = a (16 x D, fragments) . tile^T; only the column tiles nt0 <= nt < nt1
// are computed (the others are 0; both even): on the diagonal the rest are masked
template <int D>
__device__ __forceinline__ void scores(float (*s)[4], const unsigned (*a)[4], const unsigned* tile,
                                       int nt0 = 0, int nt1 = TILE / 8) {
    for (int nt = 0; nt < TILE / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
    for (int nt = 0; nt < TILE / 8; nt += 2) {  // constant bounds: s stays in registers
        if (nt < nt0 || nt >= nt1) continue;  // warp-uniform: the mma stays converged
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned b[2][2];
            frag_b_t2<D>(b, tile, nt * 8, kk * 16);
            mma_bf16_16816(s[nt], a[kk], b[0]);
            mma_bf16_16816(s[nt + 1], a[kk], b[1]);
        }
    }
}

// acc (16 x D) += bf16(p) (16 x TILE, c fragments) . tile, over the 16-column chunks
// kk0 <= kk < kk1 of p (the others are 0)
template <int D>
__device__ __forceinline__ void accumulate(float (*acc)[4], const float (*p)[4], const unsigned* tile,
                                           int kk0 = 0, int kk1 = TILE / 16) {
    for (int kk = 0; kk < TILE / 16; ++kk) {  // constant bounds: p stays in registers
        if (kk < kk0 || kk >= kk1) continue;
        unsigned a[4];
        c_to_a(a, p, kk);
        for (int dt = 0; dt < D / 8; dt += 2) {
            unsigned b[2][2];
            frag_b2<D>(b, tile, kk * 16, dt * 8);
            mma_bf16_16816(acc[dt], a, b[0]);
            mma_bf16_16816(acc[dt + 1], a, b[1]);
        }
    }
}

// rows r and r + 8 of a warp's (16 x D) c fragments -> out[row * rs + col] * mul, rows < T
template <int D>
__device__ __forceinline__ void store_rows(float* __restrict__ out, long long rs, const float (*acc)[4],
                                           int r, int T, float mul) {
    const int t = threadIdx.x & 3;
    for (int half = 0; half < 2; ++half) {
        const int row = r + 8 * half;
        if (row >= T) continue;
        float2* o = reinterpret_cast<float2*>(out + (long long)row * rs);
        for (int dt = 0; dt < D / 8; ++dt) {
            o[dt * 4 + t] = make_float2(acc[dt][2 * half] * mul, acc[dt][2 * half + 1] * mul);
        }
    }
}

// On a diagonal tile (query tile = key tile), warp w's 16 rows see only part of it:
// queries as rows (forward, dq) see key columns < 16(w+1), that is column tiles of 8
// nt < 2w+2 and 16-wide chunks kk < w+1; keys as rows (dk, dv) are seen by query columns
// >= 16w: nt >= 2w, kk >= w. Everything outside is masked: skipping it changes nothing.
__device__ __forceinline__ int diag_end(int warp) { return 2 * warp + 2; }  // queries as rows
__device__ __forceinline__ int diag_begin(int warp) { return 2 * warp; }    // keys as rows

// ------------------------------------------------------------------------------ packing
// x (B, T, slots * C) float32, plus bias (slots * C,) if has_bias -> out (slots, B, NH, T, D)
// bf16, slot 0 times scale0: for qkv, (qkv + c_attn's bias) with q * scale, as the
// reference computes them; dy: one slot, scale 1. One thread per pair of elements,
// grid-stride; n_pairs = slots * B * T * C / 2. Neighbouring threads read neighbouring
// floats of a row.
extern "C" __global__ void flash_pack(const float* __restrict__ x, const float* __restrict__ bias,
                                      unsigned* __restrict__ out, int has_bias, int T, int NH,
                                      int D, int slots, float scale0, long long n_pairs) {
    const long long per_slot = n_pairs / slots;  // B * NH * T * D / 2
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n_pairs;
         e += (long long)gridDim.x * blockDim.x) {
        const int s = (int)(e / per_slot);
        long long i = 2 * (e - s * per_slot);  // element index in (B, NH, T, D)
        const int d = (int)(i % D);
        i /= D;
        const int t = (int)(i % T);
        i /= T;
        const int h = (int)(i % NH);
        const long long b = i / NH;
        const int col = s * NH * D + h * D + d;  // in the (slots * C) row
        float2 v = *reinterpret_cast<const float2*>(x + (b * T + t) * (long long)(slots * NH * D) + col);
        if (has_bias) {
            const float2 c = *reinterpret_cast<const float2*>(bias + col);
            v.x += c.x;
            v.y += c.y;
        }
        const float mul = s == 0 ? scale0 : 1.0f;
        out[e] = pack_bf16(v.x * mul, v.y * mul);
    }
}

// ---------------------------------------------------------------------------- forward
// grid (ceil(T / TILE), B * NH), FLASH_THREADS threads. qkv16: flash_pack's (3, B, NH, T, D)
// bf16 q * scale, k, v. y (B, T, C); lse (B, NH, T) is the log-sum-exp of each score row,
// all the backward needs to recompute P.
template <int D>
__device__ __forceinline__ void flash_forward(const unsigned short* __restrict__ qkv16, float* __restrict__ y,
                                              float* __restrict__ lse, int T, int NH) {
    __shared__ __align__(16) unsigned ks[Tile<D>::WORDS];
    __shared__ __align__(16) unsigned vs[Tile<D>::WORDS];
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const int qt = gridDim.x - 1 - blockIdx.x;  // the longest tiles (the most keys) first
    const int b = blockIdx.y / NH, h = blockIdx.y - b * NH, C = NH * D;
    const long long slot = (long long)gridDim.y * T * D;  // q, k, v of all heads
    const unsigned short* q = qkv16 + (long long)blockIdx.y * T * D;  // this head's (T, D)
    const int r = qt * TILE + warp * 16 + g;  // this lane's rows: r and r + 8

    load_tile<D>(ks, q, qt * TILE, T);
    __syncthreads();
    unsigned qa[D / 16][4];
    for (int kk = 0; kk < D / 16; ++kk) frag_a<D>(qa[kk], ks, warp * 16, kk * 16);

    float o[D / 8][4] = {};
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};  // running max, this lane's sum
    for (int kt = 0; kt <= qt; ++kt) {
        __syncthreads();  // every warp is done with the previous tiles
        load_tile<D>(ks, q + slot, kt * TILE, T);
        load_tile<D>(vs, q + 2 * slot, kt * TILE, T);
        __syncthreads();
        const bool diag = kt == qt;
        const int nt1 = diag ? diag_end(warp) : TILE / 8;
        float s[TILE / 8][4];
        scores<D>(s, qa, ks, 0, nt1);
        if (diag) {  // mask the future (and the column tiles not computed)
            for (int nt = 0; nt < TILE / 8; ++nt)
                for (int e = 0; e < 4; ++e)
                    if (kt * TILE + nt * 8 + 2 * t + (e & 1) > r + 8 * (e >> 1)) s[nt][e] = NEG_INF;
        }
        // online softmax. The max is finite: key 0 (tile 0) is visible to every row
        for (int half = 0; half < 2; ++half) {
            float mx = m[half];
            for (int nt = 0; nt < TILE / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a row
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float alpha = __expf(m[half] - mx);  // rescales what was summed so far
            float sum = 0.0f;
            for (int nt = 0; nt < TILE / 8; ++nt)
                for (int e = 2 * half; e < 2 * half + 2; ++e) {
                    s[nt][e] = __expf(s[nt][e] - mx);
                    sum += s[nt][e];
                }
            l[half] = l[half] * alpha + sum;
            m[half] = mx;
            for (int dt = 0; dt < D / 8; ++dt) {
                o[dt][2 * half] *= alpha;
                o[dt][2 * half + 1] *= alpha;
            }
        }
        accumulate<D>(o, s, vs, 0, nt1 / 2);  // o += P v
    }
    for (int half = 0; half < 2; ++half) {  // the row sums over the 4 lanes of each row
        l[half] += __shfl_xor_sync(0xffffffffu, l[half], 1);
        l[half] += __shfl_xor_sync(0xffffffffu, l[half], 2);
    }
    for (int half = 0; half < 2; ++half) {
        const float inv = 1.0f / l[half];
        for (int dt = 0; dt < D / 8; ++dt) {
            o[dt][2 * half] *= inv;
            o[dt][2 * half + 1] *= inv;
        }
        if (t == 0 && r + 8 * half < T) lse[(long long)blockIdx.y * T + r + 8 * half] = m[half] + logf(l[half]);
    }
    store_rows<D>(y + (long long)b * T * C + h * D, C, o, r, T, 1.0f);
}

// --------------------------------------------------------------------------- backward
// 1. Dv[b, h, i] = dy[b, i, head h] . y[b, i, head h] (= sum_j P[i, j] dP[i, j]).
//    One thread per (b, i, h), grid-stride.
extern "C" __global__ void flash_backward_dot(const float* __restrict__ dy,
                                              const float* __restrict__ y,
                                              float* __restrict__ Dv, int T, int NH, int D,
                                              long long rows) {
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < rows;
         e += (long long)gridDim.x * blockDim.x) {
        const long long bt = e / NH;  // e = (b * T + i) * NH + h: neighbouring threads, neighbouring heads
        const int h = (int)(e - bt * NH);
        const float* a = dy + e * D;
        const float* c = y + e * D;
        float acc = 0.0f;
        for (int d = 0; d < D; ++d) acc += a[d] * c[d];
        const long long b = bt / T;
        Dv[(b * NH + h) * T + (bt - b * T)] = acc;
    }
}

// 2. dq: grid (ceil(T / TILE), B * NH). Per query tile, over key tiles 0..qt:
//    S = qs k^T, P = exp(S - lse), dP = dy v^T, dS = P (dP - Dv), dq += dS k; dq *= scale.
template <int D>
__device__ __forceinline__ void flash_backward_dq(const unsigned short* __restrict__ qkv16,
                                                  const unsigned short* __restrict__ dy16,
                                                  const float* __restrict__ lse, const float* __restrict__ Dv,
                                                  float* __restrict__ dqkv, int T, int NH, float scale) {
    __shared__ __align__(16) unsigned ks[Tile<D>::WORDS];
    __shared__ __align__(16) unsigned vs[Tile<D>::WORDS];
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int b = blockIdx.y / NH, h = blockIdx.y - b * NH, C = NH * D;
    const long long rs = 3LL * C, slot = (long long)gridDim.y * T * D;
    const unsigned short* q = qkv16 + (long long)blockIdx.y * T * D;
    const int r = qt * TILE + warp * 16 + g;

    load_tile<D>(ks, q, qt * TILE, T);
    load_tile<D>(vs, dy16 + (long long)blockIdx.y * T * D, qt * TILE, T);
    __syncthreads();
    unsigned qa[D / 16][4], da[D / 16][4];
    for (int kk = 0; kk < D / 16; ++kk) {
        frag_a<D>(qa[kk], ks, warp * 16, kk * 16);
        frag_a<D>(da[kk], vs, warp * 16, kk * 16);
    }
    float lr[2], dr[2];
    for (int half = 0; half < 2; ++half) {
        const int row = r + 8 * half;
        lr[half] = row < T ? lse[(long long)blockIdx.y * T + row] : 0.0f;
        dr[half] = row < T ? Dv[(long long)blockIdx.y * T + row] : 0.0f;
    }
    float dq[D / 8][4] = {};
    for (int kt = 0; kt <= qt; ++kt) {
        __syncthreads();
        load_tile<D>(ks, q + slot, kt * TILE, T);
        load_tile<D>(vs, q + 2 * slot, kt * TILE, T);
        __syncthreads();
        const int nt1 = kt == qt ? diag_end(warp) : TILE / 8;
        float s[TILE / 8][4], dp[TILE / 8][4];
        scores<D>(s, qa, ks, 0, nt1);   // S
        scores<D>(dp, da, vs, 0, nt1);  // dP = dy v^T
        for (int nt = 0; nt < TILE / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                const int row = r + 8 * (e >> 1), key = kt * TILE + nt * 8 + 2 * t + (e & 1);
                const float p = (key <= row && row < T) ? __expf(s[nt][e] - lr[e >> 1]) : 0.0f;
                s[nt][e] = p * (dp[nt][e] - dr[e >> 1]);  // dS
            }
        accumulate<D>(dq, s, ks, 0, nt1 / 2);  // dq += dS k
    }
    store_rows<D>(dqkv + (long long)b * T * rs + h * D, rs, dq, r, T, scale);  // S = (q*scale) k^T
}

// 3. dk, dv: grid (ceil(T / TILE), B * NH). Per key tile, over query tiles kt..: with the
//    keys as rows, S^T = k qs^T, P^T = exp(S^T - lse), dv += P^T dy, dP^T = v dy^T,
//    dS^T = P^T (dP^T - Dv), dk += dS^T qs. Every key is written once: no atomics, deterministic.
template <int D>
__device__ __forceinline__ void flash_backward_dkdv(const unsigned short* __restrict__ qkv16,
                                                    const unsigned short* __restrict__ dy16,
                                                    const float* __restrict__ lse, const float* __restrict__ Dv,
                                                    float* __restrict__ dqkv, int T, int NH, float scale) {
    __shared__ __align__(16) unsigned qs[Tile<D>::WORDS];  // q * scale and dy tiles
    __shared__ __align__(16) unsigned ds[Tile<D>::WORDS];
    __shared__ float ls[TILE], dvs[TILE];                   // their lse and Dv
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const int kt = blockIdx.x;  // the first key tiles see the most queries: launched first
    const int b = blockIdx.y / NH, h = blockIdx.y - b * NH, C = NH * D;
    const long long rs = 3LL * C, slot = (long long)gridDim.y * T * D;
    const unsigned short* q = qkv16 + (long long)blockIdx.y * T * D;
    const unsigned short* dyh = dy16 + (long long)blockIdx.y * T * D;
    const int key = kt * TILE + warp * 16 + g;  // this lane's keys: key and key + 8

    load_tile<D>(qs, q + slot, kt * TILE, T);
    load_tile<D>(ds, q + 2 * slot, kt * TILE, T);
    __syncthreads();
    unsigned ka[D / 16][4], va[D / 16][4];
    for (int kk = 0; kk < D / 16; ++kk) {
        frag_a<D>(ka[kk], qs, warp * 16, kk * 16);
        frag_a<D>(va[kk], ds, warp * 16, kk * 16);
    }
    float dk[D / 8][4] = {}, dv[D / 8][4] = {};
    for (int qt = kt; qt < (int)gridDim.x; ++qt) {
        __syncthreads();
        load_tile<D>(qs, q, qt * TILE, T);
        load_tile<D>(ds, dyh, qt * TILE, T);
        for (int i = threadIdx.x; i < TILE; i += blockDim.x) {
            const int row = qt * TILE + i;
            ls[i] = row < T ? lse[(long long)blockIdx.y * T + row] : 0.0f;
            dvs[i] = row < T ? Dv[(long long)blockIdx.y * T + row] : 0.0f;
        }
        __syncthreads();
        const int nt0 = qt == kt ? diag_begin(warp) : 0;
        float p[TILE / 8][4], dp[TILE / 8][4];
        scores<D>(p, ka, qs, nt0);   // S^T
        scores<D>(dp, va, ds, nt0);  // dP^T = v dy^T
        for (int nt = 0; nt < TILE / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                const int i = nt * 8 + 2 * t + (e & 1), row = qt * TILE + i;
                const int k_ = key + 8 * (e >> 1);
                p[nt][e] = (k_ <= row && row < T) ? __expf(p[nt][e] - ls[i]) : 0.0f;  // P^T
                dp[nt][e] = p[nt][e] * (dp[nt][e] - dvs[i]);                          // dS^T
            }
        accumulate<D>(dv, p, ds, nt0 / 2);   // dv += P^T dy
        accumulate<D>(dk, dp, qs, nt0 / 2);  // dk += dS^T qs
    }
    float* out = dqkv + (long long)b * T * rs + h * D;
    store_rows<D>(out + C, rs, dk, key, T, 1.0f);
    store_rows<D>(out + 2 * C, rs, dv, key, T, 1.0f);
}

// ------------------------------------------------------------------ the entry points
// One set per head size D (a compile-time constant: the fragments are register arrays).

extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_forward_d16(const unsigned short* __restrict__ qkv16, float* __restrict__ y, float* __restrict__ lse, int T, int NH) { flash_forward<16>(qkv16, y, lse, T, NH); }
extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_forward_d32(const unsigned short* __restrict__ qkv16, float* __restrict__ y, float* __restrict__ lse, int T, int NH) { flash_forward<32>(qkv16, y, lse, T, NH); }
extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_forward_d64(const unsigned short* __restrict__ qkv16, float* __restrict__ y, float* __restrict__ lse, int T, int NH) { flash_forward<64>(qkv16, y, lse, T, NH); }
extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_forward_d128(const unsigned short* __restrict__ qkv16, float* __restrict__ y, float* __restrict__ lse, int T, int NH) { flash_forward<128>(qkv16, y, lse, T, NH); }

extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_backward_dq_d16(const unsigned short* __restrict__ qkv16, const unsigned short* __restrict__ dy16, const float* __restrict__ lse, const float* __restrict__ Dv, float* __restrict__ dqkv, int T, int NH, float scale) { flash_backward_dq<16>(qkv16, dy16, lse, Dv, dqkv, T, NH, scale); }
extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_backward_dq_d32(const unsigned short* __restrict__ qkv16, const unsigned short* __restrict__ dy16, const float* __restrict__ lse, const float* __restrict__ Dv, float* __restrict__ dqkv, int T, int NH, float scale) { flash_backward_dq<32>(qkv16, dy16, lse, Dv, dqkv, T, NH, scale); }
extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_backward_dq_d64(const unsigned short* __restrict__ qkv16, const unsigned short* __restrict__ dy16, const float* __restrict__ lse, const float* __restrict__ Dv, float* __restrict__ dqkv, int T, int NH, float scale) { flash_backward_dq<64>(qkv16, dy16, lse, Dv, dqkv, T, NH, scale); }
extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_backward_dq_d128(const unsigned short* __restrict__ qkv16, const unsigned short* __restrict__ dy16, const float* __restrict__ lse, const float* __restrict__ Dv, float* __restrict__ dqkv, int T, int NH, float scale) { flash_backward_dq<128>(qkv16, dy16, lse, Dv, dqkv, T, NH, scale); }

extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_backward_dkdv_d16(const unsigned short* __restrict__ qkv16, const unsigned short* __restrict__ dy16, const float* __restrict__ lse, const float* __restrict__ Dv, float* __restrict__ dqkv, int T, int NH, float scale) { flash_backward_dkdv<16>(qkv16, dy16, lse, Dv, dqkv, T, NH, scale); }
extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_backward_dkdv_d32(const unsigned short* __restrict__ qkv16, const unsigned short* __restrict__ dy16, const float* __restrict__ lse, const float* __restrict__ Dv, float* __restrict__ dqkv, int T, int NH, float scale) { flash_backward_dkdv<32>(qkv16, dy16, lse, Dv, dqkv, T, NH, scale); }
extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_backward_dkdv_d64(const unsigned short* __restrict__ qkv16, const unsigned short* __restrict__ dy16, const float* __restrict__ lse, const float* __restrict__ Dv, float* __restrict__ dqkv, int T, int NH, float scale) { flash_backward_dkdv<64>(qkv16, dy16, lse, Dv, dqkv, T, NH, scale); }
extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_backward_dkdv_d128(const unsigned short* __restrict__ qkv16, const unsigned short* __restrict__ dy16, const float* __restrict__ lse, const float* __restrict__ Dv, float* __restrict__ dqkv, int T, int NH, float scale) { flash_backward_dkdv<128>(qkv16, dy16, lse, Dv, dqkv, T, NH, scale); }

// One warp: d (16x16) = a (16x16) . b (16x16), all row-major float32 (rounded to bf16 on
// the way in), once through each b loader: d_t with b staged transposed (frag_b_t2, as k in
// q k^T), d_n with b staged as it is (frag_b2, as v in P v). Checks the hardware's fragment
// layouts and ldmatrix against the ones written above (tests/test_cupy_kernels.py).
extern "C" __global__ void flash_mma_check(const float* __restrict__ a, const float* __restrict__ b,
                                           float* __restrict__ d_t, float* __restrict__ d_n) {
    constexpr int LDW = Tile<16>::LDW;
    __shared__ __align__(16) unsigned at[16 * LDW];
    __shared__ __align__(16) unsigned bt[16 * LDW];
    __shared__ __align__(16) unsigned bn[16 * LDW];
    for (int e = threadIdx.x; e < 16 * 8; e += blockDim.x) {
        const int r = e / 8, c = e % 8;  // word c of row r: columns 2c, 2c + 1
        at[r * LDW + c] = pack_bf16(a[r * 16 + 2 * c], a[r * 16 + 2 * c + 1]);
        bt[r * LDW + c] = pack_bf16(b[2 * c * 16 + r], b[(2 * c + 1) * 16 + r]);  // b^T
        bn[r * LDW + c] = pack_bf16(b[r * 16 + 2 * c], b[r * 16 + 2 * c + 1]);
    }
    __syncwarp();
    unsigned fa[4], fb[2][2];
    frag_a<16>(fa, at, 0, 0);
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    for (int which = 0; which < 2; ++which) {
        if (which == 0) frag_b_t2<16>(fb, bt, 0, 0);
        else frag_b2<16>(fb, bn, 0, 0);
        float* d = which == 0 ? d_t : d_n;
        for (int nt = 0; nt < 2; ++nt) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            mma_bf16_16816(acc, fa, fb[nt]);
            const int c = nt * 8 + 2 * t;
            d[g * 16 + c] = acc[0];
            d[g * 16 + c + 1] = acc[1];
            d[(g + 8) * 16 + c] = acc[2];
            d[(g + 8) * 16 + c + 1] = acc[3];
        }
    }
}
