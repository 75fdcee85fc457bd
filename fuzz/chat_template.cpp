// Fuzz harness: chat templates, both sides attacker-chosen. Input: a Jinja template, then a NUL
// byte, then the messages as JSON (as a request's `messages` arrive after http/ normalises them).
// Without a NUL the input is the template, rendered with a fixed conversation; a template that
// does not parse is ignored after its error, and then the input's messages are rendered by the
// tiny model's ChatML template.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "fuzz/fuzz_util.hpp"
#include "runtime/json_depth.hpp"

namespace {

using ojson = nlohmann::ordered_json;

const ojson& fixed_messages() {
  static const ojson m = ojson::parse(R"([{"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
      "function": {"name": "f", "arguments": {"x": [1, 2.5, "s", null, true]}}}]},
    {"role": "tool", "content": "42"}])");
  return m;
}

void render(const troupe::engine::chat_template& t, const ojson& messages) {
  troupe::engine::chat_options opts;
  (void)t.render(messages, opts);
  opts.add_generation_prompt = false;
  opts.enable_thinking = false;
  opts.tools = ojson::parse(R"([{"type": "function", "function": {"name": "f",
    "parameters": {"type": "object", "properties": {"x": {"type": "array"}}}}}])");
  (void)t.render(messages, opts);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const auto nul = in.find('\0');
  const auto source = in.substr(0, nul);
  ojson messages = fixed_messages();
  if (nul != std::string_view::npos) {
    // http/ refuses bodies nesting deeper than 32 before anything walks them; so does this.
    if (!troupe::json_nesting_within(in.substr(nul + 1), 32))
      return 0;
    messages = ojson::parse(in.substr(nul + 1), nullptr, false);
    if (messages.is_discarded() || !messages.is_array())
      return 0;
  }
  auto t = troupe::engine::chat_template::create(source, ojson{{"bos_token", "<s>"}});
  if (t)
    render(*t, messages);
  else
    (void)t.error().message();
  render(*troupe::fuzz::tiny_model().chat, messages);
  return 0;
}
