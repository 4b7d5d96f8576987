// Host side of the conditioning ops, shared by the CPU and CUDA files: input
// checks, the output geometry, and the per-dtype grouping of pieces.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "condition.h"

namespace opensora_fast {
namespace condition {

// Everything the reference checks (opensora_fast/reference/condition.py), in the
// same order with the same messages, before anything is written. op is
// "condition" (out = z [B,C,T,H,W]) or "condition_cat_" (out = cond [B,1+C,T,H,W]).
void check_inputs(const char* op, const at::Tensor& out, at::TensorList sources, c10::IntArrayRef plan);

// Calls f(Tag<D>{}, Tag<S>{}) for an (output, source) dtype pair (both checked).
template <typename F>
inline void dispatch_pair(c10::ScalarType d, c10::ScalarType s, F&& f) {
  dispatch_float_pair<true>(d, s, "condition", "output", "source", std::forward<F>(f));
}

inline Source source_of(const at::Tensor& s) {
  return Source{s.const_data_ptr(), s.stride(0), s.stride(1), s.stride(2), s.stride(3)};
}

// The two-tensor form: masks [B,1,T,H,W] and masked [B,C,T,H,W], each with
// [T,H,W]-contiguous planes (any batch stride).
inline Geometry geometry(at::Tensor& masks, at::Tensor& masked) {
  return Geometry{masks.data_ptr(), masked.data_ptr(), masks.stride(0), masked.stride(0),
                  masked.size(1),   masked.size(2),    masked.size(3),  masked.size(4)};
}

// The cat form: cond [B,1+C,T,H,W] contiguous; channel 0 is the mask.
inline Geometry cat_geometry(at::Tensor& cond) {
  const int64_t T = cond.size(2), H = cond.size(3), W = cond.size(4);
  char* base = static_cast<char*>(cond.data_ptr());
  return Geometry{base, base + T * H * W * cond.element_size(), cond.stride(0), cond.stride(0), cond.size(1) - 1, T, H,
                  W};
}

struct Group {
  c10::ScalarType src_dtype;
  std::vector<Piece> pieces;
};

// Pieces by source dtype for the GPU launches; unconditioned pieces join the
// first group (or form one, read as float, when nothing is conditioned).
inline std::vector<Group> group_by_dtype(const std::vector<Piece>& pieces, at::TensorList sources) {
  std::vector<Group> groups;
  std::vector<Piece> blank;
  for (const Piece& p : pieces) {
    if (p.src < 0) {
      blank.push_back(p);
      continue;
    }
    const auto d = sources[p.src].scalar_type();
    auto g = std::find_if(groups.begin(), groups.end(), [&](const Group& x) { return x.src_dtype == d; });
    if (g == groups.end())
      g = groups.insert(groups.end(), Group{d, {}});
    g->pieces.push_back(p);
  }
  if (!blank.empty()) {
    if (groups.empty())
      groups.push_back(Group{c10::ScalarType::Float, {}});
    groups[0].pieces.insert(groups[0].pieces.end(), blank.begin(), blank.end());
  }
  return groups;
}

inline std::vector<Source> sources_of(at::TensorList sources) {
  std::vector<Source> out;
  out.reserve(sources.size());
  for (const at::Tensor& s : sources)
    out.push_back(source_of(s));
  return out;
}

// CPU kernels (condition_cpu.cpp); the CUDA ones are registered in condition_cuda.cu.
void run_cpu(const Geometry& g, at::TensorList sources, const std::vector<Piece>& pieces, c10::ScalarType out_dtype);

}  // namespace condition
}  // namespace opensora_fast
