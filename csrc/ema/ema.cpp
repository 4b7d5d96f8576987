// EMA op: schemas, the input checks every kernel runs first, and the
// device-independent kernels (autograd rules, version counter, empty calls).
// The arithmetic is in ema.h; ema_cpu.cpp / ema_cuda.cu register the devices.
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include "../host.h"
#include "../inplace.h"
#include "ema_ops.h"

namespace opensora_fast {
namespace ema {

namespace {

bool supported_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half;
}

struct EmaOp {
  static constexpr const char* qualified = "opensora_fast::ema_update_";
};
using EmaKernels =
    inplace::Kernels<EmaOp, inplace::Written<0>, void(at::TensorList, at::TensorList, double, bool, int64_t)>;

// Every other backend, and a call with no tensors at all (which the dispatcher
// cannot route to a device): validate, then do nothing (empty) or say which
// device has no kernel.
void fallback_kernel(at::TensorList ema, at::TensorList src, double decay, bool, int64_t) {
  check_inputs(ema, src, decay);
  TORCH_CHECK_NOT_IMPLEMENTED(ema.empty(), "ema_update_: no kernel for tensors on ", ema[0].device(),
                              " (native kernels: cpu, cuda)");
}

void walk_fallback(at::TensorList ema, at::TensorList src, double decay, bool stochastic, int64_t seed, int64_t,
                   int64_t, bool) {
  fallback_kernel(ema, src, decay, stochastic, seed);
}

// Lazily negated or conjugated tensors reach these keys before any device
// kernel; torch's own fallbacks would copy a src silently or refuse an ema with
// their own words. check_inputs refuses both in ours (a conjugated tensor is
// complex: the dtype check).
void lazy_view_kernel(at::TensorList ema, at::TensorList src, double decay, bool, int64_t) {
  check_inputs(ema, src, decay);
  TORCH_CHECK_VALUE(false, "ema_update_: a negated or conjugated view reached the kernel");
}

void walk_lazy_view(at::TensorList ema, at::TensorList src, double decay, bool stochastic, int64_t seed, int64_t,
                    int64_t, bool) {
  lazy_view_kernel(ema, src, decay, stochastic, seed);
}

}  // namespace

namespace {
Runner* runner_slot(c10::DeviceType type) {
  static Runner cpu = nullptr, cuda = nullptr;
  return type == c10::DeviceType::CPU ? &cpu : type == c10::DeviceType::CUDA ? &cuda : nullptr;
}
}  // namespace

Runner runner(c10::DeviceType type) {
  Runner* slot = runner_slot(type);
  return slot ? *slot : nullptr;
}

bool set_runner(c10::DeviceType type, Runner run) {
  *runner_slot(type) = run;
  return true;
}

void check_inputs(at::TensorList ema, at::TensorList src, double decay) {
  TORCH_CHECK_VALUE(ema.size() == src.size(),
                    "ema_update_: ema and src must have the same length, got len(ema)=", ema.size(),
                    " and len(src)=", src.size());
  TORCH_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, "ema_update_: decay must be in [0, 1], got ", py_repr(decay));
  std::vector<Span> spans;
  spans.reserve(2 * ema.size());
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& s = src[i];
    TORCH_CHECK_VALUE(e.defined() && s.defined(), "ema_update_: ema[", i, "] or src[", i, "] is undefined");
    // A strided nested tensor reports kStrided but has no sizes: refuse it here too.
    TORCH_CHECK_VALUE(e.layout() == at::kStrided && s.layout() == at::kStrided && !e.is_nested() && !s.is_nested(),
                      "ema_update_: ema[", i, "] and src[", i, "] must be dense (strided) tensors");
    TORCH_CHECK_TYPE(supported_dtype(e.scalar_type()), "ema_update_: ema[", i, "] has dtype ",
                     dtype_name(e.scalar_type()), "; expected float32, bfloat16 or float16");
    TORCH_CHECK_TYPE(supported_dtype(s.scalar_type()), "ema_update_: src[", i, "] has dtype ",
                     dtype_name(s.scalar_type()), "; expected float32, bfloat16 or float16");
    // The kernels read raw memory: a lazily negated view would be read (and
    // written) without its sign.
    TORCH_CHECK_VALUE(!e.is_neg(), "ema_update_: ema[", i, "] is a negated view (neg bit set, as in x.conj().imag); ",
                      "pass a tensor without it (.resolve_neg() makes a copy)");
    TORCH_CHECK_VALUE(!s.is_neg(), "ema_update_: src[", i, "] is a negated view (neg bit set, as in x.conj().imag); ",
                      "pass a tensor without it (.resolve_neg() makes a copy)");
    TORCH_CHECK_VALUE(e.sizes() == s.sizes(), "ema_update_: ema[", i, "] has shape ", e.sizes(), " but src[", i,
                      "] has shape ", s.sizes());
    TORCH_CHECK_VALUE(e.device() == s.device(), "ema_update_: ema[", i, "] is on ", e.device(), " but src[", i,
                      "] is on ", s.device());
    TORCH_CHECK_VALUE(e.device() == ema[0].device(), "ema_update_: all pairs must be on one device; ema[0] is on ",
                      ema[0].device(), " but ema[", i, "] is on ", e.device());
    TORCH_CHECK_VALUE(e.is_contiguous(), "ema_update_: ema[", i, "] is not contiguous");
    TORCH_CHECK_VALUE(s.is_contiguous(), "ema_update_: src[", i, "] is not contiguous");
    TORCH_CHECK(!e.is_inference() || c10::InferenceMode::is_enabled(), "ema_update_: ema[", i,
                "] is an inference tensor; it can only be updated in place inside torch.inference_mode()");
    if (e.device().type() != c10::DeviceType::Meta) {
      const auto at = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); };
      spans.push_back(Span{at(e), at(e) + e.nbytes(), true, "ema", static_cast<int64_t>(i)});
      spans.push_back(Span{at(s), at(s) + s.nbytes(), false, "src", static_cast<int64_t>(i)});
    }
  }
  // Written memory must not alias anything else of the call: the kernels run
  // pairs and elements in no fixed order, so an alias would race.
  Span a{}, b{};
  TORCH_CHECK_VALUE(!find_overlap(std::move(spans), &a, &b), "ema_update_: ", a.arg, "[", a.index, "] and ", b.arg, "[",
                    b.index,
                    "] overlap in memory; every ema tensor must share no memory with any other tensor of the call");
}

}  // namespace ema
}  // namespace opensora_fast

TORCH_LIBRARY_FRAGMENT(opensora_fast, m) {
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] src, float decay, bool stochastic=False, int seed=0) -> ()");
  // The CUDA kernel's per-thread body over its whole persistent grid, on the
  // CPU (tests): max_tensors shrinks the tables, max_blocks the grid (0: an
  // H100's), small_table picks the 4 KiB table used with older CUDA.
  m.def(
      "_ema_update_grid_walk_(Tensor(a!)[] ema, Tensor[] src, float decay, bool stochastic=False, "
      "int seed=0, int max_tensors=0, int max_blocks=0, bool small_table=False) -> ()");
}

OSF_REGISTER_INPLACE(ema_update_, opensora_fast::ema::EmaKernels, &opensora_fast::ema::fallback_kernel)

TORCH_LIBRARY_IMPL(opensora_fast, CompositeExplicitAutograd, m) {
  m.impl("_ema_update_grid_walk_", &opensora_fast::ema::walk_fallback);
}

TORCH_LIBRARY_IMPL(opensora_fast, Negative, m) {
  m.impl("ema_update_", &opensora_fast::ema::lazy_view_kernel);
  m.impl("_ema_update_grid_walk_", &opensora_fast::ema::walk_lazy_view);
}

TORCH_LIBRARY_IMPL(opensora_fast, Conjugate, m) {
  m.impl("ema_update_", &opensora_fast::ema::lazy_view_kernel);
  m.impl("_ema_update_grid_walk_", &opensora_fast::ema::walk_lazy_view);
}

// Strided nested tensors have no dense kernel: the same error as any other layout.
TORCH_LIBRARY_IMPL(opensora_fast, NestedTensorCPU, m) {
  m.impl("ema_update_", &opensora_fast::ema::fallback_kernel);
}

TORCH_LIBRARY_IMPL(opensora_fast, NestedTensorCUDA, m) {
  m.impl("ema_update_", &opensora_fast::ema::fallback_kernel);
}
