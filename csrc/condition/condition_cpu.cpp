// Conditioning on the CPU: the parallel kernel and the walk over the CUDA grid.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../cpu_isa.h"
#include "../parallel_spans.h"
#include "condition.h"
#include "condition_ops.h"

namespace opensora_fast {
namespace condition {

namespace {

// The dense conversion loop (cpu_isa.h: one build per ISA variant).
template <typename D, typename S>
struct Convert {
  static OSF_ALWAYS_INLINE void run(D* out, const S* in, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = cast_value<D, S>(in[i]);
  }
};

template <typename D, typename S>
void convert_span(D* out, const S* in, int64_t n) {
  cpu_isa::run<Convert<D, S>>(out, in, n);
}

// One (piece, channel) plane run: elements [0, len) of out.
struct Task {
  void* out;
  const void* in;  // source frame f0 of this channel; null: fill
  Source src;
  int64_t len;
  int fill;  // 0 or 1 when in == null
  bool dense;
  void (*run)(const Task&, int64_t lo, int64_t hi, int64_t HW, int64_t W);
};

template <typename D, typename S>
void run_task(const Task& t, int64_t lo, int64_t hi, int64_t HW, int64_t W) {
  D* out = static_cast<D*>(t.out);
  if (t.in == nullptr) {
    if (t.fill == 0) {
      std::memset(out + lo, 0, (hi - lo) * sizeof(D));  // all-zero bits are +0 in every float type
    } else {
      std::fill(out + lo, out + hi, D(1.0f));
    }
  } else if (t.dense) {
    convert_span<D, S>(out + lo, static_cast<const S*>(t.in) + lo, hi - lo);
  } else {
    const S* in = static_cast<const S*>(t.in);
    for (int64_t e = lo; e < hi; ++e)
      out[e] = cast_value<D, S>(in[source_offset(t.src, e, HW, W)]);
  }
}

constexpr int64_t kGrain = 32768;

std::vector<int64_t> plan_vector(c10::IntArrayRef plan) {
  return std::vector<int64_t>(plan.begin(), plan.end());
}

void check_planes(const at::Tensor& masks, const at::Tensor& masked) {
  // only for the private grid-walk op: [T,H,W]-contiguous planes of the right shape
  const int64_t B = masked.size(0), T = masked.size(2), H = masked.size(3), W = masked.size(4);
  TORCH_CHECK_VALUE(masks.dim() == 5 && masks.size(0) == B && masks.size(1) == 1 && masks.size(2) == T &&
                        masks.size(3) == H && masks.size(4) == W,
                    "_condition_grid_walk_: masks must be [B, 1, T, H, W]");
  TORCH_CHECK_VALUE(masks.scalar_type() == masked.scalar_type(), "_condition_grid_walk_: dtypes differ");
  for (const at::Tensor* t : {&masks, &masked})
    TORCH_CHECK_VALUE((t->size(1) <= 1 || t->stride(1) == T * H * W) && t->stride(2) == H * W && t->stride(3) == W &&
                          t->stride(4) == 1,
                      "_condition_grid_walk_: outputs need [C, T, H, W]-contiguous samples");
}

}  // namespace

void run_cpu(const Geometry& g, at::TensorList sources, const std::vector<Piece>& pieces, c10::ScalarType out_dtype) {
  const int64_t HW = g.H * g.W, planes = g.T * HW;
  std::vector<Task> tasks;
  std::vector<int64_t> start{0};
  tasks.reserve(pieces.size() * (1 + g.C));
  dispatch_pair(out_dtype, c10::kFloat, [&](auto dt, auto) {
    using D = typename decltype(dt)::type;
    const int64_t esz = sizeof(D);
    for (const Piece& p : pieces) {
      const int64_t len = p.n * HW, at = p.t0 * HW;
      if (len == 0)
        continue;
      Task m{static_cast<char*>(g.mask) + (p.b * g.mask_bstride + at) * esz,
             nullptr,
             Source{},
             len,
             p.src >= 0 ? 1 : 0,
             true,
             &run_task<D, float>};
      tasks.push_back(m);
      start.push_back(start.back() + len);
      for (int64_t c = 0; c < g.C; ++c) {
        Task t{static_cast<char*>(g.data) + (p.b * g.data_bstride + c * planes + at) * esz,
               nullptr,
               Source{},
               len,
               0,
               true,
               &run_task<D, float>};
        if (p.src >= 0) {
          const at::Tensor& s = sources[p.src];
          t.src = source_of(s);
          t.dense = frames_dense(t.src, g.H, g.W);
          t.in = static_cast<const char*>(s.const_data_ptr()) + (c * t.src.sc + p.f0 * t.src.sf) * s.element_size();
          dispatch_pair(out_dtype, s.scalar_type(), [&](auto, auto st) {
            using S = typename decltype(st)::type;
            t.run = &run_task<D, S>;
          });
        }
        tasks.push_back(t);
        start.push_back(start.back() + len);
      }
    }
  });
  // One parallel pass over all elements of all tasks.
  for_each_span(start, kGrain, [&](size_t i, int64_t lo, int64_t hi) { tasks[i].run(tasks[i], lo, hi, HW, g.W); });
}

namespace {

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& z, at::TensorList sources, c10::IntArrayRef plan) {
  check_inputs("condition", z, sources, plan);
  const int64_t B = z.size(0), C = z.size(1), T = z.size(2), H = z.size(3), W = z.size(4);
  at::Tensor masks = at::empty({B, 1, T, H, W}, z.options().memory_format(c10::MemoryFormat::Contiguous));
  at::Tensor masked = at::empty({B, C, T, H, W}, z.options().memory_format(c10::MemoryFormat::Contiguous));
  // nothing to write; and B pieces for a B near 2^63 of empty samples would not fit
  if (masks.numel() == 0)
    return {masks, masked};
  run_cpu(geometry(masks, masked), sources, make_pieces(plan_vector(plan), B, T), z.scalar_type());
  return {masks, masked};
}

void cat_cpu(at::Tensor& cond, at::TensorList sources, c10::IntArrayRef plan) {
  check_inputs("condition_cat_", cond, sources, plan);
  if (cond.numel() == 0)
    return;
  run_cpu(cat_geometry(cond), sources, make_pieces(plan_vector(plan), cond.size(0), cond.size(2)), cond.scalar_type());
}

// The CUDA path's grouping, planning and per-thread body over every (launch,
// channel, block, thread) in turn, with the real block size.
template <typename Table>
void walk_tables(const Geometry& g, at::TensorList sources, const std::vector<Piece>& pieces, c10::ScalarType out_dtype,
                 TableLimits lim, int64_t max_sources) {
  const std::vector<Source> srcs = sources_of(sources);
  for (const Group& grp : group_by_dtype(pieces, sources)) {
    dispatch_pair(out_dtype, grp.src_dtype, [&](auto dt, auto st) {
      using D = typename decltype(dt)::type;
      using S = typename decltype(st)::type;
      walk_grid<Body<D, S>>(plan_tables<Table>(grp.pieces, srcs, g.H * g.W, lim, max_sources), g, kThreads, 1 + g.C);
    });
  }
}

// make_pieces of an unchecked plan (tests: pieces past 2^31 frames, which no
// test could allocate), as [n, 5] int64 rows (sample, frame, count, source,
// source_frame), source -1 for an unconditioned run.
at::Tensor pieces_of(c10::IntArrayRef plan, int64_t B, int64_t T) {
  const std::vector<Piece> pieces = make_pieces(plan_vector(plan), B, T);
  at::Tensor out = at::empty({static_cast<int64_t>(pieces.size()), kRow}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (const Piece& p : pieces) {
    *o++ = p.b;
    *o++ = p.t0;
    *o++ = p.n;
    *o++ = p.src;
    *o++ = p.f0;
  }
  return out;
}

void grid_walk(at::Tensor& masks, at::Tensor& masked, at::TensorList sources, c10::IntArrayRef plan, int64_t max_pieces,
               int64_t max_sources, int64_t max_blocks, bool small_table) {
  check_inputs("condition", masked, sources, plan);
  check_planes(masks, masked);
  if (masks.numel() == 0)
    return;
  const Geometry g = geometry(masks, masked);
  const std::vector<Piece> pieces = make_pieces(plan_vector(plan), masked.size(0), g.T);
  const TableLimits lim{max_pieces, max_blocks};
  if (small_table)
    walk_tables<SmallTable>(g, sources, pieces, masked.scalar_type(), lim, max_sources);
  else
    walk_tables<BigTable>(g, sources, pieces, masked.scalar_type(), lim, max_sources);
}

}  // namespace
}  // namespace condition
}  // namespace opensora_fast

TORCH_LIBRARY_IMPL(opensora_fast, CPU, m) {
  m.impl("condition", &opensora_fast::condition::forward_cpu);
  m.impl("condition_cat_", &opensora_fast::condition::cat_cpu);
  m.impl("_condition_grid_walk_", &opensora_fast::condition::grid_walk);
}

// No tensor argument: no backend key to dispatch on.
TORCH_LIBRARY_IMPL(opensora_fast, CompositeExplicitAutograd, m) {
  m.impl("_condition_pieces", &opensora_fast::condition::pieces_of);
}
