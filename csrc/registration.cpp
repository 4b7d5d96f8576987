// The one translation unit with torch/extension.h: op schemas, kernel
// registration per device, and the Python module with build_info().
#include <torch/extension.h>
#include <torch/library.h>

#include "ema/ema_ops.h"

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
                         int64_t seed) {
  ema::check_ema_inputs(ema, src, decay);
  ema::ema_grid_walk_cpu(ema, src, decay, stochastic, seed);
}

#ifdef OSF_WITH_CUDA
void ema_update_cuda_entry(at::TensorList ema, at::TensorList src, double decay, bool stochastic,
                           int64_t seed) {
  ema::check_ema_inputs(ema, src, decay);
  ema::ema_update_cuda(ema, src, decay, stochastic, seed);
}
#endif

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
      "bool stochastic=False, int seed=0) -> ()");
}

TORCH_LIBRARY_IMPL(opensora_fast, CPU, m) {
  m.impl("ema_update_", &opensora_fast::ema_update_cpu_entry);
  m.impl("_ema_update_grid_walk_", &opensora_fast::ema_grid_walk_entry);
}

#ifdef OSF_WITH_CUDA
TORCH_LIBRARY_IMPL(opensora_fast, CUDA, m) {
  m.impl("ema_update_", &opensora_fast::ema_update_cuda_entry);
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
    info["cpu_avx2_path"] =
#if defined(__x86_64__) && defined(__GNUC__)
        true;
#else
        false;
#endif
    return info;
  });
}
