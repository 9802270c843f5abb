#include "remat/nn/lora.h"

#include "remat/nn/dropout.h"

#include <torch/torch.h>

#include <cmath>
#include <set>
#include <sstream>

namespace remat {
namespace nn {

void LoraOptions::validate() const {
  TORCH_CHECK(rank_ > 0, "remat::nn::LoraOptions: expected rank > 0, but got ", rank_);
  TORCH_CHECK(alpha_ > 0, "remat::nn::LoraOptions: expected alpha > 0, but got ", alpha_);
  TORCH_CHECK(
      dropout_ >= 0 && dropout_ < 1,
      "remat::nn::LoraOptions: expected dropout in [0, 1), but got ", dropout_);
}

ProjectionImpl::ProjectionImpl(ProjectionOptions options_) : options(std::move(options_)) {
  reset();
}

void ProjectionImpl::reset() {
  TORCH_CHECK(
      options.in_features() > 0 && options.out_features() > 0,
      "remat::nn::Projection: expected in_features and out_features > 0, but got ",
      options.in_features(), " and ", options.out_features());
  weight = register_parameter(
      "weight", torch::empty({options.out_features(), options.in_features()}));
  if (options.bias()) {
    bias = register_parameter("bias", torch::empty({options.out_features()}));
  } else {
    bias = register_parameter("bias", {}, /*requires_grad=*/false);
  }
  reset_parameters();
  lora_A = nullptr;
  lora_B = nullptr;
  if (options.lora()) {
    const auto lora = *options.lora();
    options.lora(c10::nullopt);
    add_adapter(lora);
  }
}

void ProjectionImpl::reset_parameters() {
  // torch::nn::Linear's initialisation.
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (bias.defined()) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(options.in_features()));
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

void ProjectionImpl::pretty_print(std::ostream& stream) const {
  stream << "remat::nn::Projection(in_features=" << options.in_features()
         << ", out_features=" << options.out_features()
         << ", bias=" << (options.bias() ? "true" : "false");
  if (options.lora()) {
    stream << ", lora_rank=" << options.lora()->rank()
           << ", lora_alpha=" << options.lora()->alpha();
  }
  stream << ")";
}

torch::Tensor ProjectionImpl::forward(const torch::Tensor& x) {
  auto y = torch::nn::functional::linear(x, weight, bias);
  if (!lora_A) {
    return y;
  }
  const auto& lora = *options.lora();
  auto in = remat::nn::dropout(x, lora.dropout(), is_training());
  return y + lora_B->forward(lora_A->forward(in)) * lora.scaling();
}

void ProjectionImpl::add_adapter(const LoraOptions& lora) {
  lora.validate();
  TORCH_CHECK(
      !has_adapter(),
      "remat::nn::Projection: expected no LoRA adapter before add_adapter, but "
      "this projection already has one (rank ", options.lora()->rank(), ")");
  auto a = torch::nn::Linear(
      torch::nn::LinearOptions(options.in_features(), lora.rank()).bias(false));
  auto b = torch::nn::Linear(
      torch::nn::LinearOptions(lora.rank(), options.out_features()).bias(false));
  {
    torch::NoGradGuard no_grad;
    b->weight.zero_();
  }
  a->to(weight.device(), weight.scalar_type());
  b->to(weight.device(), weight.scalar_type());
  lora_A = register_module("lora_A", a);
  lora_B = register_module("lora_B", b);
  options.lora(lora);
}

void ProjectionImpl::merge_adapter() {
  TORCH_CHECK(
      has_adapter(),
      "remat::nn::Projection: expected a LoRA adapter to merge, but there is none");
  {
    torch::NoGradGuard no_grad;
    weight.add_(torch::mm(lora_B->weight, lora_A->weight), options.lora()->scaling());
  }
  unregister_module("lora_A");
  unregister_module("lora_B");
  lora_A = nullptr;
  lora_B = nullptr;
  options.lora(c10::nullopt);
}

namespace {

bool matches(const std::string& name, const std::string& target) {
  if (name == target) {
    return true;
  }
  return name.size() > target.size() &&
      name.compare(name.size() - target.size(), target.size(), target) == 0 &&
      name[name.size() - target.size() - 1] == '.';
}

bool is_adapter_parameter(const std::string& name) {
  std::stringstream parts(name);
  for (std::string part; std::getline(parts, part, '.');) {
    if (part == "lora_A" || part == "lora_B") {
      return true;
    }
  }
  return false;
}

} // namespace

std::vector<std::string> apply_lora(torch::nn::Module& model, const LoraOptions& options) {
  options.validate();
  TORCH_CHECK(
      !options.targets().empty(),
      "remat::nn::apply_lora: expected at least one target module name "
      "(LoraOptions().targets({\"q_proj\", \"v_proj\"})), but got none");
  std::vector<std::string> adapted;
  std::set<std::string> available;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    auto* proj = item.value()->as<Projection>();
    if (proj == nullptr) {
      continue;
    }
    const auto& name = item.key();
    available.insert(name.substr(name.rfind('.') + 1));
    for (const auto& target : options.targets()) {
      if (matches(name, target)) {
        TORCH_CHECK(
            !proj->has_adapter(),
            "remat::nn::apply_lora: expected '", name, "' without an adapter, "
            "but it already has one; merge_lora first to stack adapters");
        proj->add_adapter(options);
        adapted.push_back(name);
        break;
      }
    }
  }
  if (adapted.empty()) {
    std::ostringstream names;
    for (const auto& n : available) {
      names << (names.tellp() > 0 ? ", " : "") << n;
    }
    std::ostringstream wanted;
    for (const auto& t : options.targets()) {
      wanted << (wanted.tellp() > 0 ? ", " : "") << t;
    }
    TORCH_CHECK(
        false, "remat::nn::apply_lora: expected targets matching projections of "
        "the model (", names.str(), "), but got ", wanted.str());
  }
  for (auto& p : model.named_parameters()) {
    p.value().set_requires_grad(is_adapter_parameter(p.key()));
  }
  return adapted;
}

int64_t merge_lora(torch::nn::Module& model) {
  int64_t merged = 0;
  auto merge = [&merged](torch::nn::Module* m) {
    auto* proj = dynamic_cast<ProjectionImpl*>(m);
    if (proj != nullptr && proj->has_adapter()) {
      proj->merge_adapter();
      ++merged;
    }
  };
  // Not modules(include_self=true): that needs `model` to live in a shared_ptr.
  merge(&model);
  for (const auto& m : model.modules(/*include_self=*/false)) {
    merge(m.get());
  }
  return merged;
}

torch::OrderedDict<std::string, torch::Tensor> trainable_parameters(
    const torch::nn::Module& model) {
  torch::OrderedDict<std::string, torch::Tensor> out;
  for (const auto& p : model.named_parameters()) {
    if (p.value().requires_grad()) {
      out.insert(p.key(), p.value());
    }
  }
  return out;
}

} // namespace nn
} // namespace remat
