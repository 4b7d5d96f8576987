// Host entry points of the masked MSE ops (see masked_mse.h for the math).
#pragma once

#include <ATen/core/Tensor.h>

namespace opensora_fast {
namespace masked_mse {

// pred, target [B, L, D] same dtype (fp32/bf16/fp16/fp64) and device,
// ranges int64 [B, 2] on that device. Errors name the argument.
void check_inputs(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& ranges);

// partial: [B, max_chunks] in the accumulation dtype; loss: 0-dim, same dtype.
void forward_cpu(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& ranges,
                 at::Tensor& partial, at::Tensor& loss);
void backward_cpu(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                  const at::Tensor& ranges, at::Tensor& grad_pred);

// The CUDA kernels' per-thread bodies over their whole grids on the CPU, with
// the block reduction emulated in the GPU's order: a test of GPU geometry.
void grid_walk(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
               const at::Tensor& ranges, at::Tensor& loss, at::Tensor& grad_pred);

#ifdef OSF_WITH_CUDA
void forward_cuda(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& ranges,
                  at::Tensor& partial, at::Tensor& loss);
void backward_cuda(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                   const at::Tensor& ranges, at::Tensor& grad_pred);
#endif

}  // namespace masked_mse
}  // namespace opensora_fast
