#include "train/task.h"

#include "remat/io/file.h"
#include "remat/memory.h"
#include "remat/io/hf.h"
#include "remat/nn/bert.h"
#include "remat/nn/llama.h"
#include "remat/nn/lora.h"
#include "remat/nn/profile.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <limits>
#include <sstream>

namespace remat {
namespace train {

namespace {

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

std::string join(const std::vector<std::string>& names, size_t max_names = 4) {
  std::string out;
  for (size_t i = 0; i < names.size() && i < max_names; ++i) {
    out += (i ? ", " : "") + names[i];
  }
  if (names.size() > max_names) {
    out += " and " + std::to_string(names.size() - max_names) + " more";
  }
  return out;
}

// ------------------------------------------------------------ classification

/// BERT with a linear head on the pooler output, named as Hugging Face's
/// BertForSequenceClassification ("bert.*", "classifier.*").
class BertClassifierImpl : public torch::nn::Cloneable<BertClassifierImpl> {
 public:
  BertClassifierImpl(nn::BertOptions options_, int64_t num_labels_)
      : options(std::move(options_)), num_labels(num_labels_) {
    reset();
  }

  void reset() override {
    bert = register_module("bert", nn::Bert(options));
    dropout = register_module(
        "dropout", torch::nn::Dropout(options.hidden_dropout()));
    classifier = register_module(
        "classifier", torch::nn::Linear(options.hidden_size(), num_labels));
    torch::NoGradGuard no_grad;
    classifier->weight.normal_(0.0, 0.02); // BERT's initializer_range
    classifier->bias.zero_();
  }

  /// [B, S] ids and mask -> [B, num_labels] logits
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& mask) {
    return classifier->forward(dropout->forward(bert->forward(ids, mask).pooler_output));
  }

  nn::BertOptions options;
  int64_t num_labels;
  nn::Bert bert{nullptr};
  torch::nn::Dropout dropout{nullptr};
  torch::nn::Linear classifier{nullptr};
};
TORCH_MODULE(BertClassifier);

class ClassificationTask : public TaskModel {
 public:
  ClassificationTask(nn::BertOptions options, int64_t num_labels)
      : model_(std::move(options), num_labels) {}

  torch::nn::Module& module() override {
    return *model_;
  }
  const torch::nn::Module& module() const override {
    return *model_;
  }
  void set_policy(const CheckpointPolicy& policy) override {
    model_->bert->gradient_checkpointing_enable(policy);
  }
  nn::StagedModel& staged() override {
    return *model_->bert;
  }
  nn::StageHead stage_head(const Batch& batch) override {
    auto* m = model_.get();
    auto head = m->bert->step_head([m, labels = batch.labels](const nn::BertOutput& o) {
      return bce(m->classifier->forward(m->dropout->forward(o.pooler_output)), labels);
    });
    const auto classifier = m->classifier->parameters();
    head.parameters.insert(head.parameters.end(), classifier.begin(), classifier.end());
    return head;
  }
  Batch planning_batch(int64_t batch, int64_t seq) const override {
    const auto device = model_->classifier->weight.device();
    Batch b;
    b.input_ids = torch::zeros({batch, seq}, torch::TensorOptions(torch::kLong).device(device));
    b.attention_mask = torch::ones_like(b.input_ids);
    b.labels = torch::zeros({batch, model_->num_labels}, torch::TensorOptions().device(device));
    return b;
  }
  std::string describe() const override {
    std::ostringstream out;
    model_->bert->pretty_print(out);
    out << " + classifier(" << model_->options.hidden_size() << " -> "
        << model_->num_labels << ")";
    return out.str();
  }
  int64_t loss_units(const Batch& batch) const override {
    return batch.input_ids.size(0);
  }

  torch::Tensor loss(const Batch& batch, torch::Tensor* logits) override {
    auto out = model_->forward(batch.input_ids, batch.attention_mask);
    if (logits != nullptr) {
      *logits = out;
    }
    return bce(out, batch.labels);
  }

  std::vector<std::string> default_lora_targets() const override {
    return {"query", "value"};
  }

  std::string load_pretrained(const std::string& dir) override {
    auto weights = io::read_hf_weights(dir);
    std::map<std::string, torch::Tensor> head, body;
    for (auto& kv : weights) {
      (starts_with(kv.first, "classifier.") ? head : body).insert(kv);
    }
    auto report = io::load_state(
        *model_->bert, body,
        io::LoadStateOptions()
            .strip_prefixes({"bert."})
            .ignore_unexpected(true)
            .ignore_missing(true)
            .cast_dtype(true));
    // A masked-LM checkpoint has no pooler; anything else missing is a
    // folder that does not hold this model.
    std::vector<std::string> missing;
    for (const auto& name : report.missing) {
      if (!starts_with(name, "pooler.")) {
        missing.push_back(name);
      }
    }
    check_field(missing.empty(), "init",
                c10::str("init: '", dir, "' lacks ", missing.size(), " of the encoder's weights (",
                         join(missing), ")"));
    std::string head_note = "a new classifier head";
    auto w = head.find("classifier.weight");
    if (w != head.end() && w->second.sizes() == model_->classifier->weight.sizes() &&
        head.count("classifier.bias")) {
      io::load_state(*model_->classifier, head,
                     io::LoadStateOptions().strip_prefixes({"classifier."}).cast_dtype(true));
      head_note = "its classifier head";
    }
    std::ostringstream out;
    out << "loaded " << report.loaded.size() << " tensors from " << dir << " with "
        << head_note;
    if (!report.missing.empty()) {
      out << "; new: " << join(report.missing);
    }
    if (!report.unexpected.empty()) {
      out << "; skipped: " << join(report.unexpected);
    }
    return out.str();
  }

  void save_pretrained(
      const std::string& dir,
      const std::vector<std::string>& label_names) const override {
    auto copy = std::dynamic_pointer_cast<BertClassifierImpl>(model_->clone());
    TORCH_INTERNAL_ASSERT(copy);
    nn::merge_lora(*copy);
    io::save_state(*copy, dir + "/model.safetensors");
    auto config = io::bert_config_to_json(model_->options);
    config["architectures"] = {"BertForSequenceClassification"};
    config["problem_type"] = "multi_label_classification";
    nlohmann::json id2label = nlohmann::json::object();
    nlohmann::json label2id = nlohmann::json::object();
    for (size_t i = 0; i < label_names.size(); ++i) {
      id2label[std::to_string(i)] = label_names[i];
      label2id[label_names[i]] = i;
    }
    config["id2label"] = id2label;
    config["label2id"] = label2id;
    io::write_file_atomic(dir + "/config.json", config.dump(2) + "\n");
  }

 private:
  static torch::Tensor bce(const torch::Tensor& logits, const torch::Tensor& labels) {
    return torch::binary_cross_entropy_with_logits(logits.to(torch::kFloat), labels);
  }

  BertClassifier model_;
};

// ------------------------------------------------------------ causal LM

class CausalLmTask : public TaskModel {
 public:
  /// `packed`: batches hold several documents per row (TrainOptions::pack),
  /// so a plan is profiled on such rows, their attention mask included.
  CausalLmTask(nn::LlamaOptions options, bool packed)
      : model_(std::move(options)), packed_(packed) {}

  torch::nn::Module& module() override {
    return *model_;
  }
  const torch::nn::Module& module() const override {
    return *model_;
  }
  void set_policy(const CheckpointPolicy& policy) override {
    model_->gradient_checkpointing_enable(policy);
  }
  nn::StagedModel& staged() override {
    return *model_;
  }
  nn::StageHead stage_head(const Batch& batch) override {
    return model_->step_head(batch.labels);
  }
  Batch planning_batch(int64_t batch, int64_t seq) const override {
    const auto device = model_->parameters().front().device();
    Batch b;
    b.input_ids = torch::zeros({batch, seq}, torch::TensorOptions(torch::kLong).device(device));
    b.attention_mask = torch::ones_like(b.input_ids);
    if (packed_) {
      // Two documents per row: the packed path, with its [B, 1, S, S] mask
      // and per-row positions, is what the steps will run.
      b.attention_mask.narrow(1, seq / 2, seq - seq / 2).fill_(2);
    }
    b.labels = b.input_ids; // next-token labels
    return b;
  }
  std::string describe() const override {
    std::ostringstream out;
    model_->pretty_print(out);
    return out.str();
  }
  int64_t loss_units(const Batch& batch) const override {
    // Position s predicts label s + 1; -100 marks padding.
    const auto s = batch.labels.size(1);
    return batch.labels.narrow(1, 1, s - 1).ne(-100).sum().item<int64_t>();
  }

  torch::Tensor loss(const Batch& batch, torch::Tensor* logits) override {
    if (logits == nullptr) {
      // Training: only the loss, so no [B, S, vocab] logits are kept.
      return model_->forward_loss(batch.input_ids, batch.labels, batch.attention_mask);
    }
    auto out = model_->forward(batch.input_ids, batch.attention_mask);
    *logits = out;
    return nn::causal_lm_loss(out, batch.labels);
  }

  std::vector<std::string> default_lora_targets() const override {
    return {"q_proj", "v_proj"};
  }

  std::string load_pretrained(const std::string& dir) override {
    auto report = io::load_state(
        *model_, io::read_hf_weights(dir), io::LoadStateOptions().cast_dtype(true));
    std::ostringstream out;
    out << "loaded " << report.loaded.size() << " tensors from " << dir;
    return out.str();
  }

  void save_pretrained(const std::string& dir, const std::vector<std::string>&)
      const override {
    auto copy = std::dynamic_pointer_cast<nn::LlamaImpl>(model_->clone());
    TORCH_INTERNAL_ASSERT(copy);
    nn::merge_lora(*copy);
    io::save_state(*copy, dir + "/model.safetensors");
    auto config = io::llama_config_to_json(io::llama_config(model_->options));
    io::write_file_atomic(dir + "/config.json", config.dump(2) + "\n");
  }

 private:
  nn::Llama model_;
  bool packed_ = false;
};

} // namespace

plan::Plan TaskModel::plan_budget(
    int64_t budget_bytes,
    int64_t batch,
    int64_t seq,
    int64_t reserve_bytes,
    const plan::ProfileOptions& profile) {
  const auto b = planning_batch(batch, seq);
  return nn::plan_checkpointing(
      staged(), nn::StageBatch(b.input_ids).attention_mask(b.attention_mask), stage_head(b),
      budget_bytes, nn::PlanOptions().reserve_bytes(reserve_bytes).profile(profile));
}

torch::Tensor TaskModel::instrumented_loss(const Batch& batch, const Sample& sample) {
  auto& model = staged();
  auto in_backward = std::make_shared<bool>(false);
  sample("start");
  auto e = model.embed(nn::StageBatch(batch.input_ids).attention_mask(batch.attention_mask));
  sample("embeddings");
  // Each layer call in forward: a hook on its input marks the end of the
  // layer's backward, and a sample after it its forward. Once backward has
  // begun, a call is a recompute: sampled as it starts ("recompute layer"),
  // and as it ends ("recomputed layer") where it runs to the end; the
  // default checkpoint stops early, inside a segment's last layer, once the
  // tensors backward needs are back.
  auto stack = std::make_shared<nn::ObservedStack>(
      model.layer_stack(),
      [sample, in_backward](int64_t i, const torch::Tensor& h, SegmentMode) {
        if (*in_backward) {
          sample("recompute layer " + std::to_string(i));
        } else if (h.requires_grad()) {
          auto hooked = h;
          const auto name = "backward layer " + std::to_string(i);
          hooked.register_hook([sample, name](torch::Tensor) { sample(name); });
        }
      },
      [sample, in_backward](int64_t i, const torch::Tensor&) {
        sample((*in_backward ? "recomputed layer " : "forward layer ") + std::to_string(i));
      });
  auto hidden = nn::run_stack(stack, e.hidden, e.side, model.checkpoint_schedule());
  auto loss = stage_head(batch).loss(hidden);
  sample("loss");
  *in_backward = true;
  return loss;
}

nn::ModelConfig model_config(const TrainOptions& o, int64_t vocab_size) {
  auto config = o.model();
  if (config.vocab() == 0) {
    return config.vocab(vocab_size);
  }
  check_field(config.vocab() >= vocab_size, "vocab",
              c10::str("vocab: expected an embedding of at least the tokenizer's ", vocab_size,
                       " token ids, but got ", config.vocab()));
  return config;
}

int64_t check_step_fits(const nn::ModelConfig& config, bool lora, int64_t limit_bytes) {
  // A lower bound of what the step holds: no optimizer state and, under
  // LoRA, one rank-1 adapter; the classifier head is left out.
  auto spec = config.spec().optimizer(plan::Optimizer::kSgd);
  if (lora) {
    spec.lora_rank(1).lora_targets({"q"});
  }
  return plan::check_fits(spec, limit_bytes, "this machine's memory");
}

std::unique_ptr<TaskModel> make_task_model(
    const TrainOptions& o,
    int64_t vocab_size,
    int64_t num_labels,
    bool pretokenized) {
  const bool init = !o.init_dir().empty();
  const std::string config_path = o.init_dir() + "/config.json";
  // A new model's sizes go through the one description every command
  // builds from, so `train` and `plan`/`estimate` agree on it.
  const auto config = model_config(o, vocab_size);
  if (!init) {
    config.validate();
    check_step_fits(config, o.lora_rank() > 0, memory::physical_bytes());
  }
  // A model read from --init must cover the tokenizer and the sequence. A
  // byte-level tokenizer is the model's own only if the model has exactly
  // its ids (remat trained it on bytes): any other vocabulary gives the
  // byte ids another meaning, silently.
  auto check_covers = [&](int64_t model_vocab, int64_t positions) {
    check_field(model_vocab >= vocab_size, "init",
                pretokenized
                    ? c10::str("init: the model in '", o.init_dir(), "' has ", model_vocab,
                               " token ids, but the data's largest id is ", vocab_size - 1)
                    : c10::str("init: the model in '", o.init_dir(), "' has ", model_vocab,
                               " token ids, but the tokenizer has ", vocab_size));
    check_field(!o.vocab_path().empty() || pretokenized || model_vocab == vocab_size, "init",
                c10::str("init: the model in '", o.init_dir(), "' has ", model_vocab,
                         " token ids and no tokenizer file; expected the byte-level "
                         "tokenizer's ", vocab_size, " ids (a model remat trained on "
                         "bytes), or pass its tokenizer with --vocab"));
    check_field(positions >= o.model().seq(), "seq",
                c10::str("seq: expected at most the model's ", positions,
                         " positions, but got ", o.model().seq()));
  };
  if (o.task() == Task::kClassification) {
    nn::BertOptions b = init ? io::read_bert_config(config_path) : config.bert_options();
    // What the run decides, over the folder's config: dropout, attention.
    b.hidden_dropout(config.dropout_p())
        .attention_dropout(config.dropout_p())
        .attention(config.attention());
    if (init) {
      check_covers(b.vocab_size(), b.max_position_embeddings());
    }
    return std::make_unique<ClassificationTask>(b, num_labels);
  }
  nn::LlamaOptions l =
      init ? io::llama_options(io::read_llama_config(config_path)) : config.llama_options();
  l.attention_dropout(config.dropout_p()).attention(config.attention());
  if (init) {
    check_covers(l.vocab_size(), l.max_position_embeddings());
  }
  return std::make_unique<CausalLmTask>(l, o.pack());
}

} // namespace train
} // namespace remat
