// Streaming detokenizer: turns generated token ids into text deltas for SSE streams. It emits only
// whole UTF-8 characters, and holds back text that may still become a stop string spanning tokens.
// One per request, used from the thread that owns the request's stream; never blocks.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/tokenizer/tokenizer.hpp"

namespace troupe::engine {

class incremental_detokenizer {
 public:
  incremental_detokenizer(std::shared_ptr<const tokenizer> tok,
                          std::vector<std::string> stop_strings = {}, bool skip_special = true);

  // Feeds one generated token; returns the text that is now final (possibly empty). After a stop
  // string has appeared, returns the text before it once and then nothing. `may_stop` false
  // (fewer tokens than the request's min_tokens): a stop string does not end the text yet; the
  // text that could still grow into one is held back all the same.
  std::string push(token_id id, bool may_stop = true);

  // End of generation: returns the held text (an unfinished character as U+FFFD, as decode()).
  // The concatenation of every push() and finish() equals tokenizer::decode of all ids, cut before
  // the first stop string.
  std::string finish();

  bool stopped() const { return stopped_.has_value(); }
  // The stop string that ended the text, if any.
  const std::optional<std::string>& stop_string() const { return stopped_; }

 private:
  std::string release(bool final, bool may_stop);

  std::shared_ptr<const tokenizer> tok_;
  std::vector<std::string> stops_;
  bool skip_special_;
  std::string pending_bytes_; // bytes of an unfinished UTF-8 character
  std::string held_;          // whole characters that may be the start of a stop string
  std::optional<std::string> stopped_;
  bool may_stop_ = true; // as of the last push()
};

} // namespace troupe::engine
