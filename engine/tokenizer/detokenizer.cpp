#include "engine/tokenizer/detokenizer.hpp"

#include "engine/tokenizer/utf8.hpp"

namespace troupe::engine {

incremental_detokenizer::incremental_detokenizer(std::shared_ptr<const tokenizer> tok,
                                                 std::vector<std::string> stop_strings,
                                                 bool skip_special)
  : tok_(std::move(tok)), skip_special_(skip_special) {
  for (auto& s : stop_strings)
    if (!s.empty())
      stops_.push_back(std::move(s));
}

std::string incremental_detokenizer::push(token_id id, bool may_stop) {
  may_stop_ = may_stop;
  if (stopped_ || (skip_special_ && tok_->is_special(id)))
    return {};
  pending_bytes_.append(tok_->token_bytes(id));
  const size_t used = utf8::append_lossy(held_, pending_bytes_, false);
  pending_bytes_.erase(0, used);
  return release(false, may_stop);
}

std::string incremental_detokenizer::finish() {
  if (stopped_)
    return {};
  utf8::append_lossy(held_, pending_bytes_, true);
  pending_bytes_.clear();
  return release(true, may_stop_);
}

std::string incremental_detokenizer::release(bool final, bool may_stop) {
  // The earliest complete stop string ends the text.
  size_t first = std::string::npos;
  const std::string* which = nullptr;
  for (const auto& stop : stops_) {
    const size_t at = may_stop ? held_.find(stop) : std::string::npos;
    if (at < first) {
      first = at;
      which = &stop;
    }
  }
  if (which != nullptr) {
    stopped_ = *which;
    std::string out = held_.substr(0, first);
    held_.clear();
    return out;
  }
  // Otherwise keep the longest suffix that could still grow into a stop string.
  size_t keep = 0;
  if (!final)
    for (const auto& stop : stops_)
      for (size_t n = std::min(stop.size() - 1, held_.size()); n > keep; --n)
        if (held_.compare(held_.size() - n, n, stop, 0, n) == 0) {
          keep = n;
          break;
        }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

} // namespace troupe::engine
