// Fused mask/latent conditioning: writes masks [B,1,T,H,W] and masked latents
// [B,C,T,H,W] (two tensors, or the halves of one cond [B,1+C,T,H,W]) in one pass
// from a per-sample plan of conditioned frame runs.
//
// This header holds the one scalar rule (cast_value), the addressing of a source
// element (source_offset), the "pieces" that tile every (sample, frame) of the
// output, and the GPU launch geometry with its per-thread body (Body), a
// plain host/device function of (block, channel, thread), so the CPU can walk
// the whole grid (op _condition_grid_walk_) and compare with the reference.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../multi_tensor.h"

namespace opensora_fast {
namespace condition {

// Plan rows: (sample, frame, count, source, source_frame).
constexpr int kRow = 5;

// The value rule, shared by every kernel: torch's conversion (c10 casts; exact
// for every widening), NaN made canonical (common.h: one quiet NaN per dtype,
// since torch's own conversions give different NaN bits in their vector and
// scalar paths).
template <typename D, typename S>
OSF_INLINE D cast_value(S s) {
  const D d = static_cast<D>(s);
  const float f = static_cast<float>(d);
  return f != f ? canonical_nan<D>() : d;
}

// A source [C, Ts, H, W] with arbitrary element strides.
struct Source {
  const void* ptr;
  int64_t sc, sf, sh, sw;
};

OSF_INLINE bool frames_dense(const Source& s, int64_t H, int64_t W) {
  return (s.sw == 1 || W == 1) && (s.sh == W || H == 1) && s.sf == H * W;
}

// Offset of element e of a run of frames laid out as [n, H, W] (e < n*H*W).
OSF_INLINE int64_t source_offset(const Source& s, int64_t e, int64_t HW, int64_t W) {
  const int64_t t = e / HW, r = e - t * HW, h = r / W, w = r - h * W;
  return t * s.sf + h * s.sh + w * s.sw;
}

// A run of frames of one sample: conditioned from `src` (frames f0..) or, with
// src = -1, unconditioned (mask 0, value 0). Pieces tile [0, T) of every sample.
// 64-bit: T and a source's frame count can pass 2^31 (expanded or strided
// sources, long videos of small planes), and the plan is checked in int64.
struct Piece {
  int64_t b, t0, n, f0;
  int64_t src;
};
static_assert(sizeof(Piece) == 40, "Piece: five int64");

// Where the outputs live: mask and data planes are [T, H, W]-contiguous; the
// batch strides differ between the two-tensor form and the cat form.
struct Geometry {
  void* mask;
  void* data;
  int64_t mask_bstride, data_bstride, C, T, H, W;
};

// Pieces for B samples of T frames from validated plan rows (rows of one sample
// do not overlap). Ordered by (sample, frame).
inline std::vector<Piece> make_pieces(const std::vector<int64_t>& plan, int64_t B, int64_t T) {
  const size_t rows = plan.size() / kRow;
  std::vector<size_t> order(rows);
  for (size_t r = 0; r < rows; ++r)
    order[r] = r;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const int64_t* x = &plan[a * kRow];
    const int64_t* y = &plan[b * kRow];
    return x[0] != y[0] ? x[0] < y[0] : x[1] < y[1];
  });
  std::vector<Piece> out;
  size_t k = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t t = 0;
    for (; k < rows && plan[order[k] * kRow] == b; ++k) {
      const int64_t* r = &plan[order[k] * kRow];
      if (r[1] > t)
        out.push_back(Piece{b, t, r[1] - t, 0, -1});
      out.push_back(Piece{b, r[1], r[2], r[4], r[3]});
      t = r[1] + r[2];
    }
    if (T > t)
      out.push_back(Piece{b, t, T - t, 0, -1});
  }
  return out;
}

// ---------------------------------------------------------------------------
// GPU launch geometry over the shared launch core (multi_tensor.h): the
// table's entries are pieces, its Extra the sources they read. grid = (n_blocks,
// 1 + C): y 0 writes the mask plane, y = 1 + c the data plane of channel c;
// blockIdx.x is one chunk of kChunk elements of one piece. Longer plans take
// several launches.
constexpr int64_t kChunk = 8192;
constexpr int kThreads = 256;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "kThreads: whole warps, at most 1024");

// A table's sources; its pieces' src index this list.
template <int MaxSources>
struct SourceList {
  static constexpr int kMaxSources = MaxSources;
  Source src[MaxSources];
  int32_t n;
};

using Args = Geometry;
using BigTable = LaunchTable<Piece, 384, 2048, SourceList<96>>;
using SmallTable = LaunchTable<Piece, 48, 256, SourceList<10>>;
static_assert(kernel_arg_bytes<BigTable, Args>() <= kBigArgBytes, "kernel arguments over 32 KiB");
static_assert(kernel_arg_bytes<SmallTable, Args>() <= kSmallArgBytes, "kernel arguments over 4 KiB");

inline int64_t blocks_of(const Piece& p, int64_t HW) {
  return ceil_div<int64_t>(p.n * HW, kChunk);
}

// plan_launches' admission of a piece: its source joins the table's list
// unless already there (the piece then gets the source's index in the list);
// refused when the list is full. max_sources: a smaller limit (tests), 0: none.
class AdmitSources {
 public:
  AdmitSources(const std::vector<Source>& sources, int64_t max_sources)
      : sources_(sources), max_sources_(max_sources), local_(sources.size(), -1) {}

  template <typename Table>
  bool operator()(Table& tab, const Piece& p) {
    constexpr int cap = decltype(tab.extra)::kMaxSources;
    const int max = (max_sources_ > 0 && max_sources_ < cap) ? static_cast<int>(max_sources_) : cap;
    if (tab.n_entries == 0)
      std::fill(local_.begin(), local_.end(), -1);  // a fresh table
    Piece q = p;
    if (p.src >= 0) {
      int& at = local_[p.src];
      if (at < 0) {
        if (tab.extra.n == max)
          return false;
        tab.extra.src[tab.extra.n] = sources_[p.src];
        at = tab.extra.n++;
      }
      q.src = at;
    }
    tab.entry[tab.n_entries] = q;
    return true;
  }

 private:
  const std::vector<Source>& sources_;
  int64_t max_sources_;
  std::vector<int> local_;  // call's source index -> index in the current table, -1: not there
};

// Splits pieces (all with sources of one dtype, or unconditioned) into tables
// (the tables' limits unless `lim` or max_sources is smaller: tests).
template <typename Table>
inline std::vector<Table> plan_tables(const std::vector<Piece>& pieces, const std::vector<Source>& sources, int64_t HW,
                                      TableLimits lim = {}, int64_t max_sources = 0) {
  return plan_launches<Table>(
      pieces, [&](size_t i) { return blocks_of(pieces[i], HW); }, lim, AdmitSources(sources, max_sources));
}

// What thread `thread` (of nthreads) of block (block, channel) does.
template <typename D, typename S>
struct Body {
  template <typename Table>
  static OSF_HOST_DEVICE void run(const Table& tab, const Geometry& g, int block, int channel, int thread,
                                  int nthreads) {
    const Piece p = tab.entry[tab.block_entry[block]];
    const int64_t HW = g.H * g.W;
    const int64_t lo = static_cast<int64_t>(tab.block_chunk[block]) * kChunk;
    const int64_t span = p.n * HW;
    const int64_t len = span - lo < kChunk ? span - lo : kChunk;
    const int64_t at = p.t0 * HW + lo;  // offset in the [T, H, W] plane
    if (channel == 0) {
      D* m = static_cast<D*>(g.mask) + p.b * g.mask_bstride + at;
      const D v = p.src >= 0 ? D(1.0f) : D(0.0f);
      for (int64_t i = thread; i < len; i += nthreads)
        m[i] = v;
      return;
    }
    const int64_t c = channel - 1;
    D* out = static_cast<D*>(g.data) + p.b * g.data_bstride + c * g.T * HW + at;
    if (p.src < 0) {
      for (int64_t i = thread; i < len; i += nthreads)
        out[i] = D(0.0f);
      return;
    }
    const Source s = tab.extra.src[p.src];
    const S* in = static_cast<const S*>(s.ptr) + c * s.sc + p.f0 * s.sf;
    if (frames_dense(s, g.H, g.W)) {
      for (int64_t i = thread; i < len; i += nthreads)
        out[i] = cast_value<D, S>(in[lo + i]);
    } else {
      for (int64_t i = thread; i < len; i += nthreads)
        out[i] = cast_value<D, S>(in[source_offset(s, lo + i, HW, g.W)]);
    }
  }
};

}  // namespace condition
}  // namespace opensora_fast
