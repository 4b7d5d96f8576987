// The one translation unit with torch/extension.h: op schemas, kernel
// registration per device, and the Python module with build_info().
#include <torch/extension.h>
#include <torch/library.h>

#include <limits>

#include "cpu_isa.h"
#include "ema/ema_ops.h"
#include "masked_mse/masked_mse.h"
#include "masked_mse/masked_mse_ops.h"

#define OSF_STR2(x) #x
#define OSF_STR(x) OSF_STR2(x)

namespace opensora_fast {
namespace {

// The dispatcher picks the device; each entry checks once, then runs.
void ema_update_cpu_entry(at::TensorList ema, at::TensorList src, double decay, bool stochastic,
                          int64_t seed) {
  ema::check_ema_inputs(ema, src, decay);
  ema::ema_update_cpu(ema, src, decay, stochastic, seed);
}

void ema_grid_walk_entry(at::TensorList ema, at::TensorList src, double decay, bool stochastic,
                         int64_t seed, int64_t max_tensors, int64_t max_blocks) {
  ema::check_ema_inputs(ema, src, decay);
  ema::ema_grid_walk_cpu(ema, src, decay, stochastic, seed, max_tensors, max_blocks);
}

#ifdef OSF_WITH_CUDA
void ema_update_cuda_entry(at::TensorList ema, at::TensorList src, double decay, bool stochastic,
                           int64_t seed) {
  ema::check_ema_inputs(ema, src, decay);
  ema::ema_update_cuda(ema, src, decay, stochastic, seed);
}
#endif

// Masked MSE: allocation and checks here, arithmetic in the per-device kernels.
using MseForward = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                            at::Tensor&);
using MseBackward = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, at::Tensor&);

at::ScalarType mse_acc_dtype(const at::Tensor& pred) {
  return pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <MseForward kernel>
at::Tensor masked_mse_entry(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& ranges) {
  masked_mse::check_inputs(pred, target, ranges);
  const auto opts = pred.options().dtype(mse_acc_dtype(pred));
  at::Tensor loss = at::empty({}, opts);
  if (pred.size(0) == 0) return loss.fill_(std::numeric_limits<double>::quiet_NaN());
  at::Tensor partial = at::empty({pred.size(0), masked_mse::max_chunks(pred.size(1), pred.size(2))}, opts);
  kernel(pred, target, ranges, partial, loss);
  return loss;
}

template <MseBackward kernel>
at::Tensor masked_mse_backward_entry(const at::Tensor& grad, const at::Tensor& pred,
                                     const at::Tensor& target, const at::Tensor& ranges) {
  masked_mse::check_inputs(pred, target, ranges);
  TORCH_CHECK_VALUE(grad.dim() == 0, "masked_mse_backward: grad must be a scalar, got shape ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == pred.device(), "masked_mse_backward: grad is on ", grad.device(),
                    " but pred is on ", pred.device());
  const at::Tensor g = grad.to(mse_acc_dtype(pred)).contiguous();
  at::Tensor grad_pred = at::empty_like(pred, at::MemoryFormat::Contiguous);
  if (grad_pred.numel() > 0) kernel(g, pred, target, ranges, grad_pred);
  return grad_pred;
}

std::tuple<at::Tensor, at::Tensor> masked_mse_walk_entry(const at::Tensor& grad, const at::Tensor& pred,
                                                         const at::Tensor& target, const at::Tensor& ranges) {
  masked_mse::check_inputs(pred, target, ranges);
  at::Tensor loss = at::empty({}, pred.options().dtype(mse_acc_dtype(pred)));
  at::Tensor grad_pred = at::empty_like(pred, at::MemoryFormat::Contiguous);
  masked_mse::grid_walk(grad.to(mse_acc_dtype(pred)).contiguous(), pred, target, ranges, loss, grad_pred);
  return {loss, grad_pred};
}

std::string replace_all(std::string s, char from, char to) {
  std::replace(s.begin(), s.end(), from, to);
  return s;
}

}  // namespace
}  // namespace opensora_fast

TORCH_LIBRARY(opensora_fast, m) {
  m.def(
      "ema_update_(Tensor(a!)[] ema, Tensor[] src, float decay, bool stochastic=False, "
      "int seed=0) -> ()");
  m.def(
      "_ema_update_grid_walk_(Tensor(a!)[] ema, Tensor[] src, float decay, "
      "bool stochastic=False, int seed=0, int max_tensors=0, int max_blocks=0) -> ()");
  m.def("masked_mse(Tensor pred, Tensor target, Tensor ranges) -> Tensor");
  m.def("masked_mse_backward(Tensor grad, Tensor pred, Tensor target, Tensor ranges) -> Tensor");
  m.def(
      "_masked_mse_grid_walk(Tensor grad, Tensor pred, Tensor target, Tensor ranges) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(opensora_fast, CPU, m) {
  m.impl("ema_update_", &opensora_fast::ema_update_cpu_entry);
  m.impl("_ema_update_grid_walk_", &opensora_fast::ema_grid_walk_entry);
  m.impl("masked_mse", &opensora_fast::masked_mse_entry<opensora_fast::masked_mse::forward_cpu>);
  m.impl("masked_mse_backward",
         &opensora_fast::masked_mse_backward_entry<opensora_fast::masked_mse::backward_cpu>);
  m.impl("_masked_mse_grid_walk", &opensora_fast::masked_mse_walk_entry);
}

#ifdef OSF_WITH_CUDA
TORCH_LIBRARY_IMPL(opensora_fast, CUDA, m) {
  m.impl("ema_update_", &opensora_fast::ema_update_cuda_entry);
  m.impl("masked_mse", &opensora_fast::masked_mse_entry<opensora_fast::masked_mse::forward_cuda>);
  m.impl("masked_mse_backward",
         &opensora_fast::masked_mse_backward_entry<opensora_fast::masked_mse::backward_cuda>);
}
#endif

PYBIND11_MODULE(_C, m) {
  m.def("build_info", []() {
    pybind11::dict info;
    info["torch"] = OSF_STR(OSF_TORCH_VERSION);
#ifdef OSF_WITH_CUDA
    info["cuda_kernels"] = true;
    info["cuda"] = OSF_STR(OSF_TORCH_CUDA);
    // setup.py passes the arch list with '_' for ';' (shell-safe).
    info["cuda_archs"] = opensora_fast::replace_all(OSF_STR(OSF_CUDA_ARCHS), '_', ';');
#else
    info["cuda_kernels"] = false;
    info["cuda"] = pybind11::none();
    info["cuda_archs"] = "";
#endif
    // whether the CPU kernels run their AVX2+FMA+F16C build on this machine
#ifdef OSF_AVX2_PATH
    info["cpu_avx2_path"] = opensora_fast::cpu_has_avx2();
#else
    info["cpu_avx2_path"] = false;
#endif
    return info;
  });
}
