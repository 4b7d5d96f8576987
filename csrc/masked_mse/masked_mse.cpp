// Masked MSE ops: schemas and the input checks every kernel runs first. The
// arithmetic is in masked_mse.h; masked_mse_cpu.cpp / masked_mse_cuda.cu
// register the devices; autograd is registered in opensora_fast/ops/masked_mse.py.
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "../host.h"
#include "masked_mse_ops.h"

namespace opensora_fast {
namespace masked_mse {

namespace {
bool supported(c10::ScalarType s) {
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble;
}

// A None passed for a Tensor argument arrives undefined: the reference's TypeError.
void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a tensor, got NoneType");
}

bool dense(const at::Tensor& t) {
  return t.layout() == at::kStrided && !t.is_nested();
}

// The frame-mask dtypes the loss_ranges kernels read (OSF_MASK_TYPES).
bool mask_dtype(c10::ScalarType s) {
  switch (s) {
    case at::kByte:
    case at::kChar:
    case at::kShort:
    case at::kInt:
    case at::kLong:
    case at::kUInt16:
    case at::kUInt32:
    case at::kUInt64:
    case at::kBool:
    case at::kHalf:
    case at::kBFloat16:
    case at::kFloat:
    case at::kDouble:
    case at::kFloat8_e5m2:
    case at::kFloat8_e5m2fnuz:
    case at::kFloat8_e4m3fn:
    case at::kFloat8_e4m3fnuz:
    case at::kFloat8_e8m0fnu:
      return true;
    default:
      return false;
  }
}
}  // namespace

void check_inputs(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& ranges) {
  check_defined(pred, "masked_mse", "pred");
  check_defined(target, "masked_mse", "target");
  check_defined(ranges, "masked_mse", "ranges");
  TORCH_CHECK_VALUE(dense(pred) && dense(target) && dense(ranges),
                    "masked_mse: pred, target and ranges must be dense (strided) tensors");
  TORCH_CHECK_VALUE(pred.dim() == 3, "masked_mse: pred must be [B, L, D], got shape ", pred.sizes());
  TORCH_CHECK_VALUE(target.sizes() == pred.sizes(), "masked_mse: target has shape ", target.sizes(),
                    " but pred has shape ", pred.sizes());
  TORCH_CHECK_TYPE(supported(pred.scalar_type()), "masked_mse: pred has dtype ", dtype_name(pred.scalar_type()),
                   "; expected float32, bfloat16, float16 or float64");
  TORCH_CHECK_TYPE(target.scalar_type() == pred.scalar_type(), "masked_mse: target has dtype ",
                   dtype_name(target.scalar_type()), " but pred has dtype ", dtype_name(pred.scalar_type()));
  TORCH_CHECK_VALUE(target.device() == pred.device(), "masked_mse: target is on ", target.device(), " but pred is on ",
                    pred.device());
  TORCH_CHECK_VALUE(ranges.device() == pred.device(), "masked_mse: ranges is on ", ranges.device(), " but pred is on ",
                    pred.device());
  TORCH_CHECK_TYPE(ranges.scalar_type() == at::kLong, "masked_mse: ranges must be int64, got ",
                   dtype_name(ranges.scalar_type()));
  TORCH_CHECK_VALUE(ranges.dim() == 2 && ranges.size(0) == pred.size(0) && ranges.size(1) == 2,
                    "masked_mse: ranges must be [B, 2] = [", pred.size(0), ", 2], got ", ranges.sizes());
  TORCH_CHECK_VALUE(pred.is_contiguous() && target.is_contiguous() && ranges.is_contiguous(),
                    "masked_mse: pred, target and ranges must be contiguous");
}

void check_grad(const at::Tensor& grad, const at::Tensor& pred) {
  check_defined(grad, "masked_mse_backward", "grad");
  TORCH_CHECK_VALUE(dense(grad), "masked_mse_backward: grad must be a dense (strided) tensor");
  TORCH_CHECK_VALUE(grad.dim() == 0, "masked_mse_backward: grad must be a scalar (0-dim), got shape ", grad.sizes());
  TORCH_CHECK_TYPE(supported(grad.scalar_type()), "masked_mse_backward: grad has dtype ",
                   dtype_name(grad.scalar_type()), "; expected float32, bfloat16, float16 or float64");
  TORCH_CHECK_VALUE(grad.device() == pred.device(), "masked_mse_backward: grad is on ", grad.device(),
                    " but pred is on ", pred.device());
}

void check_loss_ranges(const at::Tensor& frame_mask, int64_t hw) {
  check_defined(frame_mask, "loss_ranges", "frame_mask");
  TORCH_CHECK_VALUE(dense(frame_mask), "loss_ranges: frame_mask must be a dense (strided) tensor");
  TORCH_CHECK_VALUE(frame_mask.dim() == 2, "loss_ranges: frame_mask must be [B, T], got shape ", frame_mask.sizes());
  TORCH_CHECK_TYPE(mask_dtype(frame_mask.scalar_type()), "loss_ranges: frame_mask has dtype ",
                   dtype_name(frame_mask.scalar_type()), "; expected a real or bool dtype");
  const int64_t T = frame_mask.size(1);
  TORCH_CHECK_VALUE(T >= 1, "loss_ranges: frame_mask has no frames (T=0)");
  TORCH_CHECK_VALUE(hw >= 0, "loss_ranges: hw must be >= 0, got ", hw);
  // the last range ends at T * hw: it must be an int64
  TORCH_CHECK_VALUE(hw <= std::numeric_limits<int64_t>::max() / T, "loss_ranges: T * hw = ", T, " * ", hw,
                    " does not fit in int64");
}

namespace {
// Any other backend (sparse, other devices): the same checks, then say which
// device has no kernel, rather than the dispatcher's generic error.
at::Tensor fallback(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& ranges) {
  check_inputs(pred, target, ranges);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "masked_mse: no kernel for tensors on ", pred.device(),
                              " (native kernels: cpu, cuda)");
}
at::Tensor fallback_backward(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                             const at::Tensor& ranges) {
  check_inputs(pred, target, ranges);
  check_grad(grad, pred);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "masked_mse_backward: no kernel for tensors on ", pred.device(),
                              " (native kernels: cpu, cuda)");
}
std::tuple<at::Tensor, at::Tensor> fallback_walk(const at::Tensor& grad, const at::Tensor& pred,
                                                 const at::Tensor& target, const at::Tensor& ranges) {
  check_inputs(pred, target, ranges);
  check_grad(grad, pred);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "_masked_mse_grid_walk: a CPU op, got tensors on ", pred.device());
}
at::Tensor fallback_loss_ranges(const at::Tensor& frame_mask, int64_t hw, bool /*upstream*/) {
  check_loss_ranges(frame_mask, hw);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "loss_ranges: no kernel for tensors on ", frame_mask.device(),
                              " (native kernels: cpu, cuda)");
}
}  // namespace

}  // namespace masked_mse
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CompositeExplicitAutograd, m) {
  m.impl("masked_mse", &opensora_fast::masked_mse::fallback);
  m.impl("masked_mse_backward", &opensora_fast::masked_mse::fallback_backward);
  m.impl("loss_ranges", &opensora_fast::masked_mse::fallback_loss_ranges);
  m.impl("_masked_mse_grid_walk", &opensora_fast::masked_mse::fallback_walk);
}

// Nested tensors reach neither of the above: the same checks (their ValueError) there.
TORCH_LIBRARY_IMPL(opensora_fast, NestedTensorCPU, m) {
  m.impl("masked_mse", &opensora_fast::masked_mse::fallback);
  m.impl("masked_mse_backward", &opensora_fast::masked_mse::fallback_backward);
  m.impl("loss_ranges", &opensora_fast::masked_mse::fallback_loss_ranges);
}
TORCH_LIBRARY_IMPL(opensora_fast, NestedTensorCUDA, m) {
  m.impl("masked_mse", &opensora_fast::masked_mse::fallback);
  m.impl("masked_mse_backward", &opensora_fast::masked_mse::fallback_backward);
  m.impl("loss_ranges", &opensora_fast::masked_mse::fallback_loss_ranges);
}
TORCH_LIBRARY_IMPL(opensora_fast, AutogradNestedTensor, m) {  // loss_ranges has no autograd kernel
  m.impl("loss_ranges", &opensora_fast::masked_mse::fallback_loss_ranges);
}

TORCH_LIBRARY_FRAGMENT(opensora_fast, m) {
  m.def("masked_mse(Tensor pred, Tensor target, Tensor ranges) -> Tensor");
  m.def("masked_mse_backward(Tensor grad, Tensor pred, Tensor target, Tensor ranges) -> Tensor");
  // get_batch_loss's token ranges from a [B, T] frame mask: one launch, no host sync.
  m.def("loss_ranges(Tensor frame_mask, int hw, bool upstream) -> Tensor");
  // The CUDA kernels' per-thread bodies over their whole grids on the CPU,
  // block reduction emulated in the GPU's order (tests): (loss, grad_pred).
  m.def("_masked_mse_grid_walk(Tensor grad, Tensor pred, Tensor target, Tensor ranges) -> (Tensor, Tensor)");
}
