// What is global to the extension: the opensora_fast operator namespace (each
// op adds its own schemas with TORCH_LIBRARY_FRAGMENT in csrc/<op>/<op>.cpp and
// its kernels in <op>_cpu.cpp / <op>_cuda.cu), and the Python module with
// build_info(). The one translation unit with torch/extension.h.
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>

#include "cpu_isa.h"
#include "multi_tensor.h"

#define OSF_STR2(x) #x
#define OSF_STR(x) OSF_STR2(x)

namespace opensora_fast {
namespace {
std::atomic<bool> g_force_small_tables{false};
std::atomic<bool> g_force_device_pointers{false};

// Set a switch, return its previous value (tests restore it).
bool set_force_small_tables(bool on) {
  return g_force_small_tables.exchange(on);
}
bool set_force_device_pointers(bool on) {
  return g_force_device_pointers.exchange(on);
}
}  // namespace

bool force_small_tables() {
  return g_force_small_tables.load(std::memory_order_relaxed);
}

// Read by unpad_cuda.cu (the one kernel writing host memory).
bool force_device_pointers() {
  return g_force_device_pointers.load(std::memory_order_relaxed);
}

namespace {
// Forces the CPU kernels' ISA variant (cpu_isa.h) when `isa` is given; returns
// the variant in use before.
std::string set_cpu_isa(const std::optional<std::string>& isa) {
  if (!isa)
    return cpu_isa::name(cpu_isa::current());
  const int want = cpu_isa::parse(isa->c_str());
  TORCH_CHECK_VALUE(want >= 0, "_cpu_isa: isa must be 'baseline', 'avx2' or 'avx512', got '", *isa, "'");
  TORCH_CHECK_VALUE(want <= cpu_isa::best(), "_cpu_isa: this CPU runs at most '", cpu_isa::name(cpu_isa::best()),
                    "', not '", *isa, "'");
  return cpu_isa::name(cpu_isa::set(want));
}
}  // namespace
}  // namespace opensora_fast

TORCH_LIBRARY(opensora_fast, m) {
  // Private, for tests: every CUDA launch uses the small (4 KiB) launch tables
  // (multi_tensor_cuda.cuh). Returns the previous setting.
  m.def("_force_small_tables(bool on) -> bool", &opensora_fast::set_force_small_tables);
  // Private, for tests: kernels writing pinned host memory look up its device
  // address (cudaPointerGetAttributes) even where the device can use the host
  // address (cudaDevAttrCanUseHostPointerForRegisteredMem). Returns the previous setting.
  m.def("_force_device_pointers(bool on) -> bool", &opensora_fast::set_force_device_pointers);
  // Private, for tests: the CPU kernels run ISA variant `isa` (baseline, avx2,
  // avx512; cpu_isa.h) from now on; no argument only reads. Returns the previous one.
  m.def("_cpu_isa(str? isa=None) -> str", &opensora_fast::set_cpu_isa);
}

namespace opensora_fast {
namespace ema {
void bind_plan(pybind11::module_& m);  // ema/ema_plan.cpp: update_ema's per-step fast path
}
}  // namespace opensora_fast

namespace {
std::string replace_all(std::string s, char from, char to) {
  std::replace(s.begin(), s.end(), from, to);
  return s;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  opensora_fast::ema::bind_plan(m);
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
    // whether the CPU kernels run their AVX2+FMA+F16C build (or a wider one)
    info["cpu_avx2_path"] = opensora_fast::cpu_has_avx2();
    // the CPU kernels' ISA variant in use (cpu_isa.h): baseline, avx2 or avx512
    info["cpu_isa"] = opensora_fast::cpu_isa::name(opensora_fast::cpu_isa::current());
    return info;
  });
}
