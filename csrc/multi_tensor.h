// The one multi-tensor launch core, shared by every op whose CUDA kernel walks a
// table of entries (tensors, bucket entries, frame runs) that travels as a kernel
// argument. An op supplies only
//   - its Entry struct (what one block needs to find its data),
//   - its Body: a struct with
//       static OSF_HOST_DEVICE void run(const Table&, const Args&, int block, int y, int thread, int nthreads)
//     (y: blockIdx.y, for ops with a second grid dimension; 0 otherwise),
//   - how many blocks each entry takes.
// This header plans the tables and walks their grid on the CPU (walk_grid, the
// tests' view of the GPU geometry); multi_tensor_cuda.cuh launches the same
// tables with the same Body on the GPU.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common.h"

namespace opensora_fast {

// No per-table payload beyond the entries.
struct NoExtra {};

// Entries, and for every block of the launch the entry it works on and its chunk
// number within that entry. Extra: a per-table payload some ops need (the
// conditioning op's table of sources).
template <typename Entry, int MaxEntries, int MaxBlocks, typename Extra = NoExtra>
struct LaunchTable {
  static constexpr int kMaxEntries = MaxEntries;
  static constexpr int kMaxBlocks = MaxBlocks;
  using entry_type = Entry;
  Entry entry[MaxEntries];
  int16_t block_entry[MaxBlocks];
  int32_t block_chunk[MaxBlocks];
  int32_t n_blocks;
  int32_t n_entries;
  Extra extra;
  static_assert(MaxEntries <= 32767, "block_entry is int16");
};

// Kernel argument budgets (bytes) of the big and small tables, and what a
// launch of multi_tensor_kernel passes: the table, the op's Args, and y_base.
constexpr size_t kBigArgBytes = 32000;
constexpr size_t kSmallArgBytes = 4000;
template <typename Table, typename Args>
constexpr size_t kernel_arg_bytes() {
  return sizeof(Table) + sizeof(Args) + sizeof(int);
}

// Smaller limits than a table's own (tests use them to exercise every split); 0
// keeps the table's.
struct TableLimits {
  int64_t max_entries = 0;
  int64_t max_blocks = 0;
};

// Each entry always enters a table that has room for it: the default admission.
struct AdmitAll {
  template <typename Table, typename Entry>
  bool operator()(Table& tab, const Entry& e) const {
    tab.entry[tab.n_entries] = e;
    return true;
  }
};

// Splits `entries` into launch tables. blocks(i) is the number of blocks entry i
// takes (chunk numbers 0..blocks(i)-1, 0 for an entry with nothing to do; at most
// 2^31 - 1). admit(table, entry) writes the entry into table.entry[table.n_entries]
// (the planner then counts it), or returns false when the table lacks room for a
// resource the entry needs beyond the entry itself (the planner then opens a new
// table and asks again; a fresh table must admit every entry). An entry whose
// blocks fill a table continues in the next one.
template <typename Table, typename Entry, typename BlocksFn, typename Admit = AdmitAll>
inline std::vector<Table> plan_launches(const std::vector<Entry>& entries, BlocksFn&& blocks, TableLimits lim = {},
                                        Admit&& admit = Admit{}) {
  const auto limit = [](int64_t v, int cap) { return (v > 0 && v < cap) ? static_cast<int>(v) : cap; };
  const int max_entries = limit(lim.max_entries, Table::kMaxEntries);
  const int max_blocks = limit(lim.max_blocks, Table::kMaxBlocks);
  std::vector<Table> out;
  Table* cur = nullptr;  // tables are large: each is built in place in `out`
  const auto open = [&]() {
    out.emplace_back();  // value-initialised: zero counts, zero extra
    cur = &out.back();
  };
  for (size_t i = 0; i < entries.size(); ++i) {
    const int64_t n = blocks(i);
    TORCH_CHECK(n >= 0 && n <= INT32_MAX, "internal: an entry of ", n, " blocks");
    for (int64_t c = 0; c < n; ++c) {
      if (cur == nullptr || cur->n_blocks == max_blocks)
        open();
      if (c == 0 || cur->n_blocks == 0) {  // the entry enters this table
        if (cur->n_entries == max_entries)
          open();
        if (!admit(*cur, entries[i])) {
          open();
          TORCH_CHECK(admit(*cur, entries[i]), "internal: an empty launch table refused an entry");
        }
        ++cur->n_entries;
      }
      cur->block_entry[cur->n_blocks] = static_cast<int16_t>(cur->n_entries - 1);
      cur->block_chunk[cur->n_blocks] = static_cast<int32_t>(c);
      ++cur->n_blocks;
    }
  }
  return out;
}

// Every (block, y, thread) of every table in turn, as the GPU would run them
// with `threads` threads a block and grid_y rows: the CPU tests' walk of the
// CUDA grid.
template <typename Body, typename Table, typename Args>
inline void walk_grid(const std::vector<Table>& tables, const Args& args, int threads, int64_t grid_y = 1) {
  for (const Table& tab : tables)
    for (int64_t y = 0; y < grid_y; ++y)
      for (int b = 0; b < tab.n_blocks; ++b)
        for (int t = 0; t < threads; ++t)
          Body::run(tab, args, b, static_cast<int>(y), t, threads);
}

// ---------------------------------------------------------------------------
// Persistent (grid-strided) launches: a table of entries, each owning a number
// of work units numbered end to end (first_unit: the prefix count), and a grid
// of a fixed number of blocks, block b taking units b, b + grid, b + 2 grid, ...
// A whole table is one launch whatever its unit count, so tables split only by
// entry count. An entry of 0 units rides with the entry before it: the planner
// keeps the two in one table and the body of that entry's units handles both
// (the EMA packs small tensors several to a unit so).
template <typename Entry, int MaxEntries>
struct StridedTable {
  static constexpr int kMaxEntries = MaxEntries;
  using entry_type = Entry;
  Entry entry[MaxEntries];
  int32_t first_unit[MaxEntries];  // non-decreasing, first_unit[0] = 0
  int32_t n_entries;
  int32_t n_units;
};

// The entry that owns unit u (0 <= u < n_units): the last entry whose
// first_unit is <= u, which always has units (a rider shares its first_unit
// with the next entry that has any). Uniform across a block: no divergence.
template <typename Table>
OSF_INLINE int strided_entry(const Table& tab, int32_t u) {
  int lo = 0, hi = tab.n_entries - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tab.first_unit[mid] <= u)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Splits `entries` into strided tables; units(i) >= 0 is entry i's unit count
// (0: a rider of the entry before; the first entry must have units). Each
// table holds at most max_entries entries (0: the table's own limit), never
// splits an entry from its riders, and at most INT32_MAX units.
template <typename Table, typename Entry, typename UnitsFn>
inline std::vector<Table> plan_strided(const std::vector<Entry>& entries, UnitsFn&& units, int64_t max_entries = 0) {
  const int cap =
      (max_entries > 0 && max_entries < Table::kMaxEntries) ? static_cast<int>(max_entries) : Table::kMaxEntries;
  std::vector<Table> out;
  size_t i = 0;
  while (i < entries.size()) {
    const int64_t n = units(i);
    TORCH_CHECK(n > 0 && n <= INT32_MAX, "internal: a strided entry leads with ", n, " units");
    size_t end = i + 1;  // the entry and its riders
    while (end < entries.size() && units(end) == 0)
      ++end;
    const int group = static_cast<int>(end - i);
    TORCH_CHECK(group <= cap, "internal: ", group, " riding entries exceed a table of ", cap);
    if (out.empty() || out.back().n_entries + group > cap || out.back().n_units > INT32_MAX - n)
      out.emplace_back();  // value-initialised: zero counts
    Table& tab = out.back();
    for (size_t k = i; k < end; ++k) {
      tab.entry[tab.n_entries] = entries[k];
      tab.first_unit[tab.n_entries] = tab.n_units + (k == i ? 0 : static_cast<int32_t>(n));
      ++tab.n_entries;
    }
    tab.n_units += static_cast<int32_t>(n);
    i = end;
  }
  return out;
}

// The grid of a strided launch: one block per unit up to max_grid blocks.
inline int strided_grid(int32_t n_units, int64_t max_grid) {
  return static_cast<int>(n_units < max_grid ? n_units : (max_grid > 0 ? max_grid : 1));
}

// Every (block, thread) of every strided launch in turn, as the GPU would run
// them with a grid of strided_grid(n_units, max_grid) blocks of `threads`
// threads: Body::run(table, args, block, grid, thread, threads).
template <typename Body, typename Table, typename Args>
inline void walk_strided(const std::vector<Table>& tables, const Args& args, int threads, int64_t max_grid) {
  for (const Table& tab : tables) {
    const int grid = strided_grid(tab.n_units, max_grid);
    for (int b = 0; b < grid; ++b)
      for (int t = 0; t < threads; ++t)
        Body::run(tab, args, b, grid, t, threads);
  }
}

// The private switch that makes every op launch its small (4 KiB) tables even
// where big kernel arguments work, so the CUDA tests cover the small-table path
// (registration.cpp: op opensora_fast::_force_small_tables).
bool force_small_tables();

}  // namespace opensora_fast
