// Unpad on the GPU: one launch per table of the shared launch core (one per bucket
// unless it holds more than 256 entries or 3072 chunks), on the current
// stream, no host sync. Destinations may be device memory or pinned host
// memory (written over the bus by the kernel, no staging copy; recorded on
// torch's pinned-memory allocator as a non-blocking copy_ would be).
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <atomic>

#include "../multi_tensor_cuda.cuh"
#include "unpad.h"
#include "unpad_ops.h"

namespace opensora_fast {

bool force_device_pointers();  // registration.cpp: op _force_device_pointers (tests)

namespace unpad {

namespace {

// Whether kernels on `device` may use the host address of registered
// (cudaHostRegister) memory; a driver query, cached per device.
bool host_addresses_usable(int device) {
  constexpr int kCached = 64;
  static std::atomic<int> known[kCached];  // 0: not asked yet, 1: usable, 2: not
  const bool cached = device >= 0 && device < kCached;
  if (cached) {
    const int k = known[device].load(std::memory_order_relaxed);
    if (k != 0)
      return k == 1;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrCanUseHostPointerForRegisteredMem, device));
  if (cached)
    known[device].store(v ? 1 : 2, std::memory_order_relaxed);
  return v != 0;
}

// Host destinations as the current device addresses them: on a device that
// cannot use the host address of registered memory, the address the driver
// maps it at (for cudaHostAlloc memory the two are the same).
void map_host_destinations(Plan& p, at::TensorList out, int device) {
  bool any_host = false;
  for (const at::Tensor& o : out)
    any_host = any_host || o.device().is_cpu();
  if (!any_host || (host_addresses_usable(device) && !force_device_pointers()))
    return;
  for (size_t i = 0; i < out.size(); ++i) {
    Entry& e = p.entries[i];
    if (!out[i].device().is_cpu() || e.dst == nullptr)
      continue;
    cudaPointerAttributes attr{};
    C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, e.dst));
    TORCH_CHECK(attr.devicePointer != nullptr, "unpad_: out[", i,
                "] is pinned host memory the CUDA device has no address for");
    e.dst = attr.devicePointer;
  }
}

// As copy_(non_blocking=True) does: torch's pinned-memory allocator must not
// hand a host destination to another allocation before `stream` has written it.
void record_host_destinations(at::TensorList out, const c10::cuda::CUDAStream& stream) {
  at::HostAllocator* alloc = nullptr;
  const void* last = nullptr;
  for (const at::Tensor& o : out) {
    if (!o.device().is_cpu() || o.numel() == 0)
      continue;
    void* ctx = o.storage().data_ptr().get_context();
    if (ctx != nullptr && ctx == last)
      continue;  // views of one allocation: one record
    last = ctx;
    if (alloc == nullptr)
      alloc = at::getHostAllocator(at::kCUDA);
    alloc->record_event(o.data_ptr(), ctx, stream.unwrap());  // false: not the allocator's memory
  }
}

void forward_cuda(const at::Tensor& gathered, at::TensorList out, at::IntArrayRef offset, at::IntArrayRef shard,
                  at::IntArrayRef begin, at::IntArrayRef count) {
  check_inputs(gathered, out, offset, shard, begin, count);
  if (out.empty() || gathered.numel() == 0)
    return;
  const c10::cuda::CUDAGuard guard(gathered.device());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  // Planning reads only pointers and sizes: no host sync.
  Plan p = make_plan(gathered, out, offset, shard, begin, count);
  map_host_destinations(p, out, gathered.get_device());
  const Args a{gathered.data_ptr(), p.bucket};
  dispatch_unit(p.unit, [&](auto u) {
    using U = decltype(u);
    with_table<BigTable, SmallTable>(false, [&](auto tt) {
      using Table = typename decltype(tt)::type;
      launch_tables<Body<U>, kThreads>(plan_tables<Table>(p), a, stream.stream());
    });
  });
  record_host_destinations(out, stream);
}

}  // namespace

}  // namespace unpad
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CUDA, m) {
  m.impl("unpad_", &opensora_fast::unpad::forward_cuda);
}
