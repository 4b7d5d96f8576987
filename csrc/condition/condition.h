// Fused mask/latent conditioning: writes masks [B,1,T,H,W] and masked latents
// [B,C,T,H,W] (two tensors, or the halves of one cond [B,1+C,T,H,W]) in one pass
// from a per-sample plan of conditioned frame runs.
//
// This header holds the one scalar rule (cast_value), the addressing of a source
// element (source_offset), the "pieces" that tile every (sample, frame) of the
// output, and the GPU launch geometry with its per-thread body (block_body), a
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
  for (size_t r = 0; r < rows; ++r) order[r] = r;
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
      if (r[1] > t) out.push_back(Piece{b, t, r[1] - t, 0, -1});
      out.push_back(Piece{b, r[1], r[2], r[4], r[3]});
      t = r[1] + r[2];
    }
    if (T > t) out.push_back(Piece{b, t, T - t, 0, -1});
  }
  return out;
}

// ---------------------------------------------------------------------------
// GPU launch geometry. grid = (n_blocks, 1 + C): blockIdx.y 0 writes the mask
// plane, y = 1 + c the data plane of channel c; blockIdx.x is one chunk of
// kChunk elements of one piece. The tables travel as a kernel argument: the big
// one under 32 KiB (CUDA >= 12.1 toolkit and driver, sm_70+), the small one
// under 4 KiB (any CUDA; cuda_launch.cuh picks at run time); longer plans take
// several launches.
constexpr int64_t kChunk = 8192;
constexpr int kThreads = 256;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "kThreads: whole warps, at most 1024");

template <int MaxSources, int MaxPieces, int MaxBlocks>
struct LaunchTableT {
  static constexpr int kMaxSources = MaxSources;
  static constexpr int kMaxPieces = MaxPieces;
  static constexpr int kMaxBlocks = MaxBlocks;
  Source src[MaxSources];
  Piece piece[MaxPieces];
  int16_t block_piece[MaxBlocks];
  int32_t block_chunk[MaxBlocks];
  int32_t n_blocks;
};
using BigTable = LaunchTableT<96, 384, 2048>;
using SmallTable = LaunchTableT<10, 48, 256>;
static_assert(sizeof(BigTable) + sizeof(Geometry) + sizeof(int) <= 32000, "kernel arguments over 32 KiB");
static_assert(sizeof(SmallTable) + sizeof(Geometry) + sizeof(int) <= 4000, "kernel arguments over 4 KiB");
static_assert(BigTable::kMaxPieces <= 32767, "block_piece is int16");

// Splits pieces (all with sources of one dtype, or unconditioned) into tables of
// at most max_pieces pieces, max_sources sources and max_blocks blocks (the
// compile-time limits by default; tests pass small ones to exercise every split).
template <typename Table>
inline std::vector<Table> plan_launches(const std::vector<Piece>& pieces, const std::vector<Source>& sources,
                                        int64_t HW, int max_pieces = 0, int max_sources = 0, int max_blocks = 0) {
  const auto limit = [](int v, int cap) { return (v > 0 && v < cap) ? v : cap; };
  max_pieces = limit(max_pieces, Table::kMaxPieces);
  max_sources = limit(max_sources, Table::kMaxSources);
  max_blocks = limit(max_blocks, Table::kMaxBlocks);
  std::vector<Table> out;
  Table* cur = nullptr;  // built in place in `out`: the table is large
  int np = 0, ns = 0;
  std::vector<int> local(sources.size(), -1);
  auto open = [&]() {
    out.emplace_back();
    cur = &out.back();
    cur->n_blocks = 0;
    np = ns = 0;
    std::fill(local.begin(), local.end(), -1);
  };
  for (const Piece& p : pieces) {
    const int64_t chunks = ceil_div<int64_t>(p.n * HW, kChunk);
    for (int64_t c = 0; c < chunks; ++c) {
      if (cur == nullptr || cur->n_blocks == max_blocks) open();
      if (c == 0 || cur->n_blocks == 0) {  // the piece enters this table
        const bool need_src = p.src >= 0 && local[p.src] < 0;
        if (np == max_pieces || (need_src && ns == max_sources)) open();
        Piece q = p;
        if (p.src >= 0) {
          if (local[p.src] < 0) {
            cur->src[ns] = sources[p.src];
            local[p.src] = ns++;
          }
          q.src = local[p.src];
        }
        cur->piece[np++] = q;
      }
      cur->block_piece[cur->n_blocks] = static_cast<int16_t>(np - 1);
      cur->block_chunk[cur->n_blocks] = static_cast<int32_t>(c);
      ++cur->n_blocks;
    }
  }
  return out;
}

// What thread `thread` (of nthreads) of block (block, channel) does.
template <typename D, typename S, typename Table>
OSF_HOST_DEVICE inline void block_body(const Table& tab, const Geometry& g, int block, int channel,
                                       int thread, int nthreads) {
  const Piece p = tab.piece[tab.block_piece[block]];
  const int64_t HW = g.H * g.W;
  const int64_t lo = static_cast<int64_t>(tab.block_chunk[block]) * kChunk;
  const int64_t span = p.n * HW;
  const int64_t len = span - lo < kChunk ? span - lo : kChunk;
  const int64_t at = p.t0 * HW + lo;  // offset in the [T, H, W] plane
  if (channel == 0) {
    D* m = static_cast<D*>(g.mask) + p.b * g.mask_bstride + at;
    const D v = p.src >= 0 ? D(1.0f) : D(0.0f);
    for (int64_t i = thread; i < len; i += nthreads) m[i] = v;
    return;
  }
  const int64_t c = channel - 1;
  D* out = static_cast<D*>(g.data) + p.b * g.data_bstride + c * g.T * HW + at;
  if (p.src < 0) {
    for (int64_t i = thread; i < len; i += nthreads) out[i] = D(0.0f);
    return;
  }
  const Source s = tab.src[p.src];
  const S* in = static_cast<const S*>(s.ptr) + c * s.sc + p.f0 * s.sf;
  if (frames_dense(s, g.H, g.W)) {
    for (int64_t i = thread; i < len; i += nthreads) out[i] = cast_value<D, S>(in[lo + i]);
  } else {
    for (int64_t i = thread; i < len; i += nthreads)
      out[i] = cast_value<D, S>(in[source_offset(s, lo + i, HW, g.W)]);
  }
}

}  // namespace condition
}  // namespace opensora_fast
