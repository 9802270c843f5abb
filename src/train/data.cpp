#include "remat/train/data.h"

#include "remat/io/json_text.h"
#include "remat/io/file.h"
#include "train/rng.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
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

} // namespace

std::vector<int64_t> epoch_permutation(
    int64_t n,
    uint64_t seed,
    int64_t epoch) {
  TORCH_CHECK(
      n >= 0 && epoch >= 0,
      "epoch_permutation: expected n >= 0 and epoch >= 0, but got ", n, " and ",
      epoch);
  // Mix the epoch in with a second generator so that nearby seeds and epochs
  // give unrelated permutations.
  SplitMix64 mix(
      seed ^ (0xD1B54A32D192ED03ULL * static_cast<uint64_t>(epoch + 1)));
  return shuffled(n, mix.next());
}

Dataset read_classification_jsonl(
    const std::string& path,
    const JsonlOptions& options) {
  // Pass 1 reads text and raw labels; the label set may come from the file.
  struct Raw {
    std::string text;
    std::vector<std::string> names;
    std::vector<float> hot;
    int64_t line;
  };
  std::vector<Raw> raws;
  bool any_names = false, any_hot = false;
  for_each_json_line(path, [&](int64_t line, const nlohmann::json& j) {
    Raw raw{read_text(j, options, path, line), {}, {}, line};
    auto it = j.find(options.labels_key());
    TORCH_CHECK(
        it != j.end(), where(path, line), ": expected a field \"",
        options.labels_key(),
        "\" (a list of label names or a multi-hot list), but the line has none");
    const auto& labels = *it;
    if (labels.is_string()) {
      raw.names.push_back(labels.get<std::string>());
    } else {
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
    any_names = any_names || !raw.names.empty();
    any_hot = any_hot || !raw.hot.empty();
    raws.push_back(std::move(raw));
  });

  Dataset out;
  out.label_names = options.label_names();
  if (out.label_names.empty()) {
    TORCH_CHECK(
        !(any_names && any_hot), path,
        ": expected every line's labels to be names or every "
        "line's to be multi-hot, but the file mixes them");
    if (any_hot) {
      for (const auto& r : raws) {
        if (!r.hot.empty()) {
          for (size_t i = 0; i < r.hot.size(); ++i) {
            out.label_names.push_back(std::to_string(i));
          }
          break;
        }
      }
    } else {
      std::set<std::string> seen;
      for (const auto& r : raws) {
        seen.insert(r.names.begin(), r.names.end());
      }
      out.label_names.assign(seen.begin(), seen.end());
    }
    TORCH_CHECK(
        !out.label_names.empty(), path,
        ": expected labels, but no line has any "
        "(pass JsonlOptions().label_names for a set without positives)");
  }
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < out.label_names.size(); ++i) {
    TORCH_CHECK(
        index.emplace(out.label_names[i], i).second,
        "read_classification_jsonl: label '", out.label_names[i],
        "' is listed twice in label_names");
  }
  std::string all_names;
  for (const auto& n : out.label_names) {
    all_names += (all_names.empty() ? "" : ", ") + n;
  }

  out.examples.reserve(raws.size());
  for (auto& r : raws) {
    Example e{
        std::move(r.text), std::vector<float>(out.label_names.size(), 0.0f)};
    for (const auto& name : r.names) {
      auto it = index.find(name);
      TORCH_CHECK(
          it != index.end(), where(path, r.line), ": expected a label among ",
          all_names, ", but got '", shorten(name), "'");
      e.labels[it->second] = 1.0f;
    }
    if (!r.hot.empty()) {
      TORCH_CHECK(
          r.hot.size() == out.label_names.size(), where(path, r.line),
          ": expected a multi-hot "
          "list of ",
          out.label_names.size(), " values, but got ", r.hot.size());
      e.labels = std::move(r.hot);
    }
    out.examples.push_back(std::move(e));
  }
  return out;
}

Dataset read_text_jsonl(const std::string& path, const JsonlOptions& options) {
  Dataset out;
  for_each_json_line(path, [&](int64_t line, const nlohmann::json& j) {
    out.examples.push_back({read_text(j, options, path, line), {}});
  });
  return out;
}

void write_jsonl(const std::string& path, const Dataset& data) {
  std::string text;
  for (const auto& e : data.examples) {
    nlohmann::ordered_json j;
    j["text"] = e.text;
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
  std::vector<io::Encoding> rows;
  rows.reserve(indices.size());
  int64_t longest = 0;
  for (auto i : indices) {
    TORCH_CHECK(
        i >= 0 && i < data.size(), "collate: expected indices in [0, ",
        data.size(), "), but got ", i);
    rows.push_back(tokenizer.encode(
        data.examples[static_cast<size_t>(i)].text, options.max_len()));
    longest = std::max<int64_t>(
        longest, static_cast<int64_t>(rows.back().input_ids.size()));
  }
  const int64_t b = static_cast<int64_t>(indices.size());
  const int64_t s = options.pad_to_max_len() ? options.max_len() : longest;
  auto ids = torch::full({b, s}, tokenizer.pad_id(), torch::kLong);
  auto mask = torch::zeros({b, s}, torch::kLong);
  auto ids_a = ids.accessor<int64_t, 2>();
  auto mask_a = mask.accessor<int64_t, 2>();
  for (int64_t r = 0; r < b; ++r) {
    const auto& enc = rows[static_cast<size_t>(r)];
    for (size_t c = 0; c < enc.input_ids.size(); ++c) {
      ids_a[r][static_cast<int64_t>(c)] = enc.input_ids[c];
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
  const auto n = data_->size();
  const auto b = options_.batch_size();
  const auto w = options_.world_size();
  TORCH_CHECK(
      n > 0, "DataLoader: expected a non-empty data set, but got 0 documents");
  TORCH_CHECK(b > 0, "DataLoader: expected batch_size > 0, but got ", b);
  TORCH_CHECK(
      w > 0 && options_.rank() >= 0 && options_.rank() < w,
      "DataLoader: expected 0 <= rank < "
      "world_size, but got rank ",
      options_.rank(), " and world_size ", w);
  TORCH_CHECK(
      b >= w,
      "DataLoader: expected batch_size (the global batch) >= world_size, so that every "
      "rank gets a document, but got batch_size ",
      b, " and world_size ", w);
  TORCH_CHECK(
      options_.max_len() >= 2, "DataLoader: expected max_len >= 2, but got ",
      options_.max_len());
  batches_per_epoch_ = n / b;
  const auto rest = n % b;
  if (rest > 0 && !options_.drop_last() && rest >= w) {
    ++batches_per_epoch_;
  }
  TORCH_CHECK(
      batches_per_epoch_ > 0,
      "DataLoader: expected at least one batch per epoch, but ", n,
      " documents make none with batch_size ", b, " (drop_last ",
      options_.drop_last(), ")");
  position_.seed = options_.seed();
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

std::vector<int64_t> DataLoader::global_batch(int64_t epoch, int64_t index)
    const {
  TORCH_CHECK(
      index >= 0 && index < batches_per_epoch_,
      "DataLoader: expected a batch index in [0, ", batches_per_epoch_,
      "), but got ", index);
  const auto n = data_->size();
  if (cached_epoch_ != epoch) {
    if (options_.shuffle()) {
      order_ = epoch_permutation(n, position_.seed, epoch);
    } else {
      order_.resize(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        order_[static_cast<size_t>(i)] = i;
      }
    }
    cached_epoch_ = epoch;
  }
  const auto b = options_.batch_size();
  const auto begin = index * b;
  const auto end = std::min(begin + b, n);
  return std::vector<int64_t>(order_.begin() + begin, order_.begin() + end);
}

std::optional<Batch> DataLoader::next() {
  if (position_.index >= batches_per_epoch_) {
    ++position_.epoch;
    position_.index = 0;
    return std::nullopt;
  }
  auto global = global_batch(position_.epoch, position_.index);
  std::vector<int64_t> mine;
  for (size_t i = static_cast<size_t>(options_.rank()); i < global.size();
       i += static_cast<size_t>(options_.world_size())) {
    mine.push_back(global[i]);
  }
  auto batch = collate(
      *data_, mine, *tokenizer_,
      CollateOptions()
          .max_len(options_.max_len())
          .pad_to_max_len(options_.pad_to_max_len()));
  batch.global_size = static_cast<int64_t>(global.size());
  batch.epoch = position_.epoch;
  batch.index = position_.index;
  ++position_.index;
  return batch;
}

} // namespace train
} // namespace remat
