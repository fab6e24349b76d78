// CUDA implementations of the ops: check, allocate once, run the layer.
//
// Forward: the input projection of all steps is one GEMM (cuBLAS through
// ATen); then either the persistent kernel (persistent.cu: every step in one
// cooperative launch) or, per step, one fused kernel (lstm_cuda.cu: h_{t-1}
// W_hh^T and the cell) plus, with projection, one GEMM h = h' W_hr^T.
// Backward walks the steps in reverse: the persistent kernel, or per step one
// fused kernel (dh' = dh W_hr, cell_backward) and one GEMM dh_{t-1} += dG_t
// W_hh; dx, dW_ih, dW_hh, db, dW_hr are GEMMs over all steps after it, as on
// the CPU (csrc/cpu/lstm_cpu.cpp). choose_engine picks the kernels.
// Half types store in their dtype and compute in float: the input
// projection, the cell state, the gate gradients and the running gradients of
// h and c are float workspaces, so the backward recurrence runs in float.
// Nothing is allocated and nothing waits for the GPU inside the step loops.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "lstm_cuda.h"
#include "torch_cuda.h"

#if TORCH_VERSION_MAJOR < 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 8)
#error "the lstm_fused CUDA build needs torch >= 2.8 (mm with out_dtype)"
#endif

namespace lstm_fused {
namespace {

// The packed layout: first row of every step, and the steps in processing
// order (T-1 .. 0 for the reverse direction).
struct Layout {
  const LayerSizes& s;
  bool reverse;
  std::vector<int64_t> off;

  Layout(const LayerSizes& sizes, bool rev) : s(sizes), reverse(rev), off(sizes.steps) {
    int64_t r = 0;
    for (int64_t t = 0; t < s.steps; ++t) {
      off[t] = r;
      r += s.batch_sizes[t];
    }
  }
  int64_t step(int64_t k) const { return reverse ? s.steps - 1 - k : k; }
  int64_t rows(int64_t t) const { return s.batch_sizes[t]; }
  // Rows of the k-th step in processing order, 0 outside [0, steps).
  int64_t rows_at(int64_t k) const { return k >= 0 && k < s.steps ? rows(step(k)) : 0; }
};

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// out = a b, or out += a b, in out's dtype: float out for half a and b
// (float32 accumulation; that case never accumulates).
void gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (out.scalar_type() != a.scalar_type()) {
    TORCH_INTERNAL_ASSERT(!accumulate);
    cuda::mm_out_dtype(out, a, b);
  } else if (accumulate) {
    at::addmm_out(out, out, a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// LSTM_FUSED_CUDA_ENGINE: auto (default: persistent where it can run and
// the sequence has more than one step), persistent (float32/16/bf16 layers
// must run persistent: an error where they cannot) or step.
enum class Engine { kAuto, kStep, kPersistent };

Engine engine_setting() {
  const char* v = std::getenv("LSTM_FUSED_CUDA_ENGINE");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return Engine::kAuto;
  if (std::strcmp(v, "step") == 0) return Engine::kStep;
  if (std::strcmp(v, "persistent") == 0) return Engine::kPersistent;
  TORCH_CHECK(false, "lstm_fused: LSTM_FUSED_CUDA_ENGINE must be auto, step or persistent, got ",
              v);
}

// The persistent plan for a layer's sizes on the current device (cached:
// it queries the device), for the forward or the backward kernel, one
// direction or both in one launch.
template <typename T>
cuda::Plan cached_plan(int64_t hidden, int64_t proj, bool backward, int directions) {
  static std::mutex m;
  static std::map<std::tuple<int, int64_t, int64_t, bool, int>, cuda::Plan> plans;
  int device = 0;
  LSTM_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(device, hidden, proj, backward, directions);
  std::lock_guard<std::mutex> lock(m);
  auto it = plans.find(key);
  if (it == plans.end()) {
    const int H = static_cast<int>(hidden), P = static_cast<int>(proj);
    it = plans.emplace(key, backward ? cuda::plan_backward<T>(H, P, directions)
                                     : cuda::plan_forward<T>(H, P, directions))
             .first;
  }
  return it->second;
}

// Which kernels run a layer: the persistent ones (a plan) or the per-step
// ones (a plan with persistent false and the reason). strict: with
// LSTM_FUSED_CUDA_ENGINE=persistent, a float32/16/bf16 layer that cannot run
// persistent is an error. directions 2: both directions of a bidirectional
// layer in one launch (never strict: each direction may still run
// persistent on its own).
template <typename T>
cuda::Plan choose_engine(const LayerSizes& s, bool backward, cudaStream_t stream, bool strict,
                         int directions = 1) {
  cuda::Plan step;
  const Engine engine = engine_setting();
  if constexpr (std::is_same_v<T, double>) {
    step.why = "float64 runs per step";
    return step;
  } else {
    if (engine == Engine::kStep) {
      step.why = "LSTM_FUSED_CUDA_ENGINE=step";
      return step;
    }
    if (engine == Engine::kAuto && s.steps < 2) {
      step.why = "one step";
      return step;
    }
    cuda::Plan plan = cached_plan<T>(s.hidden, s.proj, backward, directions);
    const bool uniform = std::all_of(s.batch_sizes.begin(), s.batch_sizes.end(),
                                     [&](int64_t b) { return b == s.batch; });
    if (plan.persistent && !uniform && cuda::capturing(stream)) {
      plan.persistent = false;  // its step offsets would be copied from host memory
      plan.why = "packed input while a CUDA graph is captured";
    }
    TORCH_CHECK(plan.persistent || !strict || engine != Engine::kPersistent,
                "lstm_fused: LSTM_FUSED_CUDA_ENGINE=persistent, but this layer cannot run "
                "persistent: ", plan.why);
    return plan;
  }
}

// The rows of every step for the persistent kernels: null offsets when
// every step has the whole batch, else [first rows..., counts...] on the device.
at::Tensor step_offsets(const Layout& L, const at::Device& device) {
  const LayerSizes& s = L.s;
  if (std::all_of(s.batch_sizes.begin(), s.batch_sizes.end(),
                  [&](int64_t b) { return b == s.batch; }))
    return at::Tensor();
  std::vector<int32_t> v(2 * s.steps);
  for (int64_t t = 0; t < s.steps; ++t) {
    v[t] = static_cast<int32_t>(L.off[t]);
    v[s.steps + t] = static_cast<int32_t>(s.batch_sizes[t]);
  }
  return cuda::to_device(v, device);
}

// h_n: every row's h at its last step in processing order. The rows that
// end at one step are a contiguous range of it.
void gather_h_n(const Layout& L, const at::Tensor& y, at::Tensor& h_n) {
  for (int64_t k = 0; k < L.s.steps; ++k) {
    const int64_t t = L.step(k), n = L.rows(t), n_next = L.rows_at(k + 1);
    if (n > n_next)
      h_n.narrow(0, n_next, n - n_next).copy_(y.narrow(0, L.off[t] + n_next, n - n_next));
  }
}

// One direction of a forward call on the device: its workspaces (the input
// projection, the summed bias, the running cell, the projection's h before
// it) and, for the persistent kernels, its step offsets.
struct ForwardWork {
  at::Tensor xg, bias, c_state, h_pre, offsets;
};

// What both engines start from: x W_ih^T of all steps (in place in `gates`
// when T computes in T), the bias, c0.
template <typename T>
ForwardWork forward_begin(const Layout& L, ForwardCall& c, bool persistent) {
  using A = at::opmath_type<T>;
  constexpr bool same = std::is_same_v<T, A>;
  const LayerSizes& s = L.s;
  const int64_t N = s.rows, B = s.batch, H = s.hidden, G = 4 * H;
  const auto acc = c.x.options().dtype(c10::CppTypeToScalarType<A>::value);
  if (!persistent && !c.gates.defined()) {  // inference: the step kernels' workspace
    c.gates = at::empty({N, G}, c.x.options());
    c.cells = at::empty({N, H}, c.x.options());
  }
  ForwardWork w;
  w.xg = same && c.gates.defined() ? c.gates : at::empty({N, G}, acc);
  gemm(w.xg, c.x, c.w_ih.t(), false);
  if (c.b_ih.defined() || c.b_hh.defined()) {
    w.bias = at::zeros({G}, acc);
    if (c.b_ih.defined()) w.bias.add_(c.b_ih);
    if (c.b_hh.defined()) w.bias.add_(c.b_hh);
  }
  w.c_state = same ? c.c_n : at::empty({B, H}, acc);
  w.c_state.copy_(c.c0);
  if (c.w_hr.defined()) w.h_pre = at::empty({B, H}, c.x.options());
  if (persistent) w.offsets = step_offsets(L, c.x.device());
  return w;
}

template <typename T>
cuda::PersistentForward<T> forward_params(const Layout& L, const ForwardCall& c,
                                          const ForwardWork& w) {
  using A = at::opmath_type<T>;
  const LayerSizes& s = L.s;
  return {ptr<T>(c.w_hh), ptr<T>(c.w_hr), ptr<A>(w.xg), ptr<A>(w.bias), ptr<T>(c.h0),
          ptr<A>(w.c_state), ptr<T>(c.y), ptr<T>(c.gates), ptr<T>(c.cells), ptr<T>(w.h_pre),
          {ptr<int32_t>(w.offsets), static_cast<int>(s.steps), static_cast<int>(s.batch)},
          static_cast<int>(s.hidden), static_cast<int>(s.proj), L.reverse};
}

// The per-step engine: a kernel (and with projection a GEMM) per step.
template <typename T>
void forward_steps(const Layout& L, ForwardCall& c, ForwardWork& w, cudaStream_t stream) {
  using A = at::opmath_type<T>;
  const LayerSizes& s = L.s;
  const int64_t H = s.hidden, P = s.proj, G = 4 * H;
  const bool proj = c.w_hr.defined();
  for (int64_t k = 0; k < s.steps; ++k) {
    const int64_t t = L.step(k), n = L.rows(t), r0 = L.off[t];
    const int64_t n_prev = L.rows_at(k - 1);
    cuda::ForwardStep<T, A> p;
    p.w_hh = ptr<T>(c.w_hh);
    p.xg = ptr<A>(w.xg) + r0 * G;
    p.bias = ptr<A>(w.bias);
    p.h_prev = n_prev > 0 ? ptr<T>(c.y) + L.off[L.step(k - 1)] * P : nullptr;
    p.h0 = ptr<T>(c.h0);
    p.c_state = ptr<A>(w.c_state);
    p.gates = ptr<T>(c.gates) + r0 * G;
    p.cells = ptr<T>(c.cells) + r0 * H;
    p.h_out = proj ? ptr<T>(w.h_pre) : ptr<T>(c.y) + r0 * P;
    p.ld_h = static_cast<int>(proj ? H : P);
    p.n = static_cast<int>(n);
    p.n_prev = static_cast<int>(n_prev);
    p.hidden = static_cast<int>(H);
    p.proj = static_cast<int>(P);
    cuda::forward_step(p, stream);
    if (proj) gemm(c.y.narrow(0, r0, n), w.h_pre.narrow(0, 0, n), c.w_hr.t(), false);
  }
}

template <typename T>
void forward_end(const Layout& L, ForwardCall& c, const ForwardWork& w) {
  if (!std::is_same_v<T, at::opmath_type<T>>) c.c_n.copy_(w.c_state);
  gather_h_n(L, c.y, c.h_n);
}

// One direction of a layer: persistent where it can, else per step.
template <typename T>
void run_forward(const Layout& L, ForwardCall& c) {
  const cudaStream_t stream = cuda::current_stream();
  const cuda::Plan plan = choose_engine<T>(L.s, /*backward=*/false, stream, true);
  ForwardWork w = forward_begin<T>(L, c, plan.persistent);
  if constexpr (!std::is_same_v<T, double>) {
    if (plan.persistent) {
      const cuda::PersistentForward<T> p = forward_params<T>(L, c, w);
      cuda::persistent_forward(&p, plan, stream);
    }
  }
  if (!plan.persistent) forward_steps<T>(L, c, w, stream);
  forward_end<T>(L, c, w);
}

// Both directions of a bidirectional layer: one persistent launch where the
// pair fits on the device, else each direction on its own.
template <typename T>
void run_bi_forward(const Layout (&L)[2], BiForwardCall& c) {
  const cudaStream_t stream = cuda::current_stream();
  const cuda::Plan plan = choose_engine<T>(L[0].s, /*backward=*/false, stream, false, 2);
  if constexpr (!std::is_same_v<T, double>) {
    if (plan.persistent) {
      ForwardWork w[2] = {forward_begin<T>(L[0], c.dir[0], true),
                             forward_begin<T>(L[1], c.dir[1], true)};
      const cuda::PersistentForward<T> p[2] = {forward_params<T>(L[0], c.dir[0], w[0]),
                                               forward_params<T>(L[1], c.dir[1], w[1])};
      cuda::persistent_forward(p, plan, stream);
      for (int d = 0; d < 2; ++d) forward_end<T>(L[d], c.dir[d], w[d]);
      return;
    }
  }
  for (int d = 0; d < 2; ++d) run_forward<T>(L[d], c.dir[d]);
}

// h_{t-1} of every row of every step: y of the previous step in processing
// order, or h0 where a row starts. Copied in merged contiguous runs.
at::Tensor previous_h(const Layout& L, const at::Tensor& y, const at::Tensor& h0) {
  const LayerSizes& s = L.s;
  at::Tensor out = at::empty({s.rows, s.proj}, y.options());
  struct Run { const at::Tensor* src; int64_t dst, from, count; };
  std::vector<Run> runs;
  auto add = [&](const at::Tensor* src, int64_t dst, int64_t from, int64_t count) {
    if (count <= 0) return;
    if (!runs.empty()) {
      Run& r = runs.back();
      if (r.src == src && r.dst + r.count == dst && r.from + r.count == from) {
        r.count += count;
        return;
      }
    }
    runs.push_back({src, dst, from, count});
  };
  for (int64_t t = 0; t < s.steps; ++t) {
    const int64_t k = L.reverse ? s.steps - 1 - t : t;  // t's place in processing order
    const int64_t n = L.rows(t), n_prev = L.rows_at(k - 1), m = std::min(n, n_prev);
    if (m > 0) add(&y, L.off[t], L.off[L.step(k - 1)], m);
    add(&h0, L.off[t] + m, m, n - m);
  }
  for (const Run& r : runs)
    out.narrow(0, r.dst, r.count).copy_(r.src->narrow(0, r.from, r.count));
  return out;
}

// One direction of a backward call on the device: dh, the gradient of
// every step's h (after projection: grad_y, plus grad_h_n at each row's last
// step, plus, added by the kernels, the recurrent part), the running dc (it
// ends as dc0), dh0 and the gate gradients, in A.
struct BackwardWork {
  at::Tensor dh, dc, dh0, dgates, offsets;
};

template <typename T>
BackwardWork backward_begin(const Layout& L, const BackwardCall& c, bool persistent) {
  using A = at::opmath_type<T>;
  constexpr bool same = std::is_same_v<T, A>;
  const LayerSizes& s = L.s;
  const int64_t N = s.rows, B = s.batch, H = s.hidden, P = s.proj, G = 4 * H;
  const auto acc = c.x.options().dtype(c10::CppTypeToScalarType<A>::value);
  BackwardWork w;
  w.dh = at::empty({N, P}, acc);
  if (c.dy.defined()) w.dh.copy_(c.dy);
  else w.dh.zero_();
  if (c.dh_n.defined()) {
    for (int64_t k = 0; k < s.steps; ++k) {
      const int64_t t = L.step(k), n = L.rows(t), n_next = L.rows_at(k + 1);
      if (n > n_next)
        w.dh.narrow(0, L.off[t] + n_next, n - n_next).add_(c.dh_n.narrow(0, n_next, n - n_next));
    }
  }
  w.dc = same ? c.dc0 : at::empty({B, H}, acc);
  if (c.dc_n.defined()) w.dc.copy_(c.dc_n);
  else w.dc.zero_();
  w.dh0 = same ? c.dh0 : at::empty({B, P}, acc);
  w.dgates = at::empty({N, G}, acc);
  if (persistent) w.offsets = step_offsets(L, c.x.device());
  return w;
}

template <typename T>
cuda::PersistentBackward<T> backward_params(const Layout& L, const BackwardCall& c,
                                            const BackwardWork& w) {
  using A = at::opmath_type<T>;
  const LayerSizes& s = L.s;
  return {ptr<T>(c.w_hh), ptr<T>(c.w_hr), ptr<T>(c.gates), ptr<T>(c.cells), ptr<T>(c.c0),
          ptr<A>(w.dh), ptr<A>(w.dh0), ptr<A>(w.dc), ptr<A>(w.dgates),
          {ptr<int32_t>(w.offsets), static_cast<int>(s.steps), static_cast<int>(s.batch)},
          static_cast<int>(s.hidden), static_cast<int>(s.proj), L.reverse};
}

// The per-step engine: per step a kernel (dh' = dh W_hr, cell_backward) and
// a GEMM dh_{t-1} += dG_t W_hh.
template <typename T>
void backward_steps(const Layout& L, const BackwardCall& c, BackwardWork& w,
                    cudaStream_t stream) {
  using A = at::opmath_type<T>;
  const LayerSizes& s = L.s;
  const int64_t H = s.hidden, P = s.proj, G = 4 * H;
  const at::Tensor w_hh = std::is_same_v<T, A> ? c.w_hh : c.w_hh.to(w.dh.scalar_type());
  for (int64_t k = s.steps - 1; k >= 0; --k) {
    const int64_t t = L.step(k), n = L.rows(t), r0 = L.off[t];
    const int64_t n_prev = L.rows_at(k - 1);
    const int64_t r_prev = n_prev > 0 ? L.off[L.step(k - 1)] : 0;
    cuda::BackwardStep<T, A> p;
    p.w_hr = ptr<T>(c.w_hr);
    p.dh = ptr<A>(w.dh) + r0 * P;
    p.gates = ptr<T>(c.gates) + r0 * G;
    p.cells = ptr<T>(c.cells) + r0 * H;
    p.c_prev = n_prev > 0 ? ptr<T>(c.cells) + r_prev * H : nullptr;
    p.c0 = ptr<T>(c.c0);
    p.dc = ptr<A>(w.dc);
    p.dgates = ptr<A>(w.dgates) + r0 * G;
    p.n = static_cast<int>(n);
    p.n_prev = static_cast<int>(n_prev);
    p.hidden = static_cast<int>(H);
    p.proj = static_cast<int>(P);
    cuda::backward_step(p, stream);
    // dh_{t-1} = dG_t W_hh: into the previous step's rows, or dh0 where a
    // row started at this step.
    const at::Tensor dg = w.dgates.narrow(0, r0, n);
    const int64_t m = std::min(n, n_prev);
    if (m > 0) gemm(w.dh.narrow(0, r_prev, m), dg.narrow(0, 0, m), w_hh, true);
    if (n > m) gemm(w.dh0.narrow(0, m, n - m), dg.narrow(0, m, n - m), w_hh, false);
  }
}

// After the recurrence: dx, dW_ih, dW_hh, db, dW_hr, GEMMs over all steps
// in T (float accumulation for the half types), as on the CPU.
template <typename T>
void backward_end(const Layout& L, BackwardCall& c, const BackwardWork& w, bool has_bias) {
  constexpr bool same = std::is_same_v<T, at::opmath_type<T>>;
  const int64_t H = L.s.hidden;
  const at::Tensor dg = same ? w.dgates : w.dgates.to(c.x.scalar_type());
  if (c.input_grad) gemm(c.dx, dg, c.w_ih, false);
  gemm(c.dw_ih, dg.t(), c.x, false);
  gemm(c.dw_hh, dg.t(), previous_h(L, c.y, c.h0), false);
  if (has_bias) {
    const int64_t dim0[] = {0};
    if (same) at::sum_out(c.db, w.dgates, at::IntArrayRef(dim0));
    else c.db.copy_(w.dgates.sum(0));
  }
  if (c.w_hr.defined()) {
    const at::Tensor h_pre = c.gates.narrow(1, 3 * H, H) * at::tanh(c.cells);
    gemm(c.dw_hr, same ? w.dh.t() : w.dh.to(c.x.scalar_type()).t(), h_pre, false);
  }
  if (!same) {
    c.dh0.copy_(w.dh0);
    c.dc0.copy_(w.dc);
  }
}

template <typename T>
void run_backward(const Layout& L, BackwardCall& c, bool has_bias) {
  const cudaStream_t stream = cuda::current_stream();
  const cuda::Plan plan = choose_engine<T>(L.s, /*backward=*/true, stream, true);
  BackwardWork w = backward_begin<T>(L, c, plan.persistent);
  if constexpr (!std::is_same_v<T, double>) {
    if (plan.persistent) {
      const cuda::PersistentBackward<T> p = backward_params<T>(L, c, w);
      cuda::persistent_backward(&p, plan, stream);
    }
  }
  if (!plan.persistent) backward_steps<T>(L, c, w, stream);
  backward_end<T>(L, c, w, has_bias);
}

template <typename T>
void run_bi_backward(const Layout (&L)[2], BiBackwardCall& c, bool has_bias) {
  const cudaStream_t stream = cuda::current_stream();
  const cuda::Plan plan = choose_engine<T>(L[0].s, /*backward=*/true, stream, false, 2);
  if constexpr (!std::is_same_v<T, double>) {
    if (plan.persistent) {
      BackwardWork w[2] = {backward_begin<T>(L[0], c.dir[0], true),
                              backward_begin<T>(L[1], c.dir[1], true)};
      const cuda::PersistentBackward<T> p[2] = {backward_params<T>(L[0], c.dir[0], w[0]),
                                                backward_params<T>(L[1], c.dir[1], w[1])};
      cuda::persistent_backward(p, plan, stream);
      for (int d = 0; d < 2; ++d) backward_end<T>(L[d], c.dir[d], w[d], has_bias);
      return;
    }
  }
  for (int d = 0; d < 2; ++d) run_backward<T>(L[d], c.dir[d], has_bias);
}

void check_cuda(const at::Tensor& x, const LayerSizes& s) {
  TORCH_CHECK(cuda::on_device(x), "lstm_fused: expected CUDA tensors, got ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "lstm_fused: the CUDA kernels support float32, float64, float16 and bfloat16, "
              "got ", dt);
  TORCH_CHECK(s.batch <= cuda::kMaxBatch, "lstm_fused: batch size ", s.batch,
              " is above the CUDA kernels' limit ", cuda::kMaxBatch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward_cuda(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, bool save) {
  const LayerSizes s = check_layer_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
  check_cuda(x, s);
  const cuda::DeviceGuard device(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  ForwardCall c = forward_call(s, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, save);
  const Layout L(s, reverse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lstm_fused_layer_forward_cuda",
                                  [&] { run_forward<scalar_t>(L, c); });
  return c.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward_cuda(const std::optional<at::Tensor>& grad_y,
                    const std::optional<at::Tensor>& grad_h_n,
                    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x,
                    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                    const std::optional<at::Tensor>& batch_sizes, bool reverse, bool has_bias,
                    const at::Tensor& y, const at::Tensor& gates, const at::Tensor& cells,
                    bool input_grad) {
  const LayerSizes s = check_layer_args(x, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt,
                                        w_hr, batch_sizes);
  check_cuda(x, s);
  const cuda::DeviceGuard device(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  BackwardCall c = backward_call(s, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh,
                                  w_hr, has_bias, y, gates, cells, input_grad);
  const Layout L(s, reverse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lstm_fused_layer_backward_cuda",
                                  [&] { run_backward<scalar_t>(L, c, has_bias); });
  return c.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bilayer_forward_cuda(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& w_ih_r, const at::Tensor& w_hh_r, const std::optional<at::Tensor>& b_ih_r,
    const std::optional<at::Tensor>& b_hh_r, const std::optional<at::Tensor>& w_hr_r,
    const std::optional<at::Tensor>& batch_sizes, bool save) {
  BiForwardCall c = bi_forward_call(
      x, h0, c0,
      {LayerWeights{w_ih, w_hh, b_ih, b_hh, w_hr}, {w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r}},
      batch_sizes, save);
  check_cuda(x, c.sizes[0]);
  const cuda::DeviceGuard device(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Layout L[2] = {Layout(c.sizes[0], false), Layout(c.sizes[1], true)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lstm_fused_bilayer_forward_cuda",
                                  [&] { run_bi_forward<scalar_t>(L, c); });
  return c.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bilayer_backward_cuda(const std::optional<at::Tensor>& grad_y,
                      const std::optional<at::Tensor>& grad_h_n,
                      const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x,
                      const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                      const at::Tensor& w_ih_r, const at::Tensor& w_hh_r,
                      const std::optional<at::Tensor>& w_hr_r,
                      const std::optional<at::Tensor>& batch_sizes, bool has_bias,
                      const at::Tensor& y, const at::Tensor& gates, const at::Tensor& cells) {
  BiBackwardCall c = bi_backward_call(grad_y, grad_h_n, grad_c_n, x, h0, c0,
                                      {LayerWeights{w_ih, w_hh, std::nullopt, std::nullopt, w_hr},
                                       {w_ih_r, w_hh_r, std::nullopt, std::nullopt, w_hr_r}},
                                      batch_sizes, has_bias, y, gates, cells);
  check_cuda(x, c.sizes[0]);
  const cuda::DeviceGuard device(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Layout L[2] = {Layout(c.sizes[0], false), Layout(c.sizes[1], true)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lstm_fused_bilayer_backward_cuda",
                                  [&] { run_bi_backward<scalar_t>(L, c, has_bias); });
  return c.outputs();
}

// The cuda_plan op: what layer_forward and layer_backward (directions 1) or
// bilayer_forward and bilayer_backward (directions 2: one launch for both, or
// each direction on its own as layer_forward would) run.
std::vector<int64_t> cuda_plan(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const std::optional<at::Tensor>& w_hr,
                               const std::optional<at::Tensor>& batch_sizes,
                               int64_t directions) {
  const LayerSizes s = check_layer_args(x, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr,
                                        batch_sizes);
  check_cuda(x, s);
  TORCH_CHECK(directions == 1 || directions == 2, "lstm_fused: directions must be 1 or 2, got ",
              directions);
  const cuda::DeviceGuard device(x.device());
  std::vector<int64_t> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lstm_fused_cuda_plan", [&] {
    const cudaStream_t stream = cuda::current_stream();
    for (bool backward : {false, true}) {
      cuda::Plan p = choose_engine<scalar_t>(s, backward, stream, false,
                                             static_cast<int>(directions));
      if (!p.persistent && directions == 2) p = choose_engine<scalar_t>(s, backward, stream, false);
      out.insert(out.end(), {p.persistent, p.directions, p.blocks, p.units, p.proj_units,
                             static_cast<int64_t>(p.shared)});
    }
  });
  return out;
}

}  // namespace
}  // namespace lstm_fused

TORCH_LIBRARY_IMPL(lstm_fused, LSTM_FUSED_DISPATCH_KEY, m) {
  m.impl("layer_forward", &lstm_fused::layer_forward_cuda);
  m.impl("layer_backward", &lstm_fused::layer_backward_cuda);
  m.impl("bilayer_forward", &lstm_fused::bilayer_forward_cuda);
  m.impl("bilayer_backward", &lstm_fused::bilayer_backward_cuda);
  m.impl("cuda_plan", &lstm_fused::cuda_plan);
}
