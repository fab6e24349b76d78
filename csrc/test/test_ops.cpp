// The ops, called through the dispatcher as any libtorch program would, against
// torch::nn::LSTM of the C++ frontend in float64: the output, h_n, c_n and the
// gradient of x, h0, c0 and every parameter (torch's by autograd, ours by the
// layer_backward op, chained over layers and directions by hand). Also: bad
// arguments raise c10::Error. Exit status 0 when every check holds.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

using torch::Tensor;
using Opt = std::optional<Tensor>;
using Forward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Opt&,
    const Opt&, const Opt&, const Opt&, bool, bool);
using Backward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Opt&, const Opt&, const Opt&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Opt&, const Opt&, bool, bool, const Tensor&,
    const Tensor&, const Tensor&, bool);

int checks = 0, failures = 0;

void check(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    std::cerr << "FAIL: " << what << "\n";
    ++failures;
  }
}

// Equal shapes and values to 1e-10, relative to the largest expected value.
void check_close(const Tensor& ours, const Tensor& ref, const std::string& what) {
  if (!ours.defined() || !ref.defined() || ours.sizes() != ref.sizes()) {
    check(false, what + ": shapes differ");
    return;
  }
  const double scale = std::max(1.0, ref.abs().max().item<double>());
  const double err = (ours - ref).abs().max().item<double>();
  std::ostringstream msg;
  msg << what << ": max abs difference " << std::scientific << err;
  check(err <= 1e-10 * scale, msg.str());
}

struct Case {
  std::string name;
  int64_t layers;
  bool bidirectional, bias;
  int64_t proj;
  std::vector<int64_t> lengths;  // non-empty: a PackedSequence of these (sorted)
  int64_t I = 3, H = 4, T = 5, B = 3;
};

Opt param(torch::nn::LSTM& m, const std::string& kind, int64_t layer, bool reverse) {
  const auto name = kind + "_l" + std::to_string(layer) + (reverse ? "_reverse" : "");
  const auto params = m->named_parameters();
  const Tensor* p = params.find(name);
  return p ? Opt(*p) : std::nullopt;
}

void run_case(const Case& c) {
  const auto& fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("lstm_fused::layer_forward", "")
                        .typed<Forward>();
  const auto& bwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("lstm_fused::layer_backward", "")
                        .typed<Backward>();
  const int64_t I = c.I, H = c.H, T = c.T, B = c.B, D = c.bidirectional ? 2 : 1;
  const int64_t P = c.proj > 0 ? c.proj : H;
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  torch::manual_seed(0);
  torch::nn::LSTM lstm(torch::nn::LSTMOptions(I, H)
                           .num_layers(c.layers)
                           .bidirectional(c.bidirectional)
                           .bias(c.bias)
                           .proj_size(c.proj));
  lstm->to(torch::kDouble);

  const Tensor input = torch::randn({T, B, I}, f64).requires_grad_();
  const Tensor h0 = torch::randn({c.layers * D, B, P}, f64).requires_grad_();
  const Tensor c0 = torch::randn({c.layers * D, B, H}, f64).requires_grad_();
  const bool packed = !c.lengths.empty();

  // torch::nn::LSTM, and autograd for the gradients.
  Tensor ref_x, ref_y, ref_h, ref_c, batch_sizes;
  if (packed) {
    auto seq = torch::nn::utils::rnn::pack_padded_sequence(
        input, torch::tensor(c.lengths), /*batch_first=*/false, /*enforce_sorted=*/true);
    auto [out, state] = lstm->forward_with_packed_input(seq, std::make_tuple(h0, c0));
    ref_x = seq.data();
    batch_sizes = seq.batch_sizes();
    ref_y = out.data();
    std::tie(ref_h, ref_c) = state;
  } else {
    auto [out, state] = lstm->forward(input, std::make_tuple(h0, c0));
    ref_x = input.reshape({T * B, I});
    ref_y = out.reshape({T * B, D * P});
    std::tie(ref_h, ref_c) = state;
  }
  const Tensor gy = torch::randn(ref_y.sizes(), f64);
  const Tensor gh = torch::randn(ref_h.sizes(), f64);
  const Tensor gc = torch::randn(ref_c.sizes(), f64);
  ((ref_y * gy).sum() + (ref_h * gh).sum() + (ref_c * gc).sum()).backward();

  // Ours: layer by layer, direction by direction.
  const Opt bs = packed ? Opt(batch_sizes) : std::nullopt;
  struct Saved {
    Tensor x, y, gates, cells;
  };
  std::vector<Saved> saved(c.layers * D);
  std::vector<Tensor> h_n, c_n;
  Tensor x = ref_x.detach();
  for (int64_t l = 0; l < c.layers; ++l) {
    std::vector<Tensor> ys;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t k = l * D + d;
      const bool rev = d == 1;
      auto [y, h, cn, gates, cells] =
          fwd.call(x, h0[k].detach(), c0[k].detach(), *param(lstm, "weight_ih", l, rev),
                   *param(lstm, "weight_hh", l, rev), param(lstm, "bias_ih", l, rev),
                   param(lstm, "bias_hh", l, rev), param(lstm, "weight_hr", l, rev), bs, rev, true);
      saved[k] = {x, y, gates, cells};
      ys.push_back(y);
      h_n.push_back(h);
      c_n.push_back(cn);
    }
    x = torch::cat(ys, 1);
  }
  check_close(x, ref_y, c.name + " output");
  check_close(torch::stack(h_n), ref_h, c.name + " h_n");
  check_close(torch::stack(c_n), ref_c, c.name + " c_n");

  Tensor dy = gy;
  for (int64_t l = c.layers - 1; l >= 0; --l) {
    Tensor dx;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t k = l * D + d;
      const bool rev = d == 1;
      const auto tag = c.name + " layer " + std::to_string(l) + (rev ? " reverse" : "");
      const Saved& s = saved[k];
      const Opt w_hr = param(lstm, "weight_hr", l, rev);
      auto [dx_d, dh0, dc0, dw_ih, dw_hh, db, dw_hr] =
          bwd.call(dy.narrow(1, d * P, P).contiguous(), gh[k], gc[k], s.x, h0[k].detach(),
                   c0[k].detach(), *param(lstm, "weight_ih", l, rev),
                   *param(lstm, "weight_hh", l, rev), w_hr, bs, rev, c.bias, s.y, s.gates,
                   s.cells, true);
      dx = d == 0 ? dx_d : dx + dx_d;
      check_close(dh0, h0.grad()[k], tag + " grad h0");
      check_close(dc0, c0.grad()[k], tag + " grad c0");
      check_close(dw_ih, param(lstm, "weight_ih", l, rev)->grad(), tag + " grad w_ih");
      check_close(dw_hh, param(lstm, "weight_hh", l, rev)->grad(), tag + " grad w_hh");
      if (c.bias) {
        check_close(db, param(lstm, "bias_ih", l, rev)->grad(), tag + " grad b_ih");
        check_close(db, param(lstm, "bias_hh", l, rev)->grad(), tag + " grad b_hh");
      }
      if (w_hr) check_close(dw_hr, w_hr->grad(), tag + " grad w_hr");
    }
    dy = dx;
  }
  // The gradient of the padded input holds zeros where the packing left rows out.
  const Tensor ref_dx = packed ? torch::nn::utils::rnn::pack_padded_sequence(
                                     input.grad(), torch::tensor(c.lengths), false, true)
                                     .data()
                               : input.grad().reshape({T * B, I});
  check_close(dy, ref_dx, c.name + " grad x");
}

// Bad arguments: a c10::Error naming the problem, never a crash.
void expect_error(const std::function<void()>& fn, const std::string& needle,
                  const std::string& what) {
  try {
    fn();
    check(false, what + ": no error");
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    check(msg.find(needle) != std::string::npos, what + ": message was: " + msg);
  }
}

void run_errors() {
  const auto& fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("lstm_fused::layer_forward", "")
                        .typed<Forward>();
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const Tensor x = torch::randn({6, 3}, f64), h = torch::zeros({2, 4}, f64);
  const Tensor w_ih = torch::randn({16, 3}, f64), w_hh = torch::randn({16, 4}, f64);
  expect_error([&] { fwd.call(x[0], h, h, w_ih, w_hh, {}, {}, {}, {}, false, true); },
               "x must be 2-D", "1-D x");
  expect_error([&] { fwd.call(x, h, h, w_ih.t(), w_hh, {}, {}, {}, {}, false, true); }, "w_ih",
               "transposed w_ih");
  expect_error([&] { fwd.call(x.to(torch::kFloat), h, h, w_ih, w_hh, {}, {}, {}, {}, false, true); },
               "dtype", "mixed dtypes");
  expect_error(
      [&] { fwd.call(x, h, h, w_ih, w_hh, {}, {}, {}, torch::tensor({2, 2, 3}), false, true); },
      "non-increasing", "increasing batch_sizes");
  expect_error(
      [&] { fwd.call(x.narrow(0, 0, 5), h, h, w_ih, w_hh, {}, {}, {}, {}, false, true); },
      "multiple", "rows not a multiple of the batch");
}

}  // namespace

int main() {
  const std::vector<Case> cases = {
      {"1 layer", 1, false, true, 0, {}},
      {"2 layers bidirectional", 2, true, true, 0, {}},
      {"projection, no bias", 1, true, false, 2, {}},
      {"packed bidirectional", 1, true, true, 0, {5, 3, 2}},
      {"packed 2 layers projection", 2, true, true, 3, {5, 5, 1}},
      // The CPU kernels' other paths: one step with a batch (batch in vector
      // lanes), batch 1 (dot products), and a layer wide enough for two
      // threads with partial register tiles.
      {"one step", 1, true, true, 0, {}, 7, 20, 1, 9},
      {"one step projection", 1, false, true, 6, {}, 7, 20, 1, 9},
      {"batch 1", 2, false, true, 0, {}, 6, 19, 4, 1},
      {"wide packed projection", 1, true, true, 5,
       {6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 1, 1, 1}, 30, 40, 6, 20},
  };
  for (const Case& c : cases) {
    try {
      run_case(c);
    } catch (const std::exception& e) {
      check(false, c.name + ": " + e.what());
    }
  }
  run_errors();
  std::cout << failures << " of " << checks << " checks failed\n";
  return failures ? 1 : 0;
}
