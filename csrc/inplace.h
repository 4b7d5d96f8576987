// The rules torch's own in-place ops follow, written once for every op that
// writes into caller tensors (ema_update_, condition_cat_, unpad_). Each op
// registers Kernels<...>::autograd at the Autograd key and ::inplace at the
// ADInplaceOrView key:
//   autograd: the ops are not differentiable, so writing into a tensor that
//             requires grad while grad mode is on is refused; then run below autograd.
//   inplace:  run, then bump the version counter of every written tensor, so
//             autograd notices that a tensor saved for backward was modified.
// Inference tensors have neither key; each op's check_inputs refuses them
// outside inference mode.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>

#include <tuple>
#include <utility>

namespace opensora_fast {
namespace inplace {

// "<op>: <arg>[<index>] requires grad ..." (no index for a single tensor).
inline void refuse_grad(const char* op, const char* arg, const at::Tensor& t, int64_t index = -1) {
  if (!t.defined() || !t.requires_grad()) return;
  if (index < 0)
    TORCH_CHECK(false, op, ": ", arg, " requires grad and grad mode is on; ", op,
                " is not differentiable: call it under torch.no_grad()");
  TORCH_CHECK(false, op, ": ", arg, "[", index, "] requires grad and grad mode is on; ", op,
              " is not differentiable: call it under torch.no_grad()");
}

inline void refuse_grad(const char* op, const char* arg, at::TensorList ts) {
  for (size_t i = 0; i < ts.size(); ++i) refuse_grad(op, arg, ts[i], static_cast<int64_t>(i));
}

inline void bump(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

inline void bump(at::TensorList ts) {
  for (const at::Tensor& t : ts) bump(t);
}

// Op: a struct with `qualified` ("opensora_fast::ema_update_"), `name`
// ("ema_update_"), `arg` ("ema") and `written` (the position of the written
// argument in the schema); Args: the op's C++ argument types.
template <typename Op, typename... Args>
struct Kernels {
  static c10::TypedOperatorHandle<void(Args...)> handle() {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Op::qualified, "").template typed<void(Args...)>();
    return op;
  }

  static void autograd(Args... args) {
    if (c10::GradMode::is_enabled()) refuse_grad(Op::name, Op::arg, std::get<Op::written>(std::forward_as_tuple(args...)));
    at::AutoDispatchBelowAutograd guard;
    handle().call(args...);
  }

  static void inplace(Args... args) {
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      handle().call(args...);
    }
    bump(std::get<Op::written>(std::forward_as_tuple(args...)));
  }
};

}  // namespace inplace
}  // namespace opensora_fast
