// bfloat16 as its 16 bits in an unsigned short, without cuda_bf16.h (plain NVRTC has no
// headers): all cuBLAS (CUDA_R_16BF) and the tensor-core instructions need.
// Pasted into each .cu that includes it by backends.cupy_kernels.read_source (so CuPy's
// compile cache, keyed by the source text, sees a change here).

// float32 -> bf16 bits, to nearest with ties to even (as __float2bfloat16_rn and torch's
// .to(torch.bfloat16)); a NaN stays a (quiet) NaN. The CPU emulation in
// backends/numpy_backend.py (round_mantissa) does the same bit arithmetic.
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {      // NaN
        return (unsigned short)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);            // half an ulp, ties to the even neighbour
    return (unsigned short)(u >> 16);
}
