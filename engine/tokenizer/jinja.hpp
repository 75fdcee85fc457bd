// A Jinja subset interpreter for Hugging Face chat templates (the Qwen3 and Llama 3 templates and
// their kin): text, {{ }}, {% if/elif/else %}, {% for %} with loop.*, {% set %} (also ns.attr),
// namespace(), slicing, string methods, filters, tests, whitespace control, with transformers'
// settings trim_blocks and lstrip_blocks. Parsed once at model load; render() is const,
// thread-safe, and does not block.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "runtime/error.hpp"

namespace troupe::engine::jinja {

struct program; // the parsed template (jinja_ast.hpp)

class template_program {
 public:
  // Parses `source`; syntax errors and unsupported constructs name the line.
  static expected<template_program> parse(std::string_view source);

  // Renders with `context` (a JSON object: its keys become variables; ordered_json keeps key order
  // for tojson, as Python dicts do). raise_exception() in the
  // template and runtime type errors come back as errc::invalid_argument.
  expected<std::string> render(const nlohmann::ordered_json& context) const;

 private:
  std::shared_ptr<const program> program_;
};

} // namespace troupe::engine::jinja
