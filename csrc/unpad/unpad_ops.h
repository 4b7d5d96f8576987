// Host side of the unpad op, shared by unpad.cpp (schema, checks),
// unpad_cpu.cpp and unpad_cuda.cu. Each device kernel calls check_inputs
// first, so nothing is written unless the whole call is valid.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "unpad.h"

namespace opensora_fast {
namespace unpad {

// Validates everything before anything is written; errors name the argument
// and the entry index (ValueError / TypeError / RuntimeError in Python, the
// same text as opensora_fast/reference/unpad.py check_inputs).
void check_inputs(const at::Tensor& gathered, at::TensorList out, at::IntArrayRef offset, at::IntArrayRef shard,
                  at::IntArrayRef begin, at::IntArrayRef count);

// The geometry of a checked call in copy units: elements of up to 8 bytes are
// moved as one unsigned integer of their size; 16-byte elements as two
// uint64 (every index doubled). unit: bytes of one unit.
struct Plan {
  int unit;
  int64_t world, bucket;
  std::vector<void*> dst;
  std::vector<Entry> entries;
};

inline Plan make_plan(const at::Tensor& gathered, at::TensorList out, at::IntArrayRef offset,
                      at::IntArrayRef shard, at::IntArrayRef begin, at::IntArrayRef count) {
  const int64_t es = static_cast<int64_t>(gathered.element_size());
  const int64_t f = es > 8 ? es / 8 : 1;
  Plan p{static_cast<int>(es / f), gathered.size(0), gathered.size(1) * f, {}, {}};
  p.dst.reserve(out.size());
  p.entries.reserve(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    p.dst.push_back(out[i].numel() ? out[i].data_ptr() : nullptr);
    p.entries.push_back(Entry{out[i].numel() * f, shard[i] * f, begin[i] * f, count[i] * f, offset[i] * f});
  }
  return p;
}

// Calls f(U{}) with the unsigned integer type of the plan's unit.
template <typename F>
inline void dispatch_unit(int unit, F&& f) {
  switch (unit) {
    case 1: return f(uint8_t{});
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    default: return f(uint64_t{});
  }
}

}  // namespace unpad
}  // namespace opensora_fast
