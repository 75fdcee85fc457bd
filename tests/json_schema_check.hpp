// A JSON-schema validator for the keywords the structured-output tests' schemas use (type,
// properties, required, additionalProperties, items, minItems, maxItems, enum, const, anyOf,
// minimum, maximum, minLength, maxLength). A keyword it does not know is a failure, so a test can
// never pass by a check skipped. Returns "" when `v` is valid, else where and why not.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace troupe::test {

inline size_t utf8_length(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s)
    n += (c & 0xc0) != 0x80;
  return n;
}

inline std::string schema_violation(const nlohmann::json& schema, const nlohmann::json& v,
                                    const std::string& at = "$") {
  using json = nlohmann::json;
  if (schema.is_boolean())
    return schema.get<bool>() ? "" : at + ": schema false";
  for (const auto& [k, _] : schema.items())
    if (k != "type" && k != "properties" && k != "required" && k != "additionalProperties" &&
        k != "items" && k != "minItems" && k != "maxItems" && k != "enum" && k != "const" &&
        k != "anyOf" && k != "minimum" && k != "maximum" && k != "minLength" && k != "maxLength" &&
        k != "description" && k != "title")
      return at + ": the test validator does not know keyword '" + k + "'";
  if (schema.contains("type")) {
    const auto t = schema["type"].get<std::string>();
    const bool ok = (t == "object" && v.is_object()) || (t == "array" && v.is_array()) ||
                    (t == "string" && v.is_string()) || (t == "integer" && v.is_number_integer()) ||
                    (t == "number" && v.is_number()) || (t == "boolean" && v.is_boolean()) ||
                    (t == "null" && v.is_null());
    if (!ok)
      return at + ": not of type " + t + ": " + v.dump();
  }
  if (schema.contains("const") && v != schema["const"])
    return at + ": not the const " + schema["const"].dump();
  if (schema.contains("enum")) {
    bool found = false;
    for (const auto& e : schema["enum"])
      found = found || e == v;
    if (!found)
      return at + ": not in the enum: " + v.dump();
  }
  if (schema.contains("anyOf")) {
    bool any = false;
    for (const auto& s : schema["anyOf"])
      any = any || schema_violation(s, v, at).empty();
    if (!any)
      return at + ": matches no anyOf branch: " + v.dump();
  }
  if (v.is_number()) {
    if (schema.contains("minimum") && v.get<double>() < schema["minimum"].get<double>())
      return at + ": below minimum";
    if (schema.contains("maximum") && v.get<double>() > schema["maximum"].get<double>())
      return at + ": above maximum";
  }
  if (v.is_string()) {
    const auto n = utf8_length(v.get<std::string>());
    if (schema.contains("minLength") && n < schema["minLength"].get<size_t>())
      return at + ": shorter than minLength";
    if (schema.contains("maxLength") && n > schema["maxLength"].get<size_t>())
      return at + ": longer than maxLength";
  }
  if (v.is_array()) {
    if (schema.contains("minItems") && v.size() < schema["minItems"].get<size_t>())
      return at + ": fewer than minItems";
    if (schema.contains("maxItems") && v.size() > schema["maxItems"].get<size_t>())
      return at + ": more than maxItems";
    if (schema.contains("items"))
      for (size_t i = 0; i < v.size(); ++i)
        if (auto e = schema_violation(schema["items"], v[i], at + "[" + std::to_string(i) + "]");
            !e.empty())
          return e;
  }
  if (v.is_object()) {
    const json props = schema.value("properties", json::object());
    if (schema.contains("required"))
      for (const auto& r : schema["required"])
        if (!v.contains(r.get<std::string>()))
          return at + ": misses required '" + r.get<std::string>() + "'";
    for (const auto& [k, x] : v.items()) {
      if (props.contains(k)) {
        if (auto e = schema_violation(props[k], x, at + "." + k); !e.empty())
          return e;
      } else if (schema.contains("additionalProperties")) {
        if (auto e = schema_violation(schema["additionalProperties"], x, at + "." + k); !e.empty())
          return e;
      }
    }
  }
  return "";
}

} // namespace troupe::test
