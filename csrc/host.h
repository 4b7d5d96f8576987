// Host-only helpers shared by the ops' input checks (never included by device
// code). Messages built here are mirrored word for word by the Python checks in
// opensora_fast/reference, so both backends raise the same text.
#pragma once

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace opensora_fast {

// A double as Python's repr() writes it (shortest round-trip digits; exponent
// form below 1e-4 and from 1e16): "0.5", "1.0", "1.0000001", "1e-05", "nan".
inline std::string py_repr(double x) {
  if (x != x)
    return "nan";
  if (x == 1.0 / 0.0)
    return "inf";
  if (x == -1.0 / 0.0)
    return "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  std::string sci(buf, res.ptr);  // e.g. "-1.2345e-05"
  const size_t epos = sci.find('e');
  const int exp = std::stoi(sci.substr(epos + 1));
  std::string sign, digits;
  std::string mant = sci.substr(0, epos);
  if (mant[0] == '-') {
    sign = "-";
    mant = mant.substr(1);
  }
  for (char c : mant)
    if (c != '.')
      digits += c;
  if (exp < -4 || exp >= 16) {
    std::string m = digits.substr(0, 1);
    if (digits.size() > 1)
      m += "." + digits.substr(1);
    char e[8];
    std::snprintf(e, sizeof(e), "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    return sign + m + e;
  }
  std::string out;
  if (exp < 0) {
    out = "0." + std::string(-exp - 1, '0') + digits;
  } else if (static_cast<int>(digits.size()) <= exp + 1) {
    out = digits + std::string(exp + 1 - digits.size(), '0') + ".0";
  } else {
    out = digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
  }
  return sign + out;
}

// A dtype as Python writes it: "torch.float32", "torch.int64".
inline std::string dtype_name(c10::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// One memory range of a call's tensors: [start, end) in bytes, written or only
// read, and its name for messages ("ema", 3).
struct Span {
  uintptr_t start, end;
  bool written;
  const char* arg;
  int64_t index;
};

// Bytes from a strided tensor's first element to the end of its last
// (non-negative strides, as torch's): numel * element_size when it is dense, 0
// when it has no element. opensora_fast/reference/_checks.py extent_bytes.
inline uint64_t extent_bytes(const int64_t* sizes, const int64_t* strides, size_t dim, int64_t element_size) {
  uint64_t last = 0;
  for (size_t d = 0; d < dim; ++d) {
    if (sizes[d] == 0)
      return 0;
    last += static_cast<uint64_t>(sizes[d] - 1) * static_cast<uint64_t>(strides[d]);
  }
  return (last + 1) * static_cast<uint64_t>(element_size);
}

// Finds a written span that overlaps any other span (read-read overlaps are
// fine). Sorted sweep, O(n log n); the pair it reports is the first met in
// (start, index, written first) order, which opensora_fast/reference/_checks.py follows
// too. Returns false when all written spans are disjoint from everything.
inline bool find_overlap(std::vector<Span> spans, Span* a, Span* b) {
  spans.erase(std::remove_if(spans.begin(), spans.end(), [](const Span& s) { return s.end <= s.start; }), spans.end());
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) {
    return std::make_tuple(x.start, x.index, !x.written) < std::make_tuple(y.start, y.index, !y.written);
  });
  const Span* far_all = nullptr;      // the span reaching furthest so far
  const Span* far_written = nullptr;  // the written span reaching furthest so far
  for (const Span& s : spans) {
    const Span* hit = s.written ? far_all : far_written;
    if (hit != nullptr && s.start < hit->end) {
      *a = *hit;
      *b = s;
      return true;
    }
    if (far_all == nullptr || s.end > far_all->end)
      far_all = &s;
    if (s.written && (far_written == nullptr || s.end > far_written->end))
      far_written = &s;
  }
  return false;
}

}  // namespace opensora_fast
