// Conditioning ops: schemas and the input checks shared by every backend.
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <numeric>

#include "../host.h"
#include "../inplace.h"
#include "condition_ops.h"

namespace opensora_fast {
namespace condition {

namespace {
bool out_dtype_ok(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf || t == c10::kDouble;
}

bool dense(const at::Tensor& t) {
  return t.layout() == at::kStrided && !t.is_nested();
}

Span span_of(const at::Tensor& t, bool written, int64_t index) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uint64_t n = extent_bytes(t.sizes().data(), t.strides().data(), static_cast<size_t>(t.dim()),
                                  static_cast<int64_t>(t.element_size()));
  return Span{start, start + static_cast<uintptr_t>(n), written, written ? "cond" : "sources", index};
}
}  // namespace

void check_inputs(const char* op, const at::Tensor& out, at::TensorList sources, c10::IntArrayRef plan) {
  const bool cat = std::string(op) == "condition_cat_";
  const char* arg = cat ? "cond" : "z";
  // first: a nested tensor has no sizes to read (and reports a strided layout)
  TORCH_CHECK_VALUE(dense(out), op, ": ", arg, " must be a dense (strided) tensor");
  TORCH_CHECK_VALUE(out.dim() == 5 && (!cat || out.size(1) >= 1), op, ": ", arg, " must be ",
                    cat ? "[B, 1 + C, T, H, W]" : "[B, C, T, H, W]", ", got shape ", out.sizes());
  TORCH_CHECK_TYPE(out_dtype_ok(out.scalar_type()), op, ": ", arg, " must be float32, bfloat16, float16 or float64");
  TORCH_CHECK_VALUE(!cat || out.is_contiguous(), op, ": cond must be contiguous");
  TORCH_CHECK(!cat || !out.is_inference() || c10::InferenceMode::is_enabled(), op,
              ": cond is an inference tensor; it can only be written in place inside torch.inference_mode()");
  const int64_t B = out.size(0), C = out.size(1) - (cat ? 1 : 0), T = out.size(2), H = out.size(3), W = out.size(4);
  const int64_t S = static_cast<int64_t>(sources.size());
  for (int64_t i = 0; i < S; ++i) {
    const at::Tensor& s = sources[i];
    TORCH_CHECK_VALUE(dense(s), op, ": sources[", i, "] must be a dense (strided) tensor");
    TORCH_CHECK_VALUE(s.dim() == 4, op, ": sources[", i, "] must be [C, T, H, W], got shape ", s.sizes());
    TORCH_CHECK_TYPE(out_dtype_ok(s.scalar_type()), op, ": sources[", i,
                     "] must be float32, bfloat16, float16 or float64");
    TORCH_CHECK_VALUE(s.device() == out.device(), op, ": sources[", i, "] is on ", s.device(), " but ", arg, " is on ",
                      out.device());
    TORCH_CHECK_VALUE(s.size(0) == C && s.size(2) == H && s.size(3) == W, op, ": sources[", i, "] has shape ",
                      s.sizes(), "; expected [C, *, H, W] = [", C, ", *, ", H, ", ", W, "]");
  }
  if (cat && out.device().type() != c10::DeviceType::Meta) {
    // Address ranges, as ema_update_ and unpad_ compare them: two storages over
    // one buffer (torch.from_numpy twice) overlap too. A source's range runs
    // from its first element to the end of its last, whatever its strides.
    std::vector<Span> spans;
    spans.reserve(sources.size() + 1);
    spans.push_back(span_of(out, true, -1));
    for (int64_t i = 0; i < S; ++i)
      spans.push_back(span_of(sources[i], false, i));
    Span a{}, b{};
    if (find_overlap(std::move(spans), &a, &b))
      TORCH_CHECK_VALUE(false, op, ": sources[", a.written ? b.index : a.index, "] shares memory with cond");
  }
  TORCH_CHECK_VALUE(plan.size() % kRow == 0, op,
                    ": plan must hold rows of 5 ints (sample, frame, count, source, source_frame), got ", plan.size(),
                    " ints");
  const int64_t rows = static_cast<int64_t>(plan.size()) / kRow;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = plan[r * kRow], t0 = plan[r * kRow + 1], n = plan[r * kRow + 2], s = plan[r * kRow + 3],
                  f0 = plan[r * kRow + 4];
    TORCH_CHECK_VALUE(b >= 0 && b < B, op, ": plan row ", r, ": sample ", b, " is outside [0, ", B, ")");
    TORCH_CHECK_VALUE(n >= 1 && t0 >= 0 && t0 <= T && n <= T - t0, op, ": plan row ", r, ": frame ", t0, ", count ", n,
                      " do not fit in T=", T);
    TORCH_CHECK_VALUE(s >= 0 && s < S, op, ": plan row ", r, ": source ", s, " is outside [0, ", S, ")");
    const int64_t Ts = sources[s].size(1);
    TORCH_CHECK_VALUE(f0 >= 0 && f0 <= Ts && n <= Ts - f0, op, ": plan row ", r, ": source_frame ", f0, ", count ", n,
                      " do not fit in sources[", s, "] with ", Ts, " frames");
  }
  std::vector<int64_t> order(rows);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const int64_t *x = &plan[a * kRow], *y = &plan[b * kRow];
    if (x[0] != y[0])
      return x[0] < y[0];
    if (x[1] != y[1])
      return x[1] < y[1];
    return a < b;
  });
  for (int64_t k = 0; k + 1 < rows; ++k) {
    const int64_t p = order[k], q = order[k + 1];
    // t0 + n <= T here, so no overflow
    TORCH_CHECK_VALUE(
        !(plan[p * kRow] == plan[q * kRow] && plan[p * kRow + 1] + plan[p * kRow + 2] > plan[q * kRow + 1]), op,
        ": plan rows ", std::min(p, q), " and ", std::max(p, q), " overlap (sample ", plan[p * kRow], ")");
  }
}

namespace {

// The ops are not differentiable (their outputs would claim grad that backward
// never gives the sources): a source that requires grad in grad mode is refused,
// as opensora_fast/reference/condition.py refuses it.
void refuse_source_grad(const char* op, at::TensorList sources) {
  for (size_t i = 0; i < sources.size(); ++i)
    TORCH_CHECK_VALUE(!sources[i].requires_grad(), op, ": sources[", i, "] requires grad and grad mode is on; ", op,
                      " is not differentiable: detach the sources or call it under torch.no_grad()");
}

// condition_cat_ writes cond; its sources are refused after it.
struct CatOp {
  static constexpr const char* qualified = "opensora_fast::condition_cat_";
  static void refuse_inputs(at::Tensor&, at::TensorList sources, c10::IntArrayRef) {
    refuse_source_grad("condition_cat_", sources);
  }
};
using CatKernels = inplace::Kernels<CatOp, inplace::Written<0>, void(at::Tensor&, at::TensorList, c10::IntArrayRef)>;

std::tuple<at::Tensor, at::Tensor> condition_autograd(const at::Tensor& z, at::TensorList sources,
                                                      c10::IntArrayRef plan) {
  if (c10::GradMode::is_enabled())
    refuse_source_grad("condition", sources);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("opensora_fast::condition", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList, c10::IntArrayRef)>();
  at::AutoDispatchBelowADInplaceOrView guard;  // fresh outputs, no autograd history
  return op.call(z, sources, plan);
}

// Backends without a kernel (sparse, nested, other devices): the checks, then
// "no kernel", so bad input raises what the CPU kernel raises.
std::tuple<at::Tensor, at::Tensor> condition_fallback(const at::Tensor& z, at::TensorList sources,
                                                      c10::IntArrayRef plan) {
  check_inputs("condition", z, sources, plan);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "condition: no kernel for tensors on ", z.device(),
                              " (native kernels: cpu, cuda)");
  return {};
}

void cat_fallback(at::Tensor& cond, at::TensorList sources, c10::IntArrayRef plan) {
  check_inputs("condition_cat_", cond, sources, plan);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "condition_cat_: no kernel for tensors on ", cond.device(),
                              " (native kernels: cpu, cuda)");
}

}  // namespace

}  // namespace condition
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, Autograd, m) {
  m.impl("condition", &opensora_fast::condition::condition_autograd);
}

TORCH_LIBRARY_IMPL(opensora_fast, CompositeExplicitAutograd, m) {
  m.impl("condition", &opensora_fast::condition::condition_fallback);
}

OSF_REGISTER_INPLACE(condition_cat_, opensora_fast::condition::CatKernels, &opensora_fast::condition::cat_fallback)

// Nested tensors are no backend of CompositeExplicitAutograd.
TORCH_LIBRARY_IMPL(opensora_fast, NestedTensorCPU, m) {
  m.impl("condition", &opensora_fast::condition::condition_fallback);
  m.impl("condition_cat_", &opensora_fast::condition::cat_fallback);
}

TORCH_LIBRARY_IMPL(opensora_fast, NestedTensorCUDA, m) {
  m.impl("condition", &opensora_fast::condition::condition_fallback);
  m.impl("condition_cat_", &opensora_fast::condition::cat_fallback);
}

TORCH_LIBRARY_FRAGMENT(opensora_fast, m) {
  m.def("condition(Tensor z, Tensor[] sources, int[] plan) -> (Tensor, Tensor)");
  m.def("condition_cat_(Tensor(a!) cond, Tensor[] sources, int[] plan) -> ()");
  m.def(
      "_condition_grid_walk_(Tensor(a!) masks, Tensor(b!) masked, Tensor[] sources, int[] plan, "
      "int max_pieces=0, int max_sources=0, int max_blocks=0, bool small_table=False) -> ()");
  // make_pieces of a plan (tests: plans past 2^31 frames).
  m.def("_condition_pieces(int[] plan, int B, int T) -> Tensor");
}
