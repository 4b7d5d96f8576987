// What is global to the extension: the opensora_fast operator namespace (each
// op adds its own schemas with TORCH_LIBRARY_FRAGMENT in csrc/<op>/<op>.cpp and
// its kernels in <op>_cpu.cpp / <op>_cuda.cu), and the Python module with
// build_info(). The one translation unit with torch/extension.h.
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "cpu_isa.h"
#include "multi_tensor.h"

#define OSF_STR2(x) #x
#define OSF_STR(x) OSF_STR2(x)

namespace opensora_fast {
namespace {
std::atomic<bool> g_force_small_tables{false};

// Sets the switch, returns its previous value (tests restore it).
bool set_force_small_tables(bool on) {
  return g_force_small_tables.exchange(on);
}
}  // namespace

bool force_small_tables() {
  return g_force_small_tables.load(std::memory_order_relaxed);
}
}  // namespace opensora_fast

TORCH_LIBRARY(opensora_fast, m) {
  // Private, for tests: every CUDA launch uses the small (4 KiB) launch tables
  // (multi_tensor_cuda.cuh). Returns the previous setting.
  m.def("_force_small_tables(bool on) -> bool", &opensora_fast::set_force_small_tables);
}

namespace {
std::string replace_all(std::string s, char from, char to) {
  std::replace(s.begin(), s.end(), from, to);
  return s;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def("build_info", []() {
    pybind11::dict info;
    info["torch"] = OSF_STR(OSF_TORCH_VERSION);
#ifdef OSF_WITH_CUDA
    info["cuda_kernels"] = true;
    info["cuda"] = OSF_STR(OSF_TORCH_CUDA);
    // setup.py passes the arch list with '_' for ';' (shell-safe).
    info["cuda_archs"] = replace_all(OSF_STR(OSF_CUDA_ARCHS), '_', ';');
#else
    info["cuda_kernels"] = false;
    info["cuda"] = pybind11::none();
    info["cuda_archs"] = "";
#endif
    // whether the CPU kernels run their AVX2+FMA+F16C build on this machine
    info["cpu_avx2_path"] = opensora_fast::cpu_has_avx2();
    return info;
  });
}
