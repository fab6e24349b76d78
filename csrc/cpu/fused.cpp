// Which instruction set's fused kernels run (fused.h), chosen once per
// process from the processor and LSTM_FUSED_CPU_ISA / LSTM_FUSED_CPU_GENERIC.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "fused.h"

// The instruction-set translation units hold kernels only on x86-64.
#if defined(__x86_64__) && defined(__GNUC__)
#define LF_X86 1
#else
#define LF_X86 0
#endif

namespace lstm_fused::cpu {
namespace {

enum class Isa { generic, avx2, avx512 };

bool env_set(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

Isa detect() {
#if LF_X86
  if (env_set("LSTM_FUSED_CPU_GENERIC")) return Isa::generic;
  const char* want = std::getenv("LSTM_FUSED_CPU_ISA");
  const bool any = want == nullptr || want[0] == '\0';
  const auto allowed = [&](const char* name) { return any || std::strcmp(want, name) == 0; };
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  if (avx512 && allowed("avx512")) return Isa::avx512;
  if (avx2 && (allowed("avx2") || allowed("avx512"))) return Isa::avx2;
#endif
  return Isa::generic;
}

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

template <typename T>
const FusedKernels<T>& kernels() {
#if LF_X86
  static const FusedKernels<T> k = isa() == Isa::avx512 ? avx512::kernels<T>()
                                   : isa() == Isa::avx2 ? avx2::kernels<T>()
                                                        : FusedKernels<T>{};
#else
  static const FusedKernels<T> k{};
#endif
  return k;
}

}  // namespace

const char* fused_isa() {
  switch (isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

template <>
bool fused_available<float>() {
  return isa() != Isa::generic;
}

template <>
bool fused_available<double>() {
#if LF_X86
  static const bool ok = isa() == Isa::avx512 ? avx512::double_math()
                         : isa() == Isa::avx2 ? avx2::double_math()
                                              : false;
  return ok;
#else
  return false;
#endif
}

template <typename T>
FusedSizes fused_sizes(const LayerDims& d, bool proj, bool save, int threads) {
  return kernels<T>().sizes(d, proj, save, threads);
}

template <typename T>
void fused_forward(const LayerDims& d, const int64_t* off, const ForwardArgs<T>& a, T* work,
                   int threads) {
  kernels<T>().forward(d, off, a, work, threads);
}

template <typename T>
void fused_backward(const LayerDims& d, const int64_t* off, const BackwardArgs<T>& a,
                    T* dh_all, T* work, int threads) {
  kernels<T>().backward(d, off, a, dh_all, work, threads);
}

template <typename T>
void fused_hidden(const T* gates, const T* cells, int64_t N, int64_t H, T* out) {
  kernels<T>().hidden(gates, cells, N, H, out);
}

int fused_threads(const LayerDims& d, int max) {
  // A step's multiply-adds; below ~64k a barrier costs more than a second
  // thread saves. At most one thread per 16 hidden units.
  const int64_t work = d.batch * 4 * d.hidden * (d.proj + d.input);
  const int64_t chunks = (d.hidden + 15) / 16;
  const int64_t n = work < 65536 ? 1 : std::min<int64_t>(max, chunks);
  return int(std::max<int64_t>(1, n));
}

template FusedSizes fused_sizes<float>(const LayerDims&, bool, bool, int);
template FusedSizes fused_sizes<double>(const LayerDims&, bool, bool, int);
template void fused_hidden<float>(const float*, const float*, int64_t, int64_t, float*);
template void fused_hidden<double>(const double*, const double*, int64_t, int64_t, double*);
template void fused_forward<float>(const LayerDims&, const int64_t*, const ForwardArgs<float>&,
                                   float*, int);
template void fused_forward<double>(const LayerDims&, const int64_t*,
                                    const ForwardArgs<double>&, double*, int);
template void fused_backward<float>(const LayerDims&, const int64_t*,
                                    const BackwardArgs<float>&, float*, float*, int);
template void fused_backward<double>(const LayerDims&, const int64_t*,
                                     const BackwardArgs<double>&, double*, double*, int);

}  // namespace lstm_fused::cpu
