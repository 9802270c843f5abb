#include "remat/train/data.h"

#include "remat/io/json_text.h"
#include "remat/io/file.h"
#include "train/rng.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>

namespace remat {
namespace train {

namespace {

using detail::SplitMix64;

std::vector<int64_t> shuffled(int64_t n, uint64_t seed) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    order[static_cast<size_t>(i)] = i;
  }
  SplitMix64 rng(seed);
  for (int64_t i = n - 1; i > 0; --i) {
    auto j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i + 1)));
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
  }
  return order;
}

std::string where(const std::string& path, int64_t line) {
  return path + ":" + std::to_string(line);
}

std::string shorten(const std::string& text, size_t max_chars = 60) {
  std::string out;
  for (char c : text.substr(0, max_chars)) {
    out.push_back(static_cast<unsigned char>(c) < 0x20 ? ' ' : c);
  }
  return text.size() > max_chars ? out + "..." : out;
}

// Calls f(line_number, parsed object) for every non-blank line.
template <typename F>
void for_each_json_line(const std::string& path, F&& f) {
  const auto text = io::read_file(path);
  size_t start = 0;
  int64_t line_no = 0;
  while (start < text.size()) {
    auto end = text.find('\n', start);
    if (end == std::string::npos) {
      end = text.size();
    }
    ++line_no;
    std::string line = text.substr(start, end - start);
    start = end + 1;
    if (line_no == 1 && line.compare(0, 3, "\xEF\xBB\xBF") == 0) {
      line.erase(0, 3); // a UTF-8 byte order mark
    }
    if (line.find_first_not_of(" \t\r") == std::string::npos) {
      continue;
    }
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      TORCH_CHECK(
          false, where(path, line_no),
          ": expected a JSON object, but the line is not valid JSON (at column ",
          e.byte, ": ", io::json_error_text(e, /*drop_position=*/true), ")");
    } catch (const nlohmann::json::exception& e) {
      TORCH_CHECK(
          false, where(path, line_no),
          ": expected a JSON object, but the line is not valid JSON (",
          io::json_error_text(e), ")");
    }
    TORCH_CHECK(
        j.is_object(), where(path, line_no),
        ": expected a JSON object, but got ", j.type_name());
    f(line_no, j);
  }
}

std::string read_text(
    const nlohmann::json& j,
    const JsonlOptions& options,
    const std::string& path,
    int64_t line) {
  auto it = j.find(options.text_key());
  TORCH_CHECK(
      it != j.end() && it->is_string(), where(path, line),
      ": expected a string field \"", options.text_key(), "\", but got ",
      it == j.end() ? std::string("none") : io::describe_json(*it));
  return it->get<std::string>();
}

// The text and/or token ids of one line. The first line decides whether a
// file is text or ids, and every other line must follow it: ids come from
// the tokenizer that made the file, and the loader's tokenizer, which would
// tokenize the text lines, need not be that one.
struct Document {
  std::string text;
  std::vector<int64_t> ids;
};

class DocumentReader {
 public:
  DocumentReader(const JsonlOptions& options, const std::string& path)
      : options_(options), path_(path) {}

  Document read(const nlohmann::json& j, int64_t line) {
    Document d;
    auto ids = j.find(options_.ids_key());
    const bool has_ids = ids != j.end();
    if (first_line_ == 0) {
      first_line_ = line;
      first_has_ids_ = has_ids;
    }
    TORCH_CHECK(
        has_ids == first_has_ids_, where(path_, line),
        ": expected every line to give ", kind(first_has_ids_), " as line ",
        first_line_, " does, but this line gives ", kind(has_ids));
    if (!has_ids) {
      d.text = read_text(j, options_, path_, line);
      return d;
    }
    // An ids line may keep its text, for reading; collate uses the ids.
    if (j.contains(options_.text_key())) {
      d.text = read_text(j, options_, path_, line);
    }
    TORCH_CHECK(
        ids->is_array() && !ids->empty(), where(path_, line), ": expected \"",
        options_.ids_key(), "\" to be a non-empty list of token ids, but got ",
        ids->is_array() ? std::string("an empty list")
                        : io::describe_json(*ids));
    d.ids.reserve(ids->size());
    for (size_t i = 0; i < ids->size(); ++i) {
      const auto& id = (*ids)[i];
      const bool ok = id.is_number_unsigned()
          ? id.get<uint64_t>() <=
              static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
          : id.is_number_integer() && id.get<int64_t>() >= 0;
      TORCH_CHECK(
          ok, where(path_, line), ": expected \"", options_.ids_key(),
          "\" to hold non-negative integer token ids, but item ", i, " is ",
          io::describe_json(id));
      d.ids.push_back(id.get<int64_t>());
    }
    return d;
  }

 private:
  std::string kind(bool ids) const {
    return ids ? "token ids (\"" + options_.ids_key() + "\")"
               : "text (\"" + options_.text_key() + "\")";
  }

  const JsonlOptions& options_;
  const std::string& path_;
  int64_t first_line_ = 0;
  bool first_has_ids_ = false;
};

// The token ids of one document cut to max_len: a pre-tokenized document's
// ids as given, a text's with the tokenizer's begin and end tokens.
std::vector<int64_t> encode_example(
    const Example& e,
    const io::Tokenizer& tokenizer,
    int64_t max_len) {
  if (!e.ids.empty()) {
    const auto n = std::min<size_t>(e.ids.size(), static_cast<size_t>(max_len));
    return std::vector<int64_t>(e.ids.begin(), e.ids.begin() + n);
  }
  return tokenizer.encode(e.text, max_len).input_ids;
}

// The generator of epoch `epoch`: its first number seeds the permutation of
// the documents (epoch_permutation), its second the order of the batches.
SplitMix64 epoch_generator(uint64_t seed, int64_t epoch) {
  // Mix the epoch in with a second generator so that nearby seeds and epochs
  // give unrelated permutations.
  return SplitMix64(
      seed ^ (0xD1B54A32D192ED03ULL * static_cast<uint64_t>(epoch + 1)));
}

// Rows of each batch when documents of token counts `lengths` (longest
// first) are cut greedily so that rows <= max_rows and rows * longest <=
// max_tokens, every batch having at least min_rows rows. Fewer than min_rows
// documents may be left at the end.
std::vector<int64_t> cut_by_budget(
    const std::vector<int64_t>& lengths,
    int64_t max_rows,
    int64_t max_tokens,
    int64_t min_rows) {
  auto fits = [&](int64_t rows, int64_t longest) {
    return rows <= max_rows &&
        rows <= max_tokens / std::max<int64_t>(longest, 1);
  };
  std::vector<int64_t> rows;
  std::vector<int64_t> longest; // each batch's first, longest, row
  for (auto len : lengths) {
    if (rows.empty() || !fits(rows.back() + 1, longest.back())) {
      rows.push_back(0);
      longest.push_back(len);
    }
    ++rows.back();
  }
  // The greedy cut closes a batch only when it is full or over the budget,
  // and min_rows rows of any length fit, so only the last can be short.
  if (!rows.empty() && rows.back() < min_rows) {
    const auto tail = rows.back();
    if (rows.size() == 1) {
      rows.pop_back();
    } else if (fits(rows[rows.size() - 2] + tail, longest[rows.size() - 2])) {
      rows.pop_back();
      rows.back() += tail;
    } else if (rows[rows.size() - 2] + tail >= 2 * min_rows) {
      // Its shortest rows move to the tail, whose longest row is then one of
      // them: min_rows rows of at most max_len tokens fit.
      rows[rows.size() - 2] -= min_rows - tail;
      rows.back() = min_rows;
    } else {
      rows.pop_back();
    }
  }
  return rows;
}

// Packs documents of token counts `lengths`, in order, into rows of at most
// max_len tokens; a document that does not fit starts a new row.
std::vector<std::vector<int64_t>> pack_rows(
    const std::vector<int64_t>& lengths,
    int64_t max_len) {
  std::vector<std::vector<int64_t>> rows;
  int64_t used = 0;
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (rows.empty() || used + lengths[i] > max_len) {
      rows.emplace_back();
      used = 0;
    }
    rows.back().push_back(static_cast<int64_t>(i));
    used += lengths[i];
  }
  return rows;
}

// The id that fills padding (masked, and -100 in LM labels): the
// tokenizer's, or 0 for pre-tokenized documents, whose ids need not be the
// tokenizer's and whose model may have fewer rows than the tokenizer's pad.
// A set is all ids or all text (the readers refuse a mix), so a batch's
// first document says which; asking the whole set would scan it per batch.
int64_t padding_id(const Example& first, const io::Tokenizer& tokenizer) {
  return first.ids.empty() ? tokenizer.pad_id() : 0;
}

// One batch of packed rows: document numbers in the mask, -100 in the labels
// on padding and on each document's first token.
Batch collate_packed(
    const Dataset& data,
    const std::vector<std::vector<int64_t>>& rows,
    const io::Tokenizer& tokenizer,
    int64_t max_len,
    bool pad_to_max_len) {
  struct Row {
    std::vector<int64_t> ids, doc;
    std::vector<char> first;
  };
  std::vector<Row> made(rows.size());
  Batch out;
  int64_t longest = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    int64_t number = 0;
    for (auto i : rows[r]) {
      auto ids = encode_example(
          data.examples[static_cast<size_t>(i)], tokenizer, max_len);
      ++number;
      for (size_t t = 0; t < ids.size(); ++t) {
        made[r].ids.push_back(ids[t]);
        made[r].doc.push_back(number);
        made[r].first.push_back(t == 0);
      }
      out.indices.push_back(i);
    }
    const auto len = static_cast<int64_t>(made[r].ids.size());
    TORCH_INTERNAL_ASSERT(len <= max_len, "a packed row overflows max_len");
    longest = std::max(longest, len);
  }
  const auto b = static_cast<int64_t>(rows.size());
  const int64_t s = pad_to_max_len ? max_len : longest;
  const auto& first = data.examples[static_cast<size_t>(rows.front().front())];
  out.input_ids = torch::full({b, s}, padding_id(first, tokenizer), torch::kLong);
  out.attention_mask = torch::zeros({b, s}, torch::kLong);
  out.labels = torch::full({b, s}, -100, torch::kLong);
  auto ids_a = out.input_ids.accessor<int64_t, 2>();
  auto mask_a = out.attention_mask.accessor<int64_t, 2>();
  auto labels_a = out.labels.accessor<int64_t, 2>();
  for (int64_t r = 0; r < b; ++r) {
    const auto& row = made[static_cast<size_t>(r)];
    for (size_t c = 0; c < row.ids.size(); ++c) {
      const auto col = static_cast<int64_t>(c);
      ids_a[r][col] = row.ids[c];
      mask_a[r][col] = row.doc[c];
      if (!row.first[c]) {
        labels_a[r][col] = row.ids[c];
      }
    }
  }
  out.global_size = b;
  return out;
}

} // namespace

bool Dataset::pretokenized() const {
  return !examples.empty() &&
      std::all_of(examples.begin(), examples.end(), [](const Example& e) {
           return !e.ids.empty();
         });
}

int64_t Dataset::max_token_id() const {
  int64_t out = -1;
  for (const auto& e : examples) {
    for (auto id : e.ids) {
      out = std::max(out, id);
    }
  }
  return out;
}

std::vector<int64_t> epoch_permutation(
    int64_t n,
    uint64_t seed,
    int64_t epoch) {
  TORCH_CHECK(
      n >= 0 && epoch >= 0,
      "epoch_permutation: expected n >= 0 and epoch >= 0, but got ", n, " and ",
      epoch);
  return shuffled(n, epoch_generator(seed, epoch).next());
}

namespace {

// One line of a classification file as read, before the label set is known.
struct RawExample {
  Document doc;
  std::vector<std::string> names;
  std::vector<float> hot;
  int64_t line;
};

// Reads line `raw.line`'s labels, label names or multi-hot values, into raw.
void read_raw_labels(
    const nlohmann::json& j,
    const JsonlOptions& options,
    const std::string& path,
    RawExample& raw) {
  const int64_t line = raw.line;
  auto it = j.find(options.labels_key());
  TORCH_CHECK(
      it != j.end(), where(path, line), ": expected a field \"",
      options.labels_key(),
      "\" (a list of label names or a multi-hot list), but the line has none");
  const auto& labels = *it;
  if (labels.is_string()) {
    raw.names.push_back(labels.get<std::string>());
    return;
  }
  TORCH_CHECK(
      labels.is_array(), where(path, line), ": expected \"",
      options.labels_key(),
      "\" to be a list of label names or of 0/1, but got ",
      io::describe_json(labels));
  for (const auto& l : labels) {
    if (l.is_string()) {
      raw.names.push_back(l.get<std::string>());
    } else {
      TORCH_CHECK(
          l.is_number() && l.get<double>() >= 0 && l.get<double>() <= 1,
          where(path, line),
          ": expected label names or multi-hot values in [0, 1], but got ",
          io::describe_json(l));
      raw.hot.push_back(l.get<float>());
    }
  }
  TORCH_CHECK(
      raw.names.empty() || raw.hot.empty(), where(path, line),
      ": expected \"", options.labels_key(),
      "\" to hold label names or numbers, not both");
}

// The label set when the options give none: the names the lines use, sorted,
// or "0", "1", ... for multi-hot lines.
std::vector<std::string> labels_from_file(
    const std::vector<RawExample>& raws,
    const std::string& path) {
  bool any_names = false, any_hot = false;
  for (const auto& r : raws) {
    any_names = any_names || !r.names.empty();
    any_hot = any_hot || !r.hot.empty();
  }
  TORCH_CHECK(
      !(any_names && any_hot), path,
      ": expected every line's labels to be names or every "
      "line's to be multi-hot, but the file mixes them");
  std::vector<std::string> out;
  if (any_hot) {
    for (const auto& r : raws) {
      if (!r.hot.empty()) {
        for (size_t i = 0; i < r.hot.size(); ++i) {
          out.push_back(std::to_string(i));
        }
        break;
      }
    }
  } else {
    std::set<std::string> seen;
    for (const auto& r : raws) {
      seen.insert(r.names.begin(), r.names.end());
    }
    out.assign(seen.begin(), seen.end());
  }
  TORCH_CHECK(
      !out.empty(), path,
      ": expected labels, but no line has any "
      "(pass JsonlOptions().label_names for a set without positives)");
  return out;
}

// Each label name's position in `label_names`, which must not repeat one.
std::map<std::string, size_t> index_labels(
    const std::vector<std::string>& label_names) {
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < label_names.size(); ++i) {
    TORCH_CHECK(
        index.emplace(label_names[i], i).second,
        "read_classification_jsonl: label '", label_names[i],
        "' is listed twice in label_names");
  }
  return index;
}

// Turns a line's labels into a label vector over `label_names` (`index`
// maps each to its position; `all_names` lists them for errors). Moves from
// `r`.
Example make_example(
    RawExample& r,
    const std::vector<std::string>& label_names,
    const std::map<std::string, size_t>& index,
    const std::string& all_names,
    const std::string& path) {
  Example e{
      std::move(r.doc.text),
      std::vector<float>(label_names.size(), 0.0f),
      std::move(r.doc.ids)};
  for (const auto& name : r.names) {
    auto it = index.find(name);
    TORCH_CHECK(
        it != index.end(), where(path, r.line), ": expected a label among ",
        all_names, ", but got '", shorten(name), "'");
    e.labels[it->second] = 1.0f;
  }
  if (!r.hot.empty()) {
    TORCH_CHECK(
        r.hot.size() == label_names.size(), where(path, r.line),
        ": expected a multi-hot "
        "list of ",
        label_names.size(), " values, but got ", r.hot.size());
    e.labels = std::move(r.hot);
  }
  return e;
}

} // namespace

Dataset read_classification_jsonl(
    const std::string& path,
    const JsonlOptions& options) {
  // Pass 1 reads text and raw labels; the label set may come from the file.
  std::vector<RawExample> raws;
  DocumentReader reader(options, path);
  for_each_json_line(path, [&](int64_t line, const nlohmann::json& j) {
    RawExample raw{reader.read(j, line), {}, {}, line};
    read_raw_labels(j, options, path, raw);
    raws.push_back(std::move(raw));
  });

  Dataset out;
  out.label_names = options.label_names();
  if (out.label_names.empty()) {
    out.label_names = labels_from_file(raws, path);
  }
  const auto index = index_labels(out.label_names);
  std::string all_names;
  for (const auto& n : out.label_names) {
    all_names += (all_names.empty() ? "" : ", ") + n;
  }

  out.examples.reserve(raws.size());
  for (auto& r : raws) {
    out.examples.push_back(
        make_example(r, out.label_names, index, all_names, path));
  }
  return out;
}

Dataset read_text_jsonl(const std::string& path, const JsonlOptions& options) {
  Dataset out;
  DocumentReader reader(options, path);
  for_each_json_line(path, [&](int64_t line, const nlohmann::json& j) {
    auto d = reader.read(j, line);
    out.examples.push_back({std::move(d.text), {}, std::move(d.ids)});
  });
  return out;
}

void write_jsonl(const std::string& path, const Dataset& data) {
  std::string text;
  const bool ids = data.pretokenized();
  for (size_t i = 0; i < data.examples.size(); ++i) {
    const auto& e = data.examples[i];
    TORCH_CHECK(
        e.ids.empty() != ids,
        "write_jsonl: expected every example to have token ids or none to "
        "(a file is all ids or all text), but example 0 has ",
        data.examples[0].ids.empty() ? "none" : "some", " and example ", i,
        " has ", e.ids.empty() ? "none" : "some");
    nlohmann::ordered_json j;
    if (!ids || !e.text.empty()) {
      j["text"] = e.text;
    }
    if (ids) {
      j["input_ids"] = e.ids;
    }
    if (data.is_classification()) {
      TORCH_CHECK(
          e.labels.size() == data.label_names.size(), "write_jsonl: expected ",
          data.label_names.size(), " labels per example, but got ",
          e.labels.size());
      auto names = nlohmann::ordered_json::array();
      for (size_t i = 0; i < e.labels.size(); ++i) {
        if (e.labels[i] >= 0.5f) {
          names.push_back(data.label_names[i]);
        }
      }
      j["labels"] = names;
    }
    text += j.dump() + "\n";
  }
  io::write_file_atomic(path, text);
}

Split split_dataset(const Dataset& data, double valid_fraction, uint64_t seed) {
  TORCH_CHECK(
      valid_fraction >= 0 && valid_fraction < 1,
      "split_dataset: expected valid_fraction in "
      "[0, 1), but got ",
      valid_fraction);
  const auto n = data.size();
  const auto n_valid = static_cast<int64_t>(
      std::llround(valid_fraction * static_cast<double>(n)));
  auto order = shuffled(n, seed);
  std::vector<char> is_valid(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n_valid; ++i) {
    is_valid[static_cast<size_t>(order[static_cast<size_t>(i)])] = 1;
  }
  Split out;
  out.train.label_names = out.valid.label_names = data.label_names;
  for (int64_t i = 0; i < n; ++i) {
    (is_valid[static_cast<size_t>(i)] ? out.valid : out.train)
        .examples.push_back(data.examples[static_cast<size_t>(i)]);
  }
  return out;
}

Batch collate(
    const Dataset& data,
    const std::vector<int64_t>& indices,
    const io::Tokenizer& tokenizer,
    const CollateOptions& options) {
  TORCH_CHECK(
      !indices.empty(), "collate: expected at least one index, but got none");
  TORCH_CHECK(
      options.max_len() >= 2, "collate: expected max_len >= 2, but got ",
      options.max_len());
  std::vector<std::vector<int64_t>> rows;
  rows.reserve(indices.size());
  int64_t longest = 0;
  for (auto i : indices) {
    TORCH_CHECK(
        i >= 0 && i < data.size(), "collate: expected indices in [0, ",
        data.size(), "), but got ", i);
    rows.push_back(encode_example(
        data.examples[static_cast<size_t>(i)], tokenizer, options.max_len()));
    longest =
        std::max<int64_t>(longest, static_cast<int64_t>(rows.back().size()));
  }
  const int64_t b = static_cast<int64_t>(indices.size());
  const int64_t s = options.pad_to_max_len() ? options.max_len() : longest;
  const auto& first = data.examples[static_cast<size_t>(indices.front())];
  auto ids = torch::full({b, s}, padding_id(first, tokenizer), torch::kLong);
  auto mask = torch::zeros({b, s}, torch::kLong);
  auto ids_a = ids.accessor<int64_t, 2>();
  auto mask_a = mask.accessor<int64_t, 2>();
  for (int64_t r = 0; r < b; ++r) {
    const auto& row = rows[static_cast<size_t>(r)];
    for (size_t c = 0; c < row.size(); ++c) {
      ids_a[r][static_cast<int64_t>(c)] = row[c];
      mask_a[r][static_cast<int64_t>(c)] = 1;
    }
  }
  Batch out;
  out.input_ids = ids;
  out.attention_mask = mask;
  out.indices = indices;
  out.global_size = b;
  if (data.is_classification()) {
    const auto l = data.num_labels();
    out.labels = torch::zeros({b, l}, torch::kFloat);
    auto lab = out.labels.accessor<float, 2>();
    for (int64_t r = 0; r < b; ++r) {
      const auto& e =
          data.examples[static_cast<size_t>(indices[static_cast<size_t>(r)])];
      TORCH_CHECK(
          static_cast<int64_t>(e.labels.size()) == l, "collate: expected ", l,
          " labels for example ", indices[static_cast<size_t>(r)], ", but got ",
          e.labels.size());
      for (int64_t c = 0; c < l; ++c) {
        lab[r][c] = e.labels[static_cast<size_t>(c)];
      }
    }
  } else {
    out.labels = ids.masked_fill(mask == 0, -100);
  }
  return out;
}

// ---------------------------------------------------------------- loader

nlohmann::json LoaderPosition::to_json() const {
  return {{"epoch", epoch}, {"index", index}, {"seed", seed}};
}

LoaderPosition LoaderPosition::from_json(const nlohmann::json& j) {
  TORCH_CHECK(
      j.is_object(), "loader position: expected a JSON object, but got ",
      j.type_name());
  auto get = [&](const char* key) -> const nlohmann::json& {
    auto it = j.find(key);
    TORCH_CHECK(
        it != j.end() && it->is_number_integer(),
        "loader position: expected an integer field \"", key, "\", but got ",
        it == j.end() ? std::string("none") : io::describe_json(*it));
    return *it;
  };
  LoaderPosition p;
  p.epoch = get("epoch").get<int64_t>();
  p.index = get("index").get<int64_t>();
  TORCH_CHECK(
      get("seed").is_number_unsigned(),
      "loader position: expected \"seed\" >= 0");
  p.seed = get("seed").get<uint64_t>();
  TORCH_CHECK(
      p.epoch >= 0 && p.index >= 0,
      "loader position: expected epoch and index >= 0, but got ", p.epoch,
      " and ", p.index);
  return p;
}

namespace {

// Checks max_tokens against max_len, world_size and drop_last, when a token
// budget is on.
void check_token_budget(const DataLoaderOptions& options) {
  const auto w = options.world_size();
  const auto max_len = options.max_len();
  const auto max_tokens = options.max_tokens();
  if (w == 1) {
    TORCH_CHECK(
        max_tokens >= max_len,
        "DataLoader: max_tokens: expected at least max_len (", max_len,
        ") tokens, so that a row of any length fits, but got ", max_tokens);
  } else {
    TORCH_CHECK(
        max_tokens / w >= max_len,
        "DataLoader: max_tokens: expected at least world_size * max_len (",
        w, " * ", max_len,
        ") tokens, so that every rank gets a row of any length, but got ",
        max_tokens);
  }
  TORCH_CHECK(
      !options.drop_last(),
      "DataLoader: drop_last: expected false with max_tokens (a token "
      "budget's batches have no fixed size), but got true");
}

// Checks a DataLoader's options against each other and against `data`.
void check_loader_options(
    const Dataset& data,
    const DataLoaderOptions& options) {
  const auto n = data.size();
  const auto b = options.batch_size();
  const auto w = options.world_size();
  const auto max_len = options.max_len();
  const auto max_tokens = options.max_tokens();
  TORCH_CHECK(
      n > 0, "DataLoader: expected a non-empty data set, but got 0 documents");
  TORCH_CHECK(b > 0, "DataLoader: expected batch_size > 0, but got ", b);
  TORCH_CHECK(
      w > 0 && options.rank() >= 0 && options.rank() < w,
      "DataLoader: expected 0 <= rank < "
      "world_size, but got rank ",
      options.rank(), " and world_size ", w);
  TORCH_CHECK(
      b >= w,
      "DataLoader: expected batch_size (the global batch) >= world_size, so that every "
      "rank gets a document, but got batch_size ",
      b, " and world_size ", w);
  TORCH_CHECK(
      max_len >= 2, "DataLoader: expected max_len >= 2, but got ", max_len);
  TORCH_CHECK(
      max_tokens >= 0,
      "DataLoader: max_tokens: expected 0 (off) or a token count, but got ",
      max_tokens);
  TORCH_CHECK(
      !options.pack() || max_tokens == 0,
      "DataLoader: pack: expected max_tokens 0 (a packed batch is batch_size "
      "rows of max_len tokens), but got max_tokens ",
      max_tokens);
  TORCH_CHECK(
      !options.pack() || !data.is_classification(),
      "DataLoader: pack: expected a language-modelling set (a packed row has "
      "no single label vector), but got a classification set with ",
      data.num_labels(), " labels");
  if (max_tokens > 0) {
    check_token_budget(options);
  }
}

// Each document's token count after the cut to max_len, where pack or a
// token budget needs it (max_len for all when a budget pads every row);
// empty otherwise.
std::vector<int64_t> document_lengths(
    const Dataset& data,
    const io::Tokenizer& tokenizer,
    const DataLoaderOptions& options) {
  std::vector<int64_t> lengths;
  const bool budget = options.max_tokens() > 0;
  if (options.pack() || (budget && !options.pad_to_max_len())) {
    lengths.reserve(static_cast<size_t>(data.size()));
    for (const auto& e : data.examples) {
      lengths.push_back(static_cast<int64_t>(
          encode_example(e, tokenizer, options.max_len()).size()));
    }
  } else if (budget) {
    // every row is padded
    lengths.assign(static_cast<size_t>(data.size()), options.max_len());
  }
  return lengths;
}

// The rows of each batch under a token budget, cut from the documents
// sorted longest first; `n` documents must make at least one batch.
std::vector<int64_t> budget_batches(
    const std::vector<int64_t>& lengths,
    const DataLoaderOptions& options,
    int64_t n) {
  auto sorted = lengths;
  std::sort(sorted.begin(), sorted.end(), std::greater<int64_t>());
  auto rows = cut_by_budget(
      sorted, options.batch_size(), options.max_tokens(),
      options.world_size());
  TORCH_CHECK(
      !rows.empty(),
      "DataLoader: expected at least one batch per epoch, but ", n,
      " documents make none for world_size ", options.world_size(),
      " with max_tokens ", options.max_tokens());
  return rows;
}

// Batches per epoch of batch_size rows out of `rows` rows (documents, or
// packed rows of `n` documents): a short last batch counts unless drop_last,
// as long as every rank gets a row.
int64_t fixed_batches(
    int64_t rows,
    int64_t n,
    const DataLoaderOptions& options) {
  const auto b = options.batch_size();
  int64_t batches = rows / b;
  const auto rest = rows % b;
  if (rest > 0 && !options.drop_last() && rest >= options.world_size()) {
    ++batches;
  }
  TORCH_CHECK(
      batches > 0,
      "DataLoader: expected at least one batch per epoch, but ", n,
      " documents",
      options.pack() ? c10::str(" (", rows, " packed rows)") : "",
      " make none with batch_size ", b, " (drop_last ", options.drop_last(),
      ")");
  return batches;
}

} // namespace

DataLoader::DataLoader(
    std::shared_ptr<const Dataset> data,
    std::shared_ptr<const io::Tokenizer> tokenizer,
    DataLoaderOptions options)
    : data_(std::move(data)),
      tokenizer_(std::move(tokenizer)),
      options_(std::move(options)) {
  TORCH_CHECK(
      data_ && tokenizer_,
      "DataLoader: expected a data set and a tokenizer, but got null");
  check_loader_options(*data_, options_);
  const auto n = data_->size();

  lengths_ = document_lengths(*data_, *tokenizer_, options_);
  if (options_.max_tokens() > 0) {
    budget_rows_ = budget_batches(lengths_, options_, n);
    batches_per_epoch_ = static_cast<int64_t>(budget_rows_.size());
  } else {
    if (options_.pack()) {
      packed_ = pack_rows(lengths_, options_.max_len());
    }
    const auto rows =
        options_.pack() ? static_cast<int64_t>(packed_.size()) : n;
    batches_per_epoch_ = fixed_batches(rows, n, options_);
  }
  position_.seed = options_.seed();
}

int64_t DataLoader::longest_row() const {
  if (longest_row_ > 0) {
    return longest_row_;
  }
  const auto max_len = options_.max_len();
  if (options_.pad_to_max_len()) {
    longest_row_ = max_len;
  } else if (options_.pack()) {
    for (const auto& row : packed_) {
      int64_t tokens = 0;
      for (const auto doc : row) {
        tokens += lengths_[static_cast<size_t>(doc)];
      }
      longest_row_ = std::max(longest_row_, tokens);
    }
  } else if (!lengths_.empty()) {
    longest_row_ = *std::max_element(lengths_.begin(), lengths_.end());
  } else {
    for (const auto& e : data_->examples) {
      longest_row_ = std::max(
          longest_row_, static_cast<int64_t>(encode_example(e, *tokenizer_, max_len).size()));
      if (longest_row_ == max_len) {
        break; // none is longer
      }
    }
  }
  longest_row_ = std::min(std::max<int64_t>(longest_row_, 1), max_len);
  return longest_row_;
}

void DataLoader::set_position(const LoaderPosition& position) {
  TORCH_CHECK(
      position.epoch >= 0 && position.index >= 0 &&
          position.index <= batches_per_epoch_,
      "DataLoader: expected a position with 0 <= index <= ", batches_per_epoch_,
      " (batches per epoch), but got epoch ", position.epoch, " index ",
      position.index);
  if (position.seed != position_.seed) {
    cached_epoch_ = -1;
  }
  position_ = position;
}

const std::vector<std::vector<int64_t>>& DataLoader::epoch_batches(
    int64_t epoch) const {
  if (cached_epoch_ == epoch) {
    return batches_;
  }
  const bool budget = options_.max_tokens() > 0;
  const auto units =
      options_.pack() ? static_cast<int64_t>(packed_.size()) : data_->size();
  std::vector<int64_t> order;
  if (options_.shuffle()) {
    order = epoch_permutation(units, position_.seed, epoch);
  } else {
    order.resize(static_cast<size_t>(units));
    std::iota(order.begin(), order.end(), int64_t{0});
  }
  batches_.clear();
  batches_.reserve(static_cast<size_t>(batches_per_epoch_));
  if (budget) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return lengths_[static_cast<size_t>(a)] >
          lengths_[static_cast<size_t>(b)];
    });
    auto begin = order.begin();
    for (auto rows : budget_rows_) {
      batches_.emplace_back(begin, begin + rows);
      begin += rows;
    }
    if (options_.shuffle()) {
      auto gen = epoch_generator(position_.seed, epoch);
      gen.next(); // the documents' permutation's
      const auto batch_order = shuffled(batches_per_epoch_, gen.next());
      std::vector<std::vector<int64_t>> reordered;
      reordered.reserve(batches_.size());
      for (auto i : batch_order) {
        reordered.push_back(std::move(batches_[static_cast<size_t>(i)]));
      }
      batches_ = std::move(reordered);
    }
  } else {
    const auto b = options_.batch_size();
    for (int64_t i = 0; i < batches_per_epoch_; ++i) {
      const auto begin = i * b;
      const auto end = std::min(begin + b, units);
      batches_.emplace_back(order.begin() + begin, order.begin() + end);
    }
  }
  cached_epoch_ = epoch;
  return batches_;
}

std::vector<int64_t> DataLoader::global_batch(int64_t epoch, int64_t index)
    const {
  TORCH_CHECK(
      index >= 0 && index < batches_per_epoch_,
      "DataLoader: expected a batch index in [0, ", batches_per_epoch_,
      "), but got ", index);
  TORCH_CHECK(
      epoch >= 0, "DataLoader: expected an epoch >= 0, but got ", epoch);
  const auto& rows = epoch_batches(epoch)[static_cast<size_t>(index)];
  if (!options_.pack()) {
    return rows;
  }
  std::vector<int64_t> out;
  for (auto r : rows) {
    const auto& docs = packed_[static_cast<size_t>(r)];
    out.insert(out.end(), docs.begin(), docs.end());
  }
  return out;
}

std::optional<Batch> DataLoader::next() {
  if (position_.index >= batches_per_epoch_) {
    ++position_.epoch;
    position_.index = 0;
    return std::nullopt;
  }
  const auto& global =
      epoch_batches(position_.epoch)[static_cast<size_t>(position_.index)];
  const auto w = static_cast<size_t>(options_.world_size());
  TORCH_INTERNAL_ASSERT(
      global.size() >= w, "a global batch has fewer rows than ranks");
  std::vector<int64_t> mine;
  for (size_t i = static_cast<size_t>(options_.rank()); i < global.size();
       i += w) {
    mine.push_back(global[i]);
  }
  Batch batch;
  if (options_.pack()) {
    std::vector<std::vector<int64_t>> rows;
    rows.reserve(mine.size());
    for (auto r : mine) {
      rows.push_back(packed_[static_cast<size_t>(r)]);
    }
    batch = collate_packed(
        *data_, rows, *tokenizer_, options_.max_len(),
        options_.pad_to_max_len());
  } else {
    batch = collate(
        *data_, mine, *tokenizer_,
        CollateOptions()
            .max_len(options_.max_len())
            .pad_to_max_len(options_.pad_to_max_len()));
  }
  batch.global_size = static_cast<int64_t>(global.size());
  batch.epoch = position_.epoch;
  batch.index = position_.index;
  ++position_.index;
  return batch;
}

} // namespace train
} // namespace remat
