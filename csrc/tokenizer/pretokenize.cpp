// BPE's pre-tokenizer in C++: split texts with minilm/bpe_train.py's SPLIT_PATTERN and count the distinct
// chunks, what `count_chunks` does with the `regex` module (lesson 02).
//
// torch.ops.minilm.bpe_count_chunks(text, offsets, classes, max_digits) -> (chunks, chunk_offsets, counts)
//   text      uint8 (total bytes,): every text's UTF-8 bytes, one after another
//   offsets   int64 (T + 1,): text t is text[offsets[t] : offsets[t + 1]]; no chunk crosses a text's end
//   classes   uint8 (0x110000,): per code point, kLetter / kNumber / kSpace bits and a contraction letter,
//             computed in Python from the `regex` module itself (minilm/ops/bpe.py, `unicode_classes`), so
//             \p{L}, \p{N}, \s and (?i:s) mean here exactly what they mean to the reference
//   max_digits 1 for SPLIT_PATTERN (\p{N}), 3 for GPT4_SPLIT_PATTERN (\p{N}{1,3}+)
//   returns the distinct chunks in bpe_train's packed format (bytes, offsets (N + 1,), counts (N,)), in
//   order of first occurrence, which is also the order of the reference's Counter.
//
// torch.ops.minilm.bpe_split(text, classes, max_digits) -> the chunk boundaries (C + 1,) of one text, for tests.
//
// Not a regex engine: `chunk_end` is this one pattern, its eight alternatives tried in order. Its possessive
// quantifiers (?+ ++ *+) never give back, and here giving back could never lead to another match, so plain
// greedy loops are exact; the two alternatives that do backtrack, \s*[\r\n] and \s+(?!\S), are resolved
// from one scan of the whitespace run. Texts are split into one contiguous slice per thread, each slice
// counted in its own hash table, and the tables merged in slice order: the output does not depend on the
// thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

namespace {

// bits of classes[cp]; bits 3-6 hold 1 + the index in "sdmtlvre" of the letter (?i:x) cp matches, or 0
constexpr uint8_t kLetter = 1, kNumber = 2, kSpace = 4;   // \p{L}, \p{N}, \s
enum Contraction { kS = 1, kD, kM, kT, kL, kV, kR, kE };
constexpr int32_t kCodePoints = 0x110000;

struct Text {
  const uint8_t* s;        // this text's bytes, valid UTF-8 (Python's str.encode wrote them)
  int64_t n;
  const uint8_t* classes;

  // The code point starting at byte i < n, and its length. A sequence cut short by the end, or a code
  // point past U+10FFFF, reads as one byte of class 0: bad input cannot read out of bounds.
  uint32_t at(int64_t i, int* len) const {
    const uint8_t b = s[i];
    const int k = b < 0x80 ? 1 : b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : 2;
    if (k == 1 || i + k > n) {
      *len = 1;
      return k == 1 ? b : 0;
    }
    uint32_t cp = b & (0x7F >> k);
    for (int j = 1; j < k; ++j) cp = (cp << 6) | (s[i + j] & 0x3F);
    *len = k;
    return cp < kCodePoints ? cp : 0;
  }
  uint8_t class_at(int64_t i, int* len) const { return classes[at(i, len)]; }
  static int contraction(uint8_t c) { return c >> 3; }
  static bool other(uint8_t c) { return (c & (kLetter | kNumber | kSpace)) == 0; }   // [^\s\p{L}\p{N}]

  // the end of the run of code points whose class has `bits`, from byte i
  int64_t skip(int64_t i, uint8_t bits) const {
    int len;
    while (i < n && (class_at(i, &len) & bits)) i += len;
    return i;
  }
  int64_t skip_other(int64_t i) const {
    int len;
    while (i < n && other(class_at(i, &len))) i += len;
    return i;
  }
};

// The end of the chunk that starts at byte i < t.n: the first of SPLIT_PATTERN's alternatives that matches,
//   '(?i:[sdmt]|ll|ve|re) | [^\r\n\p{L}\p{N}]?+\p{L}++ | \p{N} | ?[^\s\p{L}\p{N}]++[\r\n]*+
//   | \s++$ | \s*[\r\n] | \s+(?!\S) | \s
// Every code point is a letter, a number, whitespace or "other", and each kind has an alternative that
// always matches it, so a chunk is never empty and the chunks tile the text.
int64_t chunk_end(const Text& t, int64_t i, int64_t max_digits) {
  int len0, len;
  const uint32_t c0 = t.at(i, &len0);
  const uint8_t k0 = t.classes[c0];
  const int64_t i1 = i + len0;   // the second code point
  // 1. a contraction: ' then s d m t, or ll ve re, in any case
  if (c0 == '\'' && i1 < t.n) {
    const int a = Text::contraction(t.class_at(i1, &len));
    const int64_t i2 = i1 + len;
    if (a == kS || a == kD || a == kM || a == kT) return i2;
    if ((a == kL || a == kV || a == kR) && i2 < t.n) {
      int len2;
      const int b = Text::contraction(t.class_at(i2, &len2));
      if ((a == kL && b == kL) || (a != kL && b == kE)) return i2 + len2;
    }
  }
  // 2. letters, with at most one code point before them that is neither a letter, a number nor \r \n
  if (k0 & kLetter) return t.skip(i1, kLetter);
  if (!(k0 & kNumber) && c0 != '\r' && c0 != '\n' && i1 < t.n && (t.class_at(i1, &len) & kLetter))
    return t.skip(i1, kLetter);   // possessive ?+: a prefix not followed by a letter fails the whole alternative
  // 3. one number (up to max_digits of them, greedily)
  if (k0 & kNumber) {
    int64_t j = i1;
    for (int64_t d = 1; d < max_digits && j < t.n && (t.class_at(j, &len) & kNumber); ++d) j += len;
    return j;
  }
  // 4. an optional space, a run of "other" code points, then any \r and \n
  const int64_t p = c0 == ' ' ? i1 : i;
  if (p < t.n && Text::other(t.class_at(p, &len))) {
    int64_t j = t.skip_other(p);
    while (j < t.n && (t.s[j] == '\r' || t.s[j] == '\n')) ++j;
    return j;
  }
  // c0 is whitespace: scan its whole run [i, j), noting where its last code point starts and the end of
  // its last \r or \n
  int64_t j = i, last = i, after_newline = -1;
  while (j < t.n) {
    const uint32_t c = t.at(j, &len);
    if (!(t.classes[c] & kSpace)) break;
    if (c == '\r' || c == '\n') after_newline = j + len;
    last = j;
    j += len;
  }
  if (j == t.n) return j;                          // 5. \s++$: whitespace to the end of the text
  if (after_newline >= 0) return after_newline;    // 6. \s*[\r\n]: backtrack to the run's last newline
  if (last > i) return last;                       // 7. \s+(?!\S): all but the last, which joins the next word
  return i1;                                       // 8. \s: a single whitespace before a non-space
}

// Distinct chunks in order of first occurrence, with their counts; the views point into the input tensor.
// The index is open addressing: a power-of-two table of slots, each 0 (empty) or 1 + a position in
// `chunks`, probed linearly from the slot of the chunk's key and kept at most half full. A chunk of up to 7
// bytes (most of them) is its own key, its bytes and its length packed in 64 bits, so finding it never reads
// the text again; a longer one's key is a hash, and equal keys are checked byte by byte. (The first version,
// std::unordered_map, spent over a quarter of its time reading the first occurrence back and took 2.1x as
// long.)
struct ChunkCounts {
  std::vector<std::string_view> chunks;
  std::vector<uint64_t> keys;
  std::vector<int64_t> counts;
  std::vector<uint32_t> slots = std::vector<uint32_t>(1 << 12, 0);
  int shift = 64 - 12;   // slot = the top log2(slots.size()) bits of key * a large odd constant

  static uint64_t key(std::string_view c) {
    uint64_t k = 0;
    if (c.size() <= 7) {   // top byte: the length, 0-7; the bytes below it
      for (size_t i = 0; i < c.size(); ++i) k |= static_cast<uint64_t>(static_cast<uint8_t>(c[i])) << (8 * i);
      return k | static_cast<uint64_t>(c.size()) << 56;
    }
    k = 0xcbf29ce484222325ull;   // FNV-1a, its top byte forced to 0xFF so that no short chunk has the key
    for (const char ch : c) k = (k ^ static_cast<uint8_t>(ch)) * 0x100000001b3ull;
    return k | 0xFFull << 56;
  }
  size_t slot_of(uint64_t k) const { return (k * 0x9E3779B97F4A7C15ull) >> shift; }

  void add(std::string_view chunk, uint64_t k, int64_t n) {
    const size_t mask = slots.size() - 1;
    for (size_t s = slot_of(k);; s = (s + 1) & mask) {
      const uint32_t e = slots[s];
      if (e == 0) {
        chunks.push_back(chunk);
        keys.push_back(k);
        counts.push_back(n);
        slots[s] = static_cast<uint32_t>(chunks.size());
        if (2 * chunks.size() > slots.size()) grow();
        return;
      }
      if (keys[e - 1] == k && (chunk.size() <= 7 || chunks[e - 1] == chunk)) {
        counts[e - 1] += n;
        return;
      }
    }
  }
  void grow() {   // double the table and re-place every chunk by its stored key
    slots.assign(2 * slots.size(), 0);
    shift -= 1;
    const size_t mask = slots.size() - 1;
    for (size_t c = 0; c < chunks.size(); ++c) {
      size_t s = slot_of(keys[c]);
      while (slots[s] != 0) s = (s + 1) & mask;
      slots[s] = static_cast<uint32_t>(c + 1);
    }
  }
};

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> bpe_count_chunks(const torch::Tensor& text,
                                                                         const torch::Tensor& offsets,
                                                                         const torch::Tensor& classes,
                                                                         int64_t max_digits) {
  TORCH_CHECK(text.dtype() == torch::kUInt8 && text.dim() == 1, "text must be a 1-D uint8 tensor of UTF-8 bytes");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.dim() == 1 && offsets.numel() >= 1,
              "offsets must be a 1-D int64 tensor of T + 1 text boundaries");
  TORCH_CHECK(classes.dtype() == torch::kUInt8 && classes.numel() == kCodePoints,
              "classes must be the uint8 table of all 0x110000 code points (minilm.ops.bpe.unicode_classes)");
  TORCH_CHECK(max_digits >= 1, "max_digits must be >= 1");
  const auto bytes = text.contiguous();
  const auto off_t = offsets.contiguous();
  const auto cls_t = classes.contiguous();
  const uint8_t* s = bytes.data_ptr<uint8_t>();
  const int64_t* off = off_t.data_ptr<int64_t>();
  const uint8_t* cls = cls_t.data_ptr<uint8_t>();
  const int64_t n_texts = off_t.numel() - 1;
  TORCH_CHECK(off[0] >= 0 && off[n_texts] <= bytes.numel(), "offsets must lie within text");
  for (int64_t k = 0; k < n_texts; ++k) TORCH_CHECK(off[k] <= off[k + 1], "offsets must be sorted");

  // one slice of texts per thread, balanced by bytes: slice p holds the texts that start in
  // [p * total / parts, (p + 1) * total / parts)
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_texts));
  std::vector<int64_t> first(parts + 1, n_texts);
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t start = off[0] + (off[n_texts] - off[0]) * p / parts;
    first[p] = std::lower_bound(off, off + n_texts, start) - off;
  }
  std::vector<ChunkCounts> counted(parts);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t k = first[p]; k < first[p + 1]; ++k) {
        const Text t{s + off[k], off[k + 1] - off[k], cls};
        for (int64_t i = 0; i < t.n;) {
          const int64_t j = chunk_end(t, i, max_digits);
          const std::string_view chunk(reinterpret_cast<const char*>(t.s + i), j - i);
          counted[p].add(chunk, ChunkCounts::key(chunk), 1);
          i = j;
        }
      }
    }
  });
  // merge the slices in order: first occurrences stay first
  ChunkCounts all = std::move(counted[0]);
  for (int64_t p = 1; p < parts; ++p)
    for (size_t c = 0; c < counted[p].chunks.size(); ++c)
      all.add(counted[p].chunks[c], counted[p].keys[c], counted[p].counts[c]);

  const auto n = static_cast<int64_t>(all.chunks.size());
  auto out_offsets = torch::empty({n + 1}, torch::kInt64);
  int64_t* o = out_offsets.data_ptr<int64_t>();
  o[0] = 0;
  for (int64_t c = 0; c < n; ++c) o[c + 1] = o[c] + static_cast<int64_t>(all.chunks[c].size());
  auto out_bytes = torch::empty({o[n]}, torch::kUInt8);
  uint8_t* b = out_bytes.data_ptr<uint8_t>();
  for (int64_t c = 0; c < n; ++c) std::memcpy(b + o[c], all.chunks[c].data(), all.chunks[c].size());
  auto out_counts = torch::from_blob(all.counts.data(), {n}, torch::kInt64).clone();
  return {out_bytes, out_offsets, out_counts};
}

// The chunks of one text, as the byte offsets (C + 1,) of their boundaries: what the tests compare with
// regex.findall, chunk for chunk, and what a lesson can print.
torch::Tensor bpe_split(const torch::Tensor& text, const torch::Tensor& classes, int64_t max_digits) {
  TORCH_CHECK(text.dtype() == torch::kUInt8 && text.dim() == 1, "text must be a 1-D uint8 tensor of UTF-8 bytes");
  TORCH_CHECK(classes.dtype() == torch::kUInt8 && classes.numel() == kCodePoints,
              "classes must be the uint8 table of all 0x110000 code points (minilm.ops.bpe.unicode_classes)");
  TORCH_CHECK(max_digits >= 1, "max_digits must be >= 1");
  const auto bytes = text.contiguous();
  const auto cls_t = classes.contiguous();
  const Text t{bytes.data_ptr<uint8_t>(), bytes.numel(), cls_t.data_ptr<uint8_t>()};
  std::vector<int64_t> bounds{0};
  while (bounds.back() < t.n) bounds.push_back(chunk_end(t, bounds.back(), max_digits));
  return torch::tensor(bounds, torch::kInt64);
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CPU, m) {
  m.impl("bpe_count_chunks", bpe_count_chunks);
  m.impl("bpe_split", bpe_split);
}
