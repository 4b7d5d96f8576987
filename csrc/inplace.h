// The rules torch's own in-place ops follow, written once for every op that
// writes into caller tensors (ema_update_, condition_cat_, unpad_, adamw_ema_).
// Each op registers them with OSF_REGISTER_INPLACE: Kernels<...>::autograd at
// the Autograd key, ::inplace at the ADInplaceOrView key, its fallback at
// CompositeExplicitAutograd:
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
#include <torch/library.h>

#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace opensora_fast {
namespace inplace {

// "<op>: <arg>[<index>] requires grad ..." (no index for a single tensor).
inline void refuse_grad(const char* op, const char* arg, const at::Tensor& t, int64_t index = -1) {
  if (!t.defined() || !t.requires_grad())
    return;
  if (index < 0)
    TORCH_CHECK(false, op, ": ", arg, " requires grad and grad mode is on; ", op,
                " is not differentiable: call it under torch.no_grad()");
  TORCH_CHECK(false, op, ": ", arg, "[", index, "] requires grad and grad mode is on; ", op,
              " is not differentiable: call it under torch.no_grad()");
}

inline void refuse_grad(const char* op, const char* arg, at::TensorList ts) {
  for (size_t i = 0; i < ts.size(); ++i)
    refuse_grad(op, arg, ts[i], static_cast<int64_t>(i));
}

inline void bump(const at::Tensor& t) {
  if (t.defined() && !t.is_inference())
    t.unsafeGetTensorImpl()->bump_version();
}

inline void bump(at::TensorList ts) {
  for (const at::Tensor& t : ts)
    bump(t);
}

// The schema positions of the arguments an op writes, e.g. Written<0> or
// Written<0, 2, 3>: refused when they require grad, bumped after the call.
template <size_t... I>
struct Written {};

// Op: a struct with `qualified` ("opensora_fast::ema_update_") and, optionally,
// `static void refuse_inputs(Args...)`: a further grad-mode rule on the read
// arguments, run after the written ones. The errors take the op's and the
// written arguments' names from the schema.
template <typename Op, typename W, typename Sig>
struct Kernels;

template <typename Op, typename = void>
struct has_input_rule : std::false_type {};
template <typename Op>
struct has_input_rule<Op, std::void_t<decltype(&Op::refuse_inputs)>> : std::true_type {};

template <typename Op, size_t... W, typename... Args>
struct Kernels<Op, Written<W...>, void(Args...)> {
  static c10::TypedOperatorHandle<void(Args...)> handle() {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Op::qualified, "").template typed<void(Args...)>();
    return op;
  }

  // The op's unqualified name, then the name of each written argument.
  static const std::vector<std::string>& names() {
    static const std::vector<std::string> n = [] {
      const c10::FunctionSchema& s = handle().schema();
      const std::string& q = s.name();
      const size_t colon = q.rfind("::");
      return std::vector<std::string>{colon == std::string::npos ? q : q.substr(colon + 2), s.arguments()[W].name()...};
    }();
    return n;
  }

  static void autograd(Args... args) {
    if (c10::GradMode::is_enabled()) {
      const auto all = std::forward_as_tuple(args...);
      size_t k = 0;
      (refuse_grad(names()[0].c_str(), names()[++k].c_str(), std::get<W>(all)), ...);
      if constexpr (has_input_rule<Op>::value)
        Op::refuse_inputs(args...);
    }
    at::AutoDispatchBelowAutograd guard;
    handle().call(args...);
  }

  static void inplace(Args... args) {
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      handle().call(args...);
    }
    const auto all = std::forward_as_tuple(args...);
    (bump(std::get<W>(all)), ...);
  }
};

}  // namespace inplace
}  // namespace opensora_fast

// torch's in-place rules for a mutating op (name unquoted, as in its schema):
// inplace::Kernels at the Autograd and ADInplaceOrView keys, and `fallback`
// (the checks, then "no kernel") for every backend without one.
#define OSF_REGISTER_INPLACE(op_name, KernelsType, fallback)        \
  TORCH_LIBRARY_IMPL(opensora_fast, Autograd, m) {                  \
    m.impl(#op_name, &KernelsType::autograd);                       \
  }                                                                 \
  TORCH_LIBRARY_IMPL(opensora_fast, ADInplaceOrView, m) {           \
    m.impl(#op_name, &KernelsType::inplace);                        \
  }                                                                 \
  TORCH_LIBRARY_IMPL(opensora_fast, CompositeExplicitAutograd, m) { \
    m.impl(#op_name, fallback);                                     \
  }
