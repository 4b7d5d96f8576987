// Unpad op: schemas, the input checks every kernel runs first, and the
// device-independent kernels (autograd rule, version counter, empty calls).
// The index map is in unpad.h; unpad_cpu.cpp / unpad_cuda.cu register devices.
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <string>

#include "../host.h"
#include "../inplace.h"
#include "unpad_ops.h"

namespace opensora_fast {
namespace unpad {

namespace {

struct UnpadOp {
  static constexpr const char* qualified = "opensora_fast::unpad_";
};
using UnpadKernels = inplace::Kernels<UnpadOp, inplace::Written<1>,
                                      void(const at::Tensor&, at::TensorList, at::IntArrayRef, at::IntArrayRef,
                                           at::IntArrayRef, at::IntArrayRef)>;

// Any other backend (meta included): validate, then say there is no kernel.
void fallback_kernel(const at::Tensor& gathered, at::TensorList out, at::IntArrayRef offset, at::IntArrayRef shard,
                     at::IntArrayRef begin, at::IntArrayRef count) {
  check_inputs(gathered, out, offset, shard, begin, count);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "unpad_: no kernel for tensors on ", gathered.device(),
                              " (native kernels: cpu, cuda)");
}

void walk_fallback(const at::Tensor& gathered, at::TensorList out, at::IntArrayRef offset, at::IntArrayRef shard,
                   at::IntArrayRef begin, at::IntArrayRef count, int64_t, int64_t, bool) {
  fallback_kernel(gathered, out, offset, shard, begin, count);
}

std::string span_name(const Span& s) {
  return s.index < 0 ? std::string(s.arg) : std::string(s.arg) + "[" + std::to_string(s.index) + "]";
}

}  // namespace

void check_inputs(const at::Tensor& gathered, at::TensorList out, at::IntArrayRef offset, at::IntArrayRef shard,
                  at::IntArrayRef begin, at::IntArrayRef count) {
  const size_t n = out.size();
  TORCH_CHECK_VALUE(offset.size() == n && shard.size() == n && begin.size() == n && count.size() == n,
                    "unpad_: offset, shard, begin and count must each have len(out)=", n, " entries, got ",
                    offset.size(), ", ", shard.size(), ", ", begin.size(), " and ", count.size());
  TORCH_CHECK_VALUE(gathered.defined() && gathered.layout() == at::kStrided && !gathered.is_nested(),
                    "unpad_: gathered must be a dense (strided) tensor");
  TORCH_CHECK_VALUE(gathered.dim() == 2, "unpad_: gathered must be [world, bucket], got shape ", gathered.sizes());
  TORCH_CHECK_VALUE(gathered.size(0) >= 1, "unpad_: gathered must have at least one row (world >= 1), got shape ",
                    gathered.sizes());
  TORCH_CHECK_VALUE(gathered.is_contiguous(), "unpad_: gathered is not contiguous");
  const int64_t world = gathered.size(0), bucket = gathered.size(1);
  const bool cuda_src = gathered.device().type() == c10::DeviceType::CUDA;
  const bool meta = gathered.device().type() == c10::DeviceType::Meta;
  std::vector<Span> spans;
  spans.reserve(n + 1);
  const auto addr = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& o = out[i];
    TORCH_CHECK_VALUE(o.defined() && o.layout() == at::kStrided && !o.is_nested(), "unpad_: out[", i,
                      "] must be a dense (strided) tensor");
    TORCH_CHECK_TYPE(o.scalar_type() == gathered.scalar_type(), "unpad_: out[", i, "] has dtype ",
                     dtype_name(o.scalar_type()), " but gathered has dtype ", dtype_name(gathered.scalar_type()));
    const bool host_ok = cuda_src && o.device().type() == c10::DeviceType::CPU && o.is_pinned();
    TORCH_CHECK_VALUE(o.device() == gathered.device() || host_ok, "unpad_: out[", i, "] is on ", o.device(),
                      " but gathered is on ", gathered.device(),
                      " (out must be on gathered's device, or in pinned host memory when gathered is on CUDA)");
    TORCH_CHECK_VALUE(o.is_contiguous(), "unpad_: out[", i, "] is not contiguous");
    TORCH_CHECK(!o.is_inference() || c10::InferenceMode::is_enabled(), "unpad_: out[", i,
                "] is an inference tensor; it can only be written in place inside torch.inference_mode()");
    TORCH_CHECK_VALUE(offset[i] >= 0 && shard[i] >= 0 && begin[i] >= 0 && count[i] >= 0, "unpad_: entry ", i,
                      ": offset, shard, begin and count must be >= 0, got offset=", offset[i], ", shard=", shard[i],
                      ", begin=", begin[i], ", count=", count[i]);
    TORCH_CHECK_VALUE(count[i] <= shard[i] - begin[i], "unpad_: entry ", i, ": begin + count = ", begin[i], " + ",
                      count[i], " exceeds shard = ", shard[i]);
    TORCH_CHECK_VALUE(count[i] <= bucket - offset[i], "unpad_: entry ", i, ": offset + count = ", offset[i], " + ",
                      count[i], " exceeds the bucket's ", bucket, " columns");
    // world * shard >= numel, without overflow (numel can be near 2^63 on meta).
    const int64_t need = o.numel() / world + (o.numel() % world != 0);
    TORCH_CHECK_VALUE(shard[i] >= need, "unpad_: out[", i, "] has ", o.numel(), " elements but world * shard = ", world,
                      " * ", shard[i], " covers fewer");
    if (!meta && o.device().type() != c10::DeviceType::Meta)
      spans.push_back(Span{addr(o), addr(o) + o.nbytes(), true, "out", static_cast<int64_t>(i)});
  }
  if (!meta)
    spans.push_back(Span{addr(gathered), addr(gathered) + gathered.nbytes(), false, "gathered", -1});
  // Written memory must alias nothing else of the call: blocks and threads
  // run in no fixed order.
  Span a{}, b{};
  TORCH_CHECK_VALUE(!find_overlap(std::move(spans), &a, &b), "unpad_: ", span_name(a), " and ", span_name(b),
                    " overlap in memory; every out tensor must share no memory with gathered or another out");
}

}  // namespace unpad
}  // namespace opensora_fast

TORCH_LIBRARY_FRAGMENT(opensora_fast, m) {
  m.def("unpad_(Tensor gathered, Tensor(a!)[] out, int[] offset, int[] shard, int[] begin, int[] count) -> ()");
  // The CUDA kernel's per-thread body over its whole launch grid, on the CPU
  // (tests): max_entries/max_blocks shrink the tables, small_table picks the
  // 4 KiB table used with older CUDA.
  m.def(
      "_unpad_grid_walk(Tensor gathered, Tensor(a!)[] out, int[] offset, int[] shard, int[] begin, int[] count, "
      "int max_entries=0, int max_blocks=0, bool small_table=False) -> ()");
}

OSF_REGISTER_INPLACE(unpad_, opensora_fast::unpad::UnpadKernels, &opensora_fast::unpad::fallback_kernel)

TORCH_LIBRARY_IMPL(opensora_fast, CompositeExplicitAutograd, m) {
  m.impl("_unpad_grid_walk", &opensora_fast::unpad::walk_fallback);
}

// Nested tensors are no backend of CompositeExplicitAutograd: without these the
// dispatcher's NotImplementedError would come before the checks' ValueError.
TORCH_LIBRARY_IMPL(opensora_fast, NestedTensorCPU, m) {
  m.impl("unpad_", &opensora_fast::unpad::fallback_kernel);
  m.impl("_unpad_grid_walk", &opensora_fast::unpad::walk_fallback);
}

TORCH_LIBRARY_IMPL(opensora_fast, NestedTensorCUDA, m) {
  m.impl("unpad_", &opensora_fast::unpad::fallback_kernel);
}
