// BPE training, the merge loop of minilm/bpe_train.py's `learn_merges` in C++ (lesson 02).
//
// torch.ops.minilm.bpe_train(chunks, offsets, freqs, n_merges) -> merges (M, 2) int64
//   chunks   uint8 (total bytes,): every distinct pre-token chunk's UTF-8 bytes, one after another
//   offsets  int64 (N + 1,): chunk i is chunks[offsets[i] : offsets[i + 1]]
//   freqs    int64 (N,): how often chunk i occurs in the training text
//   merges   row k = the ids (left, right) merged into the new token 256 + k; M < n_merges when the
//            text runs out of pairs (the Python side says so)
//
// The algorithm and every tie-break are the Python reference's, so the merges are identical:
//   - pair counts and an inverted index pair -> chunks are built once, then updated only in the
//     chunks a merge rewrites (the index lazily: see `where`);
//   - a max-heap keyed (count, then the smaller pair) finds the next merge; entries whose count is
//     out of date are dropped when popped (lazy invalidation);
//   - a pair whose bytes already exist as a token is skipped, so ranks stay one-to-one.
// A pair (a, b) of ids < 2^31 is one 64-bit key, a << 32 | b, which also orders pairs as Python
// orders the tuples.
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <queue>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace {

using Pair = uint64_t;
inline Pair pair_of(int64_t a, int64_t b) { return (static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b); }
inline int64_t left_of(Pair p) { return static_cast<int64_t>(p >> 32); }
inline int64_t right_of(Pair p) { return static_cast<int64_t>(p & 0xffffffffu); }

struct Entry {
  int64_t count;
  Pair pair;
  // std::priority_queue pops the largest: the highest count, then the smallest pair
  bool operator<(const Entry& o) const { return count != o.count ? count < o.count : pair > o.pair; }
};

// Non-overlapping left-to-right replacement of `pair` by `new_id` (merge_pair in Python).
std::vector<int32_t> merge_word(const std::vector<int32_t>& ids, Pair pair, int32_t new_id) {
  const int32_t a = static_cast<int32_t>(left_of(pair)), b = static_cast<int32_t>(right_of(pair));
  std::vector<int32_t> out;
  out.reserve(ids.size());
  for (size_t i = 0; i < ids.size();) {
    if (i + 1 < ids.size() && ids[i] == a && ids[i + 1] == b) {
      out.push_back(new_id);
      i += 2;
    } else {
      out.push_back(ids[i]);
      i += 1;
    }
  }
  return out;
}

torch::Tensor bpe_train(const torch::Tensor& chunks, const torch::Tensor& offsets, const torch::Tensor& freqs,
                        int64_t n_merges) {
  TORCH_CHECK(chunks.dtype() == torch::kUInt8 && chunks.dim() == 1, "chunks must be a 1-D uint8 tensor");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && freqs.dtype() == torch::kInt64, "offsets and freqs must be int64");
  TORCH_CHECK(offsets.numel() == freqs.numel() + 1, "offsets needs one more entry than freqs");
  TORCH_CHECK(n_merges >= 0, "n_merges must be >= 0");
  const auto bytes = chunks.contiguous();
  const auto off = offsets.contiguous();
  const auto fr = freqs.contiguous();
  const uint8_t* data = bytes.data_ptr<uint8_t>();
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t* f = fr.data_ptr<int64_t>();
  const int64_t n_words = fr.numel();

  std::vector<std::vector<int32_t>> words(n_words);   // each chunk as its current token ids
  std::unordered_map<Pair, int64_t> counts;           // pair -> occurrences, weighted by freq
  // pair -> chunks that hold it or once did: an entry may be stale or repeated, and the merge skips
  // those (merge_word changes nothing); every chunk that holds the pair is listed, which is all
  // exactness needs. Python's sets are exact instead; the merges are the same.
  std::unordered_map<Pair, std::vector<int32_t>> where;
  for (int64_t i = 0; i < n_words; ++i) {
    TORCH_CHECK(o[i] <= o[i + 1] && o[i + 1] <= bytes.numel(), "offsets must be sorted and within chunks");
    words[i].assign(data + o[i], data + o[i + 1]);
    for (size_t j = 0; j + 1 < words[i].size(); ++j) {
      const Pair p = pair_of(words[i][j], words[i][j + 1]);
      counts[p] += f[i];
      where[p].push_back(static_cast<int32_t>(i));
    }
  }
  std::priority_queue<Entry> heap;
  for (const auto& [p, n] : counts) heap.push({n, p});

  std::vector<std::string> vocab(256);   // id -> its bytes
  for (int b = 0; b < 256; ++b) vocab[b] = std::string(1, static_cast<char>(b));
  std::unordered_set<std::string> known(vocab.begin(), vocab.end());
  std::unordered_set<Pair> skipped;
  std::vector<int64_t> merges;   // flattened (M, 2)
  std::unordered_map<Pair, int64_t> delta;   // count changes of one merge, applied after its rewrites

  while (static_cast<int64_t>(merges.size()) / 2 < n_merges) {
    // pop the best pair whose heap entry is current
    bool found = false;
    Pair best = 0;
    while (!heap.empty()) {
      const Entry e = heap.top();
      heap.pop();
      const auto it = counts.find(e.pair);
      if (it != counts.end() && it->second == e.count && e.count > 0 && !skipped.count(e.pair)) {
        best = e.pair;
        found = true;
        break;
      }
    }
    if (!found) break;   // out of pairs
    std::string joined = vocab[left_of(best)] + vocab[right_of(best)];
    if (known.count(joined)) {   // the same bytes reached by another split
      skipped.insert(best);
      continue;
    }
    const auto new_id = static_cast<int32_t>(vocab.size());
    known.insert(joined);
    vocab.push_back(std::move(joined));
    merges.push_back(left_of(best));
    merges.push_back(right_of(best));

    // rewrite only the chunks that hold `best`: every pair of the old chunk leaves the counts and
    // every pair of the new one enters; only pairs with new_id are new to the index
    delta.clear();
    auto node = where.extract(best);
    for (const int32_t i : node.mapped()) {
      std::vector<int32_t>& word = words[i];
      std::vector<int32_t> merged = merge_word(word, best, new_id);
      if (merged.size() == word.size()) continue;   // a stale or repeated entry
      for (size_t j = 0; j + 1 < word.size(); ++j) delta[pair_of(word[j], word[j + 1])] -= f[i];
      for (size_t j = 0; j + 1 < merged.size(); ++j) {
        const Pair p = pair_of(merged[j], merged[j + 1]);
        delta[p] += f[i];
        if (merged[j] == new_id || merged[j + 1] == new_id) where[p].push_back(i);
      }
      word.swap(merged);
    }
    for (const auto& [p, d] : delta) {
      if (d == 0) continue;
      const int64_t n = (counts[p] += d);
      if (n > 0) heap.push({n, p});
    }
  }
  const int64_t m = static_cast<int64_t>(merges.size()) / 2;
  return torch::from_blob(merges.data(), {m, 2}, torch::kInt64).clone();
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CPU, m) { m.impl("bpe_train", bpe_train); }
