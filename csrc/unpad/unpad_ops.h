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
// uint64 (every index doubled). unit: bytes of one unit; rows[i]: the leading
// rows of entry i with anything to write.
struct Plan {
  int unit;
  int64_t world, bucket;
  std::vector<Entry> entries;
  std::vector<int64_t> rows;
};

// shard and begin may be anything up to 2^63 - 1 (only count and offset are
// bounded by a tensor's size), so each entry's rows with data are counted
// before scaling, and a value is scaled only where it is below a real size:
// begin < numel when a row has data, shard < numel when two rows do. Values that
// cannot matter are replaced by numel (a row start past the data).
inline Plan make_plan(const at::Tensor& gathered, at::TensorList out, at::IntArrayRef offset, at::IntArrayRef shard,
                      at::IntArrayRef begin, at::IntArrayRef count) {
  const int64_t es = static_cast<int64_t>(gathered.element_size());
  const int64_t f = es > 8 ? es / 8 : 1;
  const int64_t world = gathered.size(0);
  Plan p{static_cast<int>(es / f), world, gathered.size(1) * f, {}, {}};
  p.entries.reserve(out.size());
  p.rows.reserve(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t n = out[i].numel();
    void* dst = n ? out[i].data_ptr() : nullptr;
    const int64_t rows = rows_with_data(Entry{dst, n, shard[i], begin[i], count[i], offset[i]}, world);
    p.entries.push_back(
        Entry{dst, n * f, (rows >= 2 ? shard[i] : n) * f, (rows >= 1 ? begin[i] : n) * f, count[i] * f, offset[i] * f});
    p.rows.push_back(rows);
  }
  return p;
}

// The launch tables of a plan (the tables' own limits unless `lim` is smaller).
template <typename Table>
inline std::vector<Table> plan_tables(const Plan& p, TableLimits lim = {}) {
  return plan_launches<Table>(p.entries, [&](size_t i) { return blocks_of(p.entries[i], p.rows[i]); }, lim);
}

// Calls f(U{}) with the unsigned integer type of the plan's unit.
template <typename F>
inline void dispatch_unit(int unit, F&& f) {
  switch (unit) {
    case 1:
      return f(uint8_t{});
    case 2:
      return f(uint16_t{});
    case 4:
      return f(uint32_t{});
    default:
      return f(uint64_t{});
  }
}

}  // namespace unpad
}  // namespace opensora_fast
