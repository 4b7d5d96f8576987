// AdamW+EMA op: schemas, the input checks every kernel runs first, the
// planning both devices share (steps, per-tensor constants, EMA pairing), and
// the device-independent kernels (autograd rule, version counters, empty calls).
// The arithmetic is in adamw_ema.h.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <cmath>
#include <unordered_map>

#include "../host.h"
#include "../inplace.h"
#include "adamw_ema_ops.h"

namespace opensora_fast {
namespace adamw_ema {

namespace {

bool ema_dtype_ok(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half;
}

// A tensor of the call: defined, dense, its dtype, no neg bit, shaped like
// `like`, on `dev`, contiguous, and (when written) not an inference tensor
// outside inference mode.
void check_tensor(const char* name, size_t i, const at::Tensor& t, bool is_ema, bool written, const at::Tensor& like,
                  const char* like_name, size_t like_i, const at::Tensor& first, const char* first_name) {
  TORCH_CHECK_VALUE(t.defined(), "adamw_ema_: ", name, "[", i, "] is undefined");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided && !t.is_nested(), "adamw_ema_: ", name, "[", i,
                    "] must be a dense (strided) tensor");
  if (is_ema) {
    TORCH_CHECK_TYPE(ema_dtype_ok(t.scalar_type()), "adamw_ema_: ", name, "[", i, "] has dtype ",
                     dtype_name(t.scalar_type()), "; expected float32, bfloat16 or float16");
  } else {
    TORCH_CHECK_TYPE(t.scalar_type() == c10::ScalarType::Float, "adamw_ema_: ", name, "[", i, "] has dtype ",
                     dtype_name(t.scalar_type()), "; expected torch.float32 (fp32 masters)");
  }
  TORCH_CHECK_VALUE(!t.is_neg(), "adamw_ema_: ", name, "[", i,
                    "] is a negated view (neg bit set); pass a tensor without it (.resolve_neg() makes a copy)");
  if (&t != &like) {
    TORCH_CHECK_VALUE(t.sizes() == like.sizes(), "adamw_ema_: ", name, "[", i, "] has shape ", t.sizes(), " but ",
                      like_name, "[", like_i, "] has shape ", like.sizes());
  }
  TORCH_CHECK_VALUE(t.device() == first.device(), "adamw_ema_: all tensors but steps must be on one device; ",
                    first_name, "[0] is on ", first.device(), " but ", name, "[", i, "] is on ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), "adamw_ema_: ", name, "[", i, "] is not contiguous");
  if (written) {
    TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), "adamw_ema_: ", name, "[", i,
                "] is an inference tensor; it can only be updated in place inside torch.inference_mode()");
  }
}

void check_hyper(const char* name, size_t g, double x, bool below_one) {
  if (below_one) {
    TORCH_CHECK_VALUE(x >= 0.0 && x < 1.0, "adamw_ema_: ", name, "[", g, "] must be in [0, 1), got ", py_repr(x));
  } else {
    TORCH_CHECK_VALUE(std::isfinite(x) && x >= 0.0, "adamw_ema_: ", name, "[", g, "] must be finite and >= 0, got ",
                      py_repr(x));
  }
}

uintptr_t addr(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr());
}

// For each EMA pair, the param its source is (same memory, same size), or -1.
std::vector<int64_t> fused_sources(const Call& c) {
  std::unordered_map<uintptr_t, int64_t> by_addr;
  for (size_t i = 0; i < c.params.size(); ++i)
    if (c.params[i].numel() > 0)
      by_addr.emplace(addr(c.params[i]), static_cast<int64_t>(i));
  std::vector<int64_t> of(c.ema_src.size(), -1);
  for (size_t j = 0; j < c.ema_src.size(); ++j) {
    const at::Tensor& s = c.ema_src[j];
    if (s.numel() == 0)
      continue;
    const auto it = by_addr.find(addr(s));
    if (it != by_addr.end() && c.params[it->second].numel() == s.numel())
      of[j] = it->second;
  }
  return of;
}

}  // namespace

void check_inputs(const Call& c) {
  const size_t n = c.params.size();
  TORCH_CHECK_VALUE(
      c.grads.size() == n && c.exp_avgs.size() == n && c.exp_avg_sqs.size() == n && c.steps.size() == n,
      "adamw_ema_: grads, exp_avgs, exp_avg_sqs and steps must have one tensor per param, got len(params)=", n,
      ", len(grads)=", c.grads.size(), ", len(exp_avgs)=", c.exp_avgs.size(),
      ", len(exp_avg_sqs)=", c.exp_avg_sqs.size(), ", len(steps)=", c.steps.size());
  const size_t ng = c.group_sizes.size();
  TORCH_CHECK_VALUE(c.lr.size() == ng && c.beta1.size() == ng && c.beta2.size() == ng && c.eps.size() == ng &&
                        c.weight_decay.size() == ng && c.amsgrad.size() == ng && c.maximize.size() == ng,
                    "adamw_ema_: lr, beta1, beta2, eps, weight_decay, amsgrad and maximize must have one value per "
                    "group, got len(group_sizes)=",
                    ng, ", len(lr)=", c.lr.size(), ", len(beta1)=", c.beta1.size(), ", len(beta2)=", c.beta2.size(),
                    ", len(eps)=", c.eps.size(), ", len(weight_decay)=", c.weight_decay.size(),
                    ", len(amsgrad)=", c.amsgrad.size(), ", len(maximize)=", c.maximize.size());
  int64_t total = 0;
  bool sizes_ok = true;
  for (int64_t s : c.group_sizes) {
    sizes_ok = sizes_ok && s >= 0;
    total += s;
  }
  TORCH_CHECK_VALUE(sizes_ok && total == static_cast<int64_t>(n),
                    "adamw_ema_: group_sizes must be >= 0 and sum to len(params)=", n, ", got ", c.group_sizes);
  size_t n_ams = 0;
  for (size_t g = 0; g < ng; ++g) {
    TORCH_CHECK_VALUE(c.amsgrad[g] == 0 || c.amsgrad[g] == 1, "adamw_ema_: amsgrad[", g, "] must be 0 or 1, got ",
                      c.amsgrad[g]);
    TORCH_CHECK_VALUE(c.maximize[g] == 0 || c.maximize[g] == 1, "adamw_ema_: maximize[", g, "] must be 0 or 1, got ",
                      c.maximize[g]);
    if (c.amsgrad[g])
      n_ams += static_cast<size_t>(c.group_sizes[g]);
  }
  TORCH_CHECK_VALUE(c.max_exp_avg_sqs.size() == n_ams,
                    "adamw_ema_: max_exp_avg_sqs must have one tensor per param of the amsgrad groups (", n_ams,
                    "), got len(max_exp_avg_sqs)=", c.max_exp_avg_sqs.size());
  TORCH_CHECK_VALUE(c.ema.size() == c.ema_src.size(),
                    "adamw_ema_: ema and ema_src must have the same length, got len(ema)=", c.ema.size(),
                    " and len(ema_src)=", c.ema_src.size());
  for (size_t g = 0; g < ng; ++g) {
    check_hyper("lr", g, c.lr[g], false);
    check_hyper("beta1", g, c.beta1[g], true);
    check_hyper("beta2", g, c.beta2[g], true);
    check_hyper("eps", g, c.eps[g], false);
    check_hyper("weight_decay", g, c.weight_decay[g], false);
  }
  TORCH_CHECK_VALUE(c.decay >= 0.0 && c.decay <= 1.0, "adamw_ema_: decay must be in [0, 1], got ", py_repr(c.decay));

  if (n == 0 && c.ema.empty())
    return;
  const at::Tensor& first = n > 0 ? c.params[0] : c.ema[0];
  const char* first_name = n > 0 ? "params" : "ema";
  // Undefined first tensors are named by check_tensor below; the device test needs a defined one.
  TORCH_CHECK_VALUE(first.defined(), "adamw_ema_: ", first_name, "[0] is undefined");
  size_t k = 0;  // position in max_exp_avg_sqs
  size_t i = 0;
  for (size_t g = 0; g < ng; ++g) {
    for (int64_t q = 0; q < c.group_sizes[g]; ++q, ++i) {
      const at::Tensor& p = c.params[i];
      check_tensor("params", i, p, false, true, p, "params", i, first, first_name);
      check_tensor("grads", i, c.grads[i], false, false, p, "params", i, first, first_name);
      check_tensor("exp_avgs", i, c.exp_avgs[i], false, true, p, "params", i, first, first_name);
      check_tensor("exp_avg_sqs", i, c.exp_avg_sqs[i], false, true, p, "params", i, first, first_name);
      if (c.amsgrad[g]) {
        check_tensor("max_exp_avg_sqs", k, c.max_exp_avg_sqs[k], false, true, p, "params", i, first, first_name);
        ++k;
      }
      const at::Tensor& s = c.steps[i];
      TORCH_CHECK_VALUE(s.defined() && s.layout() == at::kStrided && !s.is_nested() &&
                            s.scalar_type() == c10::ScalarType::Float && s.numel() == 1 &&
                            s.device().type() == c10::DeviceType::CPU && !s.is_neg(),
                        "adamw_ema_: steps[", i,
                        "] must be a float32 tensor of one element on the CPU (torch AdamW's state['step'])");
      TORCH_CHECK(!s.is_inference() || c10::InferenceMode::is_enabled(), "adamw_ema_: steps[", i,
                  "] is an inference tensor; it can only be updated in place inside torch.inference_mode()");
    }
  }
  for (size_t j = 0; j < c.ema.size(); ++j) {
    const at::Tensor& s = c.ema_src[j];
    check_tensor("ema_src", j, s, false, false, s, "ema_src", j, first, first_name);
    check_tensor("ema", j, c.ema[j], true, true, s, "ema_src", j, first, first_name);
  }
  if (first.device().type() == c10::DeviceType::Meta)
    return;

  // Written memory must not alias anything else of the call (the kernels run
  // tensors and elements in no fixed order), except that an EMA's source may
  // be one of the params: the EMA then reads the updated master.
  const std::vector<int64_t> fused = fused_sources(c);
  std::vector<int64_t> twin(n, -1);
  for (size_t j = 0; j < fused.size(); ++j) {
    if (fused[j] < 0)
      continue;
    TORCH_CHECK_VALUE(twin[fused[j]] < 0, "adamw_ema_: ema_src[", twin[fused[j]], "] and ema_src[", j,
                      "] are both params[", fused[j], "]; a param has at most one EMA twin");
    twin[fused[j]] = static_cast<int64_t>(j);
  }
  std::vector<Span> spans;
  spans.reserve(5 * n + 2 * c.ema.size());
  const auto span = [&](const at::Tensor& t, bool written, const char* arg, size_t idx) {
    spans.push_back(Span{addr(t), addr(t) + t.nbytes(), written, arg, static_cast<int64_t>(idx)});
  };
  for (size_t q = 0; q < n; ++q) {
    span(c.params[q], true, "params", q);
    span(c.grads[q], false, "grads", q);
    span(c.exp_avgs[q], true, "exp_avgs", q);
    span(c.exp_avg_sqs[q], true, "exp_avg_sqs", q);
  }
  for (size_t q = 0; q < c.max_exp_avg_sqs.size(); ++q)
    span(c.max_exp_avg_sqs[q], true, "max_exp_avg_sqs", q);
  for (size_t q = 0; q < n; ++q)
    span(c.steps[q], true, "steps", q);
  for (size_t j = 0; j < c.ema.size(); ++j) {
    span(c.ema[j], true, "ema", j);
    if (fused[j] < 0)
      span(c.ema_src[j], false, "ema_src", j);
  }
  Span a{}, b{};
  TORCH_CHECK_VALUE(!find_overlap(std::move(spans), &a, &b), "adamw_ema_: ", a.arg, "[", a.index, "] and ", b.arg, "[",
                    b.index,
                    "] overlap in memory; a written tensor must share no memory with any other tensor of the call "
                    "(an ema_src may be one of the params)");
}

std::vector<EntryGroup> prepare(const Call& c) {
  const size_t n = c.params.size();
  std::vector<Entry> entries(n);
  std::vector<c10::ScalarType> dtype(n, c10::ScalarType::Undefined);
  size_t i = 0, k = 0;
  for (size_t g = 0; g < c.group_sizes.size(); ++g) {
    const double lr = c.lr[g], b1 = c.beta1[g], b2 = c.beta2[g], wd = c.weight_decay[g];
    const float w = static_cast<float>(1.0 - b1);
    const bool small = std::fabs(w) < 0.5f;
    for (int64_t q = 0; q < c.group_sizes[g]; ++q, ++i) {
      // torch: step += 1 in fp32, then Python's float pow of it.
      float* sp = c.steps[i].data_ptr<float>();
      *sp = *sp + 1.0f;
      const double step = *sp;
      const double bc1 = 1.0 - std::pow(b1, step);
      const double bc2 = 1.0 - std::pow(b2, step);
      Hyper h{};
      h.wd_factor = static_cast<float>(1.0 - lr * wd);
      h.lerp_w = small ? w : w - 1.0f;
      h.beta2 = static_cast<float>(b2);
      h.sq_w = static_cast<float>(1.0 - b2);
      h.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));
      h.eps = static_cast<float>(c.eps[g]);
      h.step_size = static_cast<float>((lr / bc1) * -1.0);
      h.sign = c.maximize[g] ? 0x80000000u : 0u;
      h.lerp_small = small;
      h.amsgrad = c.amsgrad[g] != 0;
      Entry& e = entries[i];
      e.p = c.params[i].data_ptr<float>();
      e.g = c.grads[i].data_ptr<float>();
      e.m = c.exp_avgs[i].data_ptr<float>();
      e.v = c.exp_avg_sqs[i].data_ptr<float>();
      e.vmax = c.amsgrad[g] ? c.max_exp_avg_sqs[k++].data_ptr<float>() : nullptr;
      e.ema = nullptr;
      e.numel = c.params[i].numel();
      e.ema_base = 0;
      e.h = h;
    }
  }
  const std::vector<int64_t> fused = fused_sources(c);
  int64_t base = 0;
  for (size_t j = 0; j < c.ema.size(); ++j) {
    const int64_t numel = c.ema[j].numel();
    if (numel > 0) {
      if (fused[j] >= 0) {
        entries[fused[j]].ema = c.ema[j].data_ptr();
        entries[fused[j]].ema_base = base;
        dtype[fused[j]] = c.ema[j].scalar_type();
      } else {
        Entry e{};
        e.p = static_cast<float*>(c.ema_src[j].data_ptr());
        e.ema = c.ema[j].data_ptr();
        e.numel = numel;
        e.ema_base = base;
        entries.push_back(e);
        dtype.push_back(c.ema[j].scalar_type());
      }
    }
    base += numel;
  }
  std::vector<EntryGroup> groups;
  const auto group_of = [&](c10::ScalarType t) -> EntryGroup& {
    for (EntryGroup& x : groups)
      if (x.ema_dtype == t)
        return x;
    groups.push_back(EntryGroup{t, {}});
    return groups.back();
  };
  for (size_t q = 0; q < entries.size(); ++q)
    if (entries[q].numel > 0 && dtype[q] != c10::ScalarType::Undefined)
      group_of(dtype[q]).entries.push_back(entries[q]);
  for (size_t q = 0; q < entries.size(); ++q) {
    if (entries[q].numel == 0 || dtype[q] != c10::ScalarType::Undefined)
      continue;
    if (groups.empty())
      groups.push_back(EntryGroup{c10::ScalarType::Float, {}});
    groups.front().entries.push_back(entries[q]);
  }
  return groups;
}

namespace {

// Every other backend, and a call with no tensors at all: validate, then do
// nothing (empty) or say which device has no kernel.
void fallback(const Call& c) {
  check_inputs(c);
  const bool any = !c.params.empty() || !c.ema.empty();
  TORCH_CHECK_NOT_IMPLEMENTED(!any, "adamw_ema_: no kernel for tensors on ",
                              (c.params.empty() ? c.ema[0] : c.params[0]).device(), " (native kernels: cpu, cuda)");
}

void walk_fallback(const Call& c, int64_t, int64_t, bool) {
  fallback(c);
}

void lazy_view(const Call& c) {
  check_inputs(c);
  TORCH_CHECK_VALUE(false, "adamw_ema_: a negated or conjugated view reached the kernel");
}

void walk_lazy_view(const Call& c, int64_t, int64_t, bool) {
  lazy_view(c);
}

// torch's in-place rules (inplace.h) over the op's six written lists: params,
// exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, ema.
struct AdamwEmaOp {
  static constexpr const char* qualified = "opensora_fast::adamw_ema_";
};
using Kernels = inplace::Kernels<AdamwEmaOp, inplace::Written<0, 2, 3, 4, 5, 14>,
                                 void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                      at::TensorList, at::IntArrayRef, at::ArrayRef<double>, at::ArrayRef<double>,
                                      at::ArrayRef<double>, at::ArrayRef<double>, at::ArrayRef<double>, at::IntArrayRef,
                                      at::IntArrayRef, at::TensorList, at::TensorList, double, bool, int64_t)>;

}  // namespace

}  // namespace adamw_ema
}  // namespace opensora_fast

// params/grads/exp_avgs/exp_avg_sqs/steps: one per param, params ordered by
// group (group_sizes); per-group hyper-parameters; max_exp_avg_sqs: one per
// param of the amsgrad groups; ema[j] steps towards ema_src[j] after the AdamW
// update (an ema_src that is one of the params gives its fresh value). One
// literal for both schemas.
#define OSF_ADAMW_EMA_SCHEMA_ARGS                                                                       \
  "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "              \
  "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, int[] group_sizes, float[] lr, float[] beta1, "    \
  "float[] beta2, float[] eps, float[] weight_decay, int[] amsgrad, int[] maximize, Tensor(f!)[] ema, " \
  "Tensor[] ema_src, float decay, bool stochastic=False, int seed=0"

TORCH_LIBRARY_FRAGMENT(opensora_fast, m) {
  m.def("adamw_ema_(" OSF_ADAMW_EMA_SCHEMA_ARGS ") -> ()");
  // The CUDA kernel's per-thread body over its whole launch grid, on the CPU
  // (tests): max_entries/max_blocks shrink the tables, small_table picks the
  // 4 KiB table.
  m.def("_adamw_ema_grid_walk_(" OSF_ADAMW_EMA_SCHEMA_ARGS
        ", int max_entries=0, int max_blocks=0, bool small_table=False) -> ()");
}

#undef OSF_ADAMW_EMA_SCHEMA_ARGS

namespace osf_aw = opensora_fast::adamw_ema;

OSF_REGISTER_INPLACE(adamw_ema_, osf_aw::Kernels, &osf_aw::as_op<&osf_aw::fallback>)

TORCH_LIBRARY_IMPL(opensora_fast, CompositeExplicitAutograd, m) {
  m.impl("_adamw_ema_grid_walk_", &osf_aw::as_walk_op<&osf_aw::walk_fallback>);
}

TORCH_LIBRARY_IMPL(opensora_fast, Negative, m) {
  m.impl("adamw_ema_", &osf_aw::as_op<&osf_aw::lazy_view>);
  m.impl("_adamw_ema_grid_walk_", &osf_aw::as_walk_op<&osf_aw::walk_lazy_view>);
}

TORCH_LIBRARY_IMPL(opensora_fast, Conjugate, m) {
  m.impl("adamw_ema_", &osf_aw::as_op<&osf_aw::lazy_view>);
  m.impl("_adamw_ema_grid_walk_", &osf_aw::as_walk_op<&osf_aw::walk_lazy_view>);
}

TORCH_LIBRARY_IMPL(opensora_fast, NestedTensorCPU, m) {
  m.impl("adamw_ema_", &osf_aw::as_op<&osf_aw::fallback>);
  m.impl("_adamw_ema_grid_walk_", &osf_aw::as_walk_op<&osf_aw::walk_fallback>);
}

TORCH_LIBRARY_IMPL(opensora_fast, NestedTensorCUDA, m) {
  m.impl("adamw_ema_", &osf_aw::as_op<&osf_aw::fallback>);
  m.impl("_adamw_ema_grid_walk_", &osf_aw::as_walk_op<&osf_aw::walk_fallback>);
}
