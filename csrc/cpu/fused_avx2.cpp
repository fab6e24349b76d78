// The fused kernels (fused_engine.h) for AVX2 + FMA: 6x16 float (6x8 double)
// register tiles, 16 (8) hidden units per chunk.
#include "fused.h"

#if defined(__x86_64__) && defined(__GNUC__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif
#include <omp.h>

#include <cstring>

#include "../lstm_cell.h"
#include "simd_avx2.h"

namespace lstm_fused::cpu::avx2 {
namespace simd = ::lstm_fused::cpu::avx2;
#include "fused_engine.h"
}  // namespace lstm_fused::cpu::avx2

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // elsewhere fused.cpp never calls in (fused_isa() is "generic")
