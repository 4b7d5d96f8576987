// Host side of the AdamW+EMA op, shared by adamw_ema.cpp (schema, checks,
// planning), adamw_ema_cpu.cpp and adamw_ema_cuda.cu. Every kernel runs
// check_inputs first, so nothing is written unless the whole call is valid.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "adamw_ema.h"

namespace opensora_fast {
namespace adamw_ema {

// One call's arguments, in schema order (adamw_ema.cpp).
struct Call {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  at::IntArrayRef group_sizes;
  at::ArrayRef<double> lr, beta1, beta2, eps, weight_decay;
  at::IntArrayRef amsgrad, maximize;
  at::TensorList ema, ema_src;
  double decay;
  bool stochastic;
  int64_t seed;
};

// The op's C++ parameters in schema order and the Call made of them, written
// once for as_op and as_walk_op.
#define OSF_ADAMW_EMA_PARAMS                                                                                      \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,               \
      at::TensorList max_exp_avg_sqs, at::TensorList steps, at::IntArrayRef group_sizes, at::ArrayRef<double> lr, \
      at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> eps,                           \
      at::ArrayRef<double> weight_decay, at::IntArrayRef amsgrad, at::IntArrayRef maximize, at::TensorList ema,   \
      at::TensorList ema_src, double decay, bool stochastic, int64_t seed
#define OSF_ADAMW_EMA_CALL                                                                                          \
  Call {                                                                                                            \
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_sizes, lr, beta1, beta2, eps, weight_decay, \
        amsgrad, maximize, ema, ema_src, decay, stochastic, seed                                                    \
  }

// The op's C++ signature: as_op<F> unpacks it into a Call.
template <void (*F)(const Call&)>
void as_op(OSF_ADAMW_EMA_PARAMS) {
  F(OSF_ADAMW_EMA_CALL);
}

// The grid-walk test op: the same arguments plus the table limits.
template <void (*F)(const Call&, int64_t, int64_t, bool)>
void as_walk_op(OSF_ADAMW_EMA_PARAMS, int64_t max_entries, int64_t max_blocks, bool small_table) {
  F(OSF_ADAMW_EMA_CALL, max_entries, max_blocks, small_table);
}

// Validates everything before anything is written; errors name the argument
// and index (the same type and text as opensora_fast/reference/adamw_ema.py).
void check_inputs(const Call& c);

// The entries of one EMA dtype (entries without an EMA twin join the first).
struct EntryGroup {
  c10::ScalarType ema_dtype;
  std::vector<Entry> entries;
};

// After check_inputs: increments every step, computes each tensor's constants
// from its new step, and pairs each EMA with its source: a param's twin joins
// that param's entry (the EMA reads the fresh master), any other pair becomes
// an EMA-only entry. Empty entries are left out.
std::vector<EntryGroup> prepare(const Call& c);

}  // namespace adamw_ema
}  // namespace opensora_fast
