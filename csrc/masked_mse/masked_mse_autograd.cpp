// Autograd of masked_mse in C++: a plain eager call (and a compiled graph's
// trace) is one dispatcher call, no Python on the way, forward or backward.
// Forward-mode tangents and torch.func transforms, which a C++ Function cannot
// serve (no jvp, no functorch rules), go to the Python rules registered for
// _masked_mse_autograd_py by opensora_fast/ops/masked_mse.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/neg.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace opensora_fast {
namespace masked_mse {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Fwd = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using Bwd = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
const c10::TypedOperatorHandle<Fwd>& forward_op() {
  static const auto h = op<Fwd>("opensora_fast::masked_mse");
  return h;
}
const c10::TypedOperatorHandle<Bwd>& backward_op() {
  static const auto h = op<Bwd>("opensora_fast::masked_mse_backward");
  return h;
}
const c10::TypedOperatorHandle<Fwd>& python_rules_op() {
  static const auto h = op<Fwd>("opensora_fast::_masked_mse_autograd_py");
  return h;
}

// torch._C._are_functorch_transforms_active(): a transform's layer keys in the TLS.
bool functorch_active() {
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// A forward-mode tangent (one level: torch has no nested forward AD).
bool has_tangent(const at::Tensor& t) {
  return t._fw_grad(/*level=*/0).defined();
}

// Autograd cannot save an inference tensor: a copy (which also keeps the
// backward right if the tensor is later changed in place in inference mode).
at::Tensor savable(const at::Tensor& t, bool graph) {
  return graph && t.is_inference() ? t.clone() : t;
}

struct MaskedMSEFunction : public torch::autograd::Function<MaskedMSEFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target,
                            const at::Tensor& ranges, bool graph) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;  // straight to the kernel
      out = forward_op().call(pred, target, ranges);
    }
    ctx->save_for_backward({savable(pred, graph), savable(target, graph), savable(ranges, graph)});
    return out;
  }

  // grad_pred = 2 (pred - target) g / (count_b B) inside the ranges, 0 outside;
  // grad_target = -grad_pred.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool want_pred = ctx->needs_input_grad(0), want_target = ctx->needs_input_grad(1);
    if (!(want_pred || want_target))
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    at::Tensor g;
    if (at::GradMode::is_enabled() || functorch_active()) {
      // a graph of the backward is wanted: the backward op's own autograd
      g = backward_op().call(grads[0], saved[0], saved[1], saved[2]);
    } else {
      at::AutoDispatchBelowADInplaceOrView below;
      g = backward_op().call(grads[0], saved[0], saved[1], saved[2]);
    }
    return {want_pred ? g : at::Tensor(), want_target ? at::neg(g) : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Defined, strided, not nested: what the kernels accept (and C++ autograd can wrap).
bool dense(const at::Tensor& t) {
  return t.defined() && t.layout() == at::kStrided && !t.is_nested();
}

at::Tensor masked_mse_autograd(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& ranges) {
  if (!(dense(pred) && dense(target) && dense(ranges))) {
    at::AutoDispatchBelowADInplaceOrView below;  // the kernels' checks name the bad argument
    return forward_op().call(pred, target, ranges);
  }
  if (functorch_active() || has_tangent(pred) || has_tangent(target))
    return python_rules_op().call(pred, target, ranges);
  const bool graph = at::GradMode::is_enabled() && (pred.requires_grad() || target.requires_grad());
  return MaskedMSEFunction::apply(pred, target, ranges, graph);
}

// Reached only when opensora_fast.ops has not registered the Python rules.
at::Tensor python_rules_missing(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK_NOT_IMPLEMENTED(false,
                              "masked_mse: forward-mode AD and torch.func transforms need the rules in "
                              "opensora_fast.ops.masked_mse (import opensora_fast)");
}

}  // namespace

}  // namespace masked_mse
}  // namespace opensora_fast

TORCH_LIBRARY_FRAGMENT(opensora_fast, m) {
  // masked_mse's autograd for forward-mode tangents and torch.func transforms
  // (Python rules); the plain reverse mode is the C++ Function above.
  m.def("_masked_mse_autograd_py(Tensor pred, Tensor target, Tensor ranges) -> Tensor");
}

TORCH_LIBRARY_IMPL(opensora_fast, Autograd, m) {
  m.impl("masked_mse", &opensora_fast::masked_mse::masked_mse_autograd);
}

TORCH_LIBRARY_IMPL(opensora_fast, CompositeExplicitAutograd, m) {
  m.impl("_masked_mse_autograd_py", &opensora_fast::masked_mse::python_rules_missing);
}
