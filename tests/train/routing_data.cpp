#include "train/routing_data.h"

#include "remat/io/file.h"
#include "train/rng.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <set>

namespace remat {
namespace train {

namespace {

using detail::SplitMix64;

// Words only one label uses, in the order of routing_labels().
const std::vector<std::vector<std::string>>& label_words() {
  static const std::vector<std::vector<std::string>> words{
      // finance
      {"invoice",  "budget",        "revenue",  "expense",    "forecast",
       "audit",    "ledger",        "payable",  "receivable", "tax",
       "payroll",  "quarterly",     "earnings", "profit",     "cash",
       "balance",  "reimbursement", "vendor",   "purchase",   "capital",
       "dividend", "interest",      "loan",     "credit",     "debit",
       "bank",     "fiscal",        "cost",     "pricing",    "margin",
       "billing",  "accounting",    "spend",    "accrual"},
      // legal
      {"contract",        "clause",      "liability",    "indemnify",
       "counsel",         "attorney",    "court",        "plaintiff",
       "defendant",       "statute",     "compliance",   "breach",
       "lawsuit",         "settlement",  "jurisdiction", "arbitration",
       "amendment",       "signatory",   "warranty",     "trademark",
       "patent",          "copyright",   "regulation",   "subpoena",
       "litigation",      "judge",       "testimony",    "affidavit",
       "confidentiality", "lawyer",      "dispute",      "nda",
       "legal",           "counterparty"},
      // ops
      {"server",    "outage",      "deploy",   "incident",    "latency",
       "database",  "backup",      "restart",  "monitoring",  "pager",
       "cluster",   "network",     "firewall", "patch",       "rollback",
       "downtime",  "maintenance", "disk",     "cpu",         "kubernetes",
       "container", "logs",        "uptime",   "certificate", "dns",
       "migration", "pipeline",    "release",  "config",      "capacity",
       "storage",   "vpn",         "oncall",   "runbook"},
      // spam
      {"winner",     "prize",      "free",        "congratulations",
       "claim",      "exclusive",  "click",       "unsubscribe",
       "lottery",    "bonus",      "discount",    "cheap",
       "guaranteed", "miracle",    "casino",      "crypto",
       "bitcoin",    "reward",     "gift",        "selected",
       "luxury",     "pills",      "jackpot",     "sweepstakes",
       "promo",      "coupon",     "millionaire", "unclaimed",
       "cash-back",  "giveaway",   "amazing",     "wow",
       "lucky",      "inheritance"},
  };
  return words;
}

// Words two or more labels use: the model must look at context.
struct SharedWord {
  const char* word;
  unsigned labels; ///< bit i: routing_labels()[i]
};
const std::vector<SharedWord>& shared_words() {
  static const std::vector<SharedWord> words{
      {"account", 0b1101}, {"payment", 0b1001},  {"urgent", 0b1110},
      {"terms", 0b1010},   {"transfer", 0b1001}, {"security", 0b1100},
      {"notice", 0b1010},  {"deadline", 0b0011}, {"agreement", 0b0011},
      {"license", 0b0110}, {"renewal", 0b0111},  {"policy", 0b0110},
      {"offer", 0b1001},   {"refund", 0b1001},   {"access", 0b1100},
      {"verify", 0b1100},  {"review", 0b0111},   {"risk", 0b0011},
      {"report", 0b0101},  {"limited", 0b1010},
  };
  return words;
}

// Words every label uses, and documents with no label.
const std::vector<std::string>& filler_words() {
  static const std::vector<std::string> words{
      "the",      "a",         "an",       "of",          "to",
      "and",      "in",        "for",      "on",          "with",
      "is",       "are",       "was",      "be",          "this",
      "that",     "please",    "team",     "we",          "you",
      "our",      "your",      "it",       "will",        "can",
      "by",       "from",      "at",       "as",          "have",
      "has",      "should",    "would",    "all",         "any",
      "new",      "next",      "last",     "week",        "today",
      "tomorrow", "monday",    "friday",   "meeting",     "update",
      "note",     "regarding", "attached", "see",         "below",
      "thanks",   "regards",   "hello",    "hi",          "let",
      "me",       "know",      "if",       "questions",   "following",
      "project",  "status",    "details",  "information", "request",
      "needed",   "before",    "after",    "end",         "day",
      "time",     "check",     "confirm",  "share",       "send",
      "received", "reply",     "message",  "email",       "call",
      "schedule", "plan",      "office",   "manager",     "client",
      "customer", "group",     "item",     "list",        "number",
      "date",     "soon",      "also",     "just",        "still",
      "quick",    "reminder",  "follow",   "up",          "document",
      "draft",    "version",   "final",    "copy",        "file",
      "system",   "process",   "café",     "lunch",       "résumé",
      "hiring",   "holiday",   "party",    "coffee",      "kitchen",
  };
  return words;
}

// What a filler word becomes after BERT's lower-casing and accent stripping.
std::string plain(const std::string& word) {
  if (word == "café") {
    return "cafe";
  }
  if (word == "résumé") {
    return "resume";
  }
  return word;
}

template <typename T>
const T& pick(SplitMix64& rng, const std::vector<T>& v) {
  return v[static_cast<size_t>(rng.below(v.size()))];
}

std::string plural(SplitMix64& rng, std::string w) {
  const char last = w.back();
  if (rng.chance(0.1) && last != 's' && last != 'y' && last != 'x' &&
      last != 'h' && w.find('-') == std::string::npos) {
    w += "s"; // WordPiece gives "word ##s"
  }
  return w;
}

// A signal word for label `l`: mostly its own words, sometimes a shared one.
std::string signal_word(SplitMix64& rng, size_t l) {
  if (rng.chance(0.25)) {
    std::vector<const char*> shared;
    for (const auto& s : shared_words()) {
      if (s.labels & (1u << l)) {
        shared.push_back(s.word);
      }
    }
    return pick(rng, shared);
  }
  return plural(rng, pick(rng, label_words()[l]));
}

// Drops a letter inside an ASCII word (a typo WordPiece will not match).
std::string typo(SplitMix64& rng, std::string w) {
  const bool ascii = std::all_of(w.begin(), w.end(), [](char c) {
    return static_cast<unsigned char>(c) < 0x80;
  });
  if (ascii && w.size() > 3) {
    w.erase(1 + rng.below(w.size() - 2), 1);
  }
  return w;
}

std::string make_text(SplitMix64& rng, const std::vector<size_t>& labels) {
  std::vector<std::vector<std::string>> sentences(1 + rng.below(3));
  size_t total = 0;
  for (auto& sentence : sentences) {
    const auto words = 5 + rng.below(8);
    for (uint64_t i = 0; i < words; ++i) {
      std::string w;
      if (!labels.empty() && rng.chance(0.22)) {
        w = signal_word(rng, pick(rng, labels));
      } else if (rng.chance(0.04)) {
        // A word of a label the document may not have.
        w = signal_word(rng, rng.below(label_words().size()));
      } else if (rng.chance(0.03)) {
        w = std::to_string(rng.below(10000));
        if (rng.chance(0.5)) {
          w = "#" + w;
        }
      } else {
        w = pick(rng, filler_words());
      }
      sentence.push_back(w);
    }
    total += sentence.size();
  }
  // Every label shows at least once in a word of its own.
  for (auto l : labels) {
    uint64_t at = rng.below(total);
    for (auto& sentence : sentences) {
      if (at < sentence.size()) {
        sentence[at] = plural(rng, pick(rng, label_words()[l]));
        break;
      }
      at -= sentence.size();
    }
  }
  std::string text;
  for (auto& sentence : sentences) {
    std::string line;
    for (auto& w : sentence) {
      if (rng.chance(0.03)) {
        w = typo(rng, w);
      }
      if (!line.empty()) {
        line += rng.chance(0.06) ? ", " : " ";
      }
      line += w;
    }
    line[0] =
        static_cast<char>(std::toupper(static_cast<unsigned char>(line[0])));
    const double end = rng.uniform();
    line += end < 0.8 ? "." : end < 0.9 ? "!" : "?";
    text += (text.empty() ? "" : " ") + line;
  }
  return text;
}

} // namespace

const std::vector<std::string>& routing_labels() {
  static const std::vector<std::string> labels{
      "finance", "legal", "ops", "spam"};
  return labels;
}

Dataset make_routing_dataset(int64_t n, uint64_t seed) {
  TORCH_CHECK(n >= 0, "make_routing_dataset: expected n >= 0, but got ", n);
  SplitMix64 rng(SplitMix64(seed).next());
  Dataset data;
  data.label_names = routing_labels();
  const size_t num_labels = routing_labels().size();
  // Chance of being a document's first label, in label order; spam stands
  // alone.
  const double weights[] = {0.30, 0.25, 0.30, 0.15};
  const size_t spam = 3;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<size_t> labels;
    if (!rng.chance(0.08)) {
      double u = rng.uniform(), acc = 0;
      size_t first = num_labels - 1;
      for (size_t l = 0; l < num_labels; ++l) {
        acc += weights[l];
        if (u < acc) {
          first = l;
          break;
        }
      }
      labels.push_back(first);
      if (first != spam && rng.chance(0.2)) {
        std::vector<size_t> others; // a second label, never spam
        for (size_t l = 0; l < spam; ++l) {
          if (l != first) {
            others.push_back(l);
          }
        }
        labels.push_back(pick(rng, others));
      }
    }
    Example e;
    e.text = make_text(rng, labels);
    e.labels.assign(num_labels, 0.0f);
    for (auto l : labels) {
      e.labels[l] = 1.0f;
    }
    if (rng.chance(0.02)) {
      auto& flipped = e.labels[rng.below(num_labels)]; // label noise
      flipped = 1.0f - flipped;
    }
    data.examples.push_back(std::move(e));
  }
  return data;
}

std::vector<std::string> routing_vocab() {
  std::vector<std::string> vocab{"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
  for (const char* p :
       {".", ",", "!", "?", "#", "-", ":", ";", "'", "\"", "(", ")", "/", "@",
        "$", "%"}) {
    vocab.push_back(p);
  }
  for (char d = '0'; d <= '9'; ++d) {
    vocab.push_back(std::string(1, d));
  }
  for (char d = '0'; d <= '9'; ++d) {
    vocab.push_back("##" + std::string(1, d));
  }
  for (const char* suffix : {"##s", "##es", "##ed", "##ing", "##ly", "##er"}) {
    vocab.push_back(suffix);
  }
  std::set<std::string> words;
  for (const auto& list : label_words()) {
    for (const auto& w : list) {
      // "cash-back" is split at the hyphen by BERT.
      auto dash = w.find('-');
      if (dash == std::string::npos) {
        words.insert(w);
      } else {
        words.insert(w.substr(0, dash));
        words.insert(w.substr(dash + 1));
      }
    }
  }
  for (const auto& s : shared_words()) {
    words.insert(s.word);
  }
  for (const auto& w : filler_words()) {
    words.insert(plain(w));
  }
  vocab.insert(vocab.end(), words.begin(), words.end());
  return vocab;
}

void write_routing_files(
    const std::string& dir,
    int64_t n_train,
    int64_t n_valid,
    uint64_t seed) {
  write_jsonl(dir + "/train.jsonl", make_routing_dataset(n_train, seed));
  write_jsonl(
      dir + "/valid.jsonl",
      make_routing_dataset(n_valid, seed ^ 0x5EED0F5A11D0ULL));
  std::string vocab;
  for (const auto& token : routing_vocab()) {
    vocab += token + "\n";
  }
  io::write_file_atomic(dir + "/vocab.txt", vocab);
}

} // namespace train
} // namespace remat
