// float32 -> bfloat16 for cuBLAS (CUDA_R_16BF): bf16 values are held as their 16 bits in
// unsigned shorts (bf16.cuh).
#include "bf16.cuh"

// y[i] = bf16(x[i]) over n contiguous elements, grid-stride loop
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x,
                                       unsigned short* __restrict__ y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = f32_to_bf16_bits(x[i]);
    }
}
