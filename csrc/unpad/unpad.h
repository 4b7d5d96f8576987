// Unpack of a bucketed all-gather: gathered is [world, bucket], the shards of
// several parameters laid side by side in each row. Entry i owns the columns
// [offset[i], offset[i] + count[i]) of every row; they hold columns
// [begin[i], begin[i] + count[i]) of that parameter's per-rank shard of
// shard[i] elements. So element (r, c) of entry i is element
//     j = r * shard[i] + begin[i] + c
// of the unpadded, flattened parameter, written when j < numel (the tail of
// the last shards is model_sharding's zero padding and is dropped).
//
// This header is the single source of that index map and of the GPU launch
// geometry: the CPU kernel copies row segments with it, and the CUDA kernel's
// per-thread body (Body, over the shared launch core) is a plain host/device
// function of (block, thread) so a CPU test walks the whole grid (op
// _unpad_grid_walk).
// A copy: results are bit-exact on every backend.
#pragma once

#include <cstdint>
#include <vector>

#include "../common.h"
#include "../multi_tensor.h"

namespace opensora_fast {
namespace unpad {

// One entry: its destination and geometry, in elements.
struct Entry {
  void* dst;       // the unpadded parameter
  int64_t numel;   // elements of the destination
  int64_t shard;   // elements of one rank's shard (row stride in the parameter)
  int64_t begin;   // first shard column this entry carries
  int64_t count;   // shard columns this entry carries
  int64_t offset;  // first bucket column of the entry
};

// Elements of row r of an entry that land in the destination (a prefix of the
// row's count columns: the destination indices of a row are consecutive).
// shard and begin are caller values up to 2^63 - 1: r * shard + begin is only
// formed once it is known to be below numel, so it cannot wrap.
OSF_INLINE int64_t row_valid(const Entry& e, int64_t r) {
  if (e.begin >= e.numel)
    return 0;
  const int64_t room = e.numel - e.begin;  // > 0
  if (r > 0 && e.shard > (room - 1) / r)
    return 0;  // r * shard >= room
  const int64_t left = room - r * e.shard;
  return left < e.count ? left : e.count;
}

// Rows of `world` with a non-empty row_valid: they come first (row r starts
// r * shard further into the parameter). No product can wrap.
OSF_INLINE int64_t rows_with_data(const Entry& e, int64_t world) {
  if (e.numel <= 0 || e.count <= 0 || e.begin >= e.numel)
    return 0;
  if (e.shard <= 0)
    return world;                                          // not reached: count <= shard - begin
  const int64_t more = (e.numel - 1 - e.begin) / e.shard;  // rows after row 0
  return more < world - 1 ? more + 1 : world;
}

// ---------------------------------------------------------------------------
// GPU launch geometry over the shared launch core (multi_tensor.h). Each block
// owns up to kChunk consecutive columns of one row of one entry: entry chunk c
// is row c / per_row, columns from (c % per_row) * kChunk, with per_row =
// ceil(count / kChunk). One division per block, none per element; reads of a
// row are coalesced and so are the writes (consecutive destinations); blocks
// past a row's valid prefix exit.
constexpr int64_t kChunk = 16384;
constexpr int kThreads = 256;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "kThreads: whole warps, at most 1024");

// The launch's source, in copy units (unpad_ops.h Plan).
struct Args {
  const void* gathered;
  int64_t bucket;
};

using BigTable = LaunchTable<Entry, 256, 3072>;
using SmallTable = LaunchTable<Entry, 32, 256>;
static_assert(kernel_arg_bytes<BigTable, Args>() <= kBigArgBytes, "kernel arguments over 32 KiB");
static_assert(kernel_arg_bytes<SmallTable, Args>() <= kSmallArgBytes, "kernel arguments over 4 KiB");

// Blocks of an entry with `rows` rows of data (rows past the data get none;
// row_valid would skip them too).
inline int64_t blocks_of(const Entry& e, int64_t rows) {
  return rows * ceil_div<int64_t>(e.count, kChunk);
}

// Sixteen bytes moved as one (aligned) load or store.
struct alignas(16) Vec16 {
  uint64_t lo, hi;
};

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "unpad.h assembles vectors little-endian"
#endif

// Sixteen bytes from p, which is aligned for W only: 16 / sizeof(W) loads of
// W, assembled little-endian (CUDA and every host we build for) into the two
// halves; never a byte-wise copy, never a byte outside [p, p + 16).
template <typename W>
OSF_INLINE Vec16 load16_as(const void* p) {
  const W* w = static_cast<const W*>(p);
  constexpr int kPer = 8 / static_cast<int>(sizeof(W));  // W's per half
  uint64_t lo = 0, hi = 0;
  OSF_UNROLL
  for (int k = 0; k < kPer; ++k) {
    lo |= static_cast<uint64_t>(w[k]) << (8 * sizeof(W) * k);
    hi |= static_cast<uint64_t>(w[kPer + k]) << (8 * sizeof(W) * k);
  }
  return Vec16{lo, hi};
}

// Sixteen bytes from p (not 16-byte aligned, aligned for U) in the widest
// loads its alignment allows: the lowest set bit of its address. Every vector
// of a row has the same alignment, so the choice is uniform across a block;
// the branches below U's size are compiled out.
template <typename U>
OSF_INLINE Vec16 load16_unaligned(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (sizeof(U) < 2 && (a & 1u))
    return load16_as<uint8_t>(p);
  if (sizeof(U) < 4 && (a & 2u))
    return load16_as<uint16_t>(p);
  if (sizeof(U) < 8 && (a & 4u))
    return load16_as<uint32_t>(p);
  return load16_as<uint64_t>(p);
}

// What thread `thread` of block `block` does (nthreads = blockDim.x). U is an
// unsigned integer type of the element's size (the copy moves bits); for
// 16-byte elements the host passes every geometry value doubled and U = uint64.
template <typename U>
struct Body {
  template <typename Table>
  static OSF_HOST_DEVICE void run(const Table& tab, const Args& a, int block, int /*y*/, int thread, int nthreads) {
    const Entry& en = tab.entry[tab.block_entry[block]];
    const int64_t per_row = ceil_div<int64_t>(en.count, kChunk);
    const int64_t chunk = tab.block_chunk[block];
    const int64_t r = chunk / per_row;
    const int64_t lo = (chunk - r * per_row) * kChunk;
    const int64_t valid = row_valid(en, r);  // destinations of a row are consecutive
    const int64_t hi = (valid - lo < kChunk) ? valid : lo + kChunk;
    if (hi <= lo)
      return;  // padding only: no pointer is formed past the tensors
    U* dst = static_cast<U*>(en.dst) + (r * en.shard + en.begin);
    const U* src = static_cast<const U*>(a.gathered) + (r * a.bucket + en.offset);
    // 16-byte stores (from 16-byte loads where the source is co-aligned, else
    // from the widest loads its alignment allows): a warp
    // then writes 512 contiguous bytes per instruction, which both HBM and the
    // PCIe writes into pinned host memory take far better than 2-byte stores.
    // The elements before dst reaches 16-byte alignment and the tail go one by one.
    constexpr int64_t kVec = 16 / static_cast<int64_t>(sizeof(U));
    const uintptr_t misalign = reinterpret_cast<uintptr_t>(dst + lo) & 15u;
    int64_t head = misalign % sizeof(U) ? hi - lo : static_cast<int64_t>(((16u - misalign) & 15u) / sizeof(U));
    if (head > hi - lo)
      head = hi - lo;
    const int64_t vlo = lo + head;
    const int64_t nvec = (hi - vlo) / kVec;
    for (int64_t c = lo + thread; c < vlo; c += nthreads)
      dst[c] = src[c];
    Vec16* vdst = reinterpret_cast<Vec16*>(dst + vlo);
    if ((reinterpret_cast<uintptr_t>(src + vlo) & 15u) == 0) {
      const Vec16* vsrc = reinterpret_cast<const Vec16*>(src + vlo);
      for (int64_t v = thread; v < nvec; v += nthreads)
        vdst[v] = vsrc[v];
    } else {
      for (int64_t v = thread; v < nvec; v += nthreads)
        vdst[v] = load16_unaligned<U>(src + vlo + v * kVec);
    }
    for (int64_t c = vlo + nvec * kVec + thread; c < hi; c += nthreads)
      dst[c] = src[c];
  }
};

}  // namespace unpad
}  // namespace opensora_fast
