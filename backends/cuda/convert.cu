// float32 -> bfloat16, round to nearest with ties to even (as __float2bfloat16_rn and
// torch's .to(torch.bfloat16)), without cuda_bf16.h: bf16 values are held as their 16 bits
// in unsigned shorts, which is all cuBLAS needs (CUDA_R_16BF). The CPU emulation in
// backends/numpy_backend.py (round_mantissa) does the same bit arithmetic.

__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {      // NaN: keep it a (quiet) NaN
        return (unsigned short)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);            // half an ulp, ties to the even neighbour
    return (unsigned short)(u >> 16);
}

// y[i] = bf16(x[i]) over n contiguous elements, grid-stride loop
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x,
                                       unsigned short* __restrict__ y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = f32_to_bf16_bits(x[i]);
    }
}
