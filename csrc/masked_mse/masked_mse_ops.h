// Host side of the masked MSE ops (see masked_mse.h for the math), shared by
// masked_mse.cpp (schemas, checks), masked_mse_cpu.cpp and masked_mse_cuda.cu.
#pragma once

#include <ATen/core/Tensor.h>

namespace opensora_fast {
namespace masked_mse {

// pred, target [B, L, D] same dtype (fp32/bf16/fp16/fp64), dense, contiguous,
// same device; ranges int64 [B, 2] on that device. Errors name the argument
// (the same text as opensora_fast/reference/masked_mse.py check_inputs).
void check_inputs(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& ranges);
// grad: the incoming gradient of the loss, a real floating 0-dim tensor on pred's device.
void check_grad(const at::Tensor& grad, const at::Tensor& pred);

// frame_mask: [B, T] (any strides) of a real or bool dtype, T >= 1; hw >= 0
// with T * hw in int64.
void check_loss_ranges(const at::Tensor& frame_mask, int64_t hw);

// The frame-mask dtypes of loss_ranges, for AT_DISPATCH_V2 (<ATen/Dispatch_v2.h>);
// check_loss_ranges accepts exactly these.
#define OSF_MASK_TYPES                                                                           \
  AT_EXPAND(AT_INTEGRAL_TYPES_V2), at::kBool, at::kHalf, at::kBFloat16, at::kFloat, at::kDouble, \
      AT_EXPAND(AT_FLOAT8_TYPES)

// The loss's dtype: fp32, or fp64 for fp64 inputs.
inline c10::ScalarType acc_dtype(const at::Tensor& pred) {
  return pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace masked_mse
}  // namespace opensora_fast
