// The fused kernels (fused_engine.h) for AVX-512 (F, DQ, BW, VL): 6x32 float (6x16
// double) register tiles, 32 (16) hidden units per chunk.
#include "fused.h"

#if defined(__x86_64__) && defined(__GNUC__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#endif
#include <omp.h>

#include <cstring>

#include "../lstm_cell.h"
#include "simd_avx512.h"

namespace lstm_fused::cpu::avx512 {
namespace simd = ::lstm_fused::cpu::avx512;
#include "fused_engine.h"
}  // namespace lstm_fused::cpu::avx512

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // elsewhere fused.cpp never calls in (fused_isa() is "generic")
