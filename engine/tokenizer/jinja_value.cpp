// Jinja values: truthiness, equality, str() and tojson as Python/transformers render them.
#include <cmath>

#include "engine/tokenizer/jinja_ast.hpp"

namespace troupe::engine::jinja {

const value* value::find(const std::string& key) const {
  if (!o)
    return nullptr;
  for (const auto& [k, v] : *o)
    if (k == key)
      return &v;
  return nullptr;
}

void value::put(const std::string& key, value v) {
  depth = std::max(depth, v.depth + 1);
  for (auto& [k, existing] : *o)
    if (k == key) {
      existing = std::move(v);
      return;
    }
  o->emplace_back(key, std::move(v));
}

bool truthy(const value& v) {
  switch (v.type) {
  case value::kind::undefined:
  case value::kind::none:
    return false;
  case value::kind::boolean:
    return v.b;
  case value::kind::integer:
    return v.i != 0;
  case value::kind::number:
    return v.d != 0;
  case value::kind::string:
    return !v.s.empty();
  case value::kind::array:
    return !v.a->empty();
  case value::kind::object:
    return !v.o->empty();
  case value::kind::ns:
    return true;
  }
  return false;
}

namespace {
bool numeric(const value& v) {
  return v.type == value::kind::integer || v.type == value::kind::number ||
         v.type == value::kind::boolean;
}
double as_double(const value& v) {
  return v.type == value::kind::number ? v.d : v.type == value::kind::integer ? v.i : v.b;
}

std::string python_float(double d) {
  if (std::isnan(d))
    return "nan";
  if (std::isinf(d))
    return d > 0 ? "inf" : "-inf";
  if (d == std::floor(d) && std::fabs(d) < 1e16)
    return fmt::format("{:.1f}", d);
  return fmt::format("{}", d); // shortest round-trip, as Python's repr
}

void json_string(std::string& out, const std::string& s) {
  out.push_back('"');
  for (const char c : s) {
    switch (c) {
    case '"':
      out += "\\\"";
      break;
    case '\\':
      out += "\\\\";
      break;
    case '\n':
      out += "\\n";
      break;
    case '\r':
      out += "\\r";
      break;
    case '\t':
      out += "\\t";
      break;
    case '\b':
      out += "\\b";
      break;
    case '\f':
      out += "\\f";
      break;
    default:
      if (static_cast<unsigned char>(c) < 0x20)
        out += fmt::format("\\u{:04x}", static_cast<unsigned char>(c));
      else
        out.push_back(c);
    }
  }
  out.push_back('"');
}
} // namespace

bool equal(const value& a, const value& b) {
  if (numeric(a) && numeric(b))
    return as_double(a) == as_double(b);
  if (a.type != b.type)
    return (a.is_undefined() || a.type == value::kind::none) &&
           (b.is_undefined() || b.type == value::kind::none) && a.type == b.type;
  switch (a.type) {
  case value::kind::string:
    return a.s == b.s;
  case value::kind::array:
    if (a.a->size() != b.a->size())
      return false;
    for (size_t i = 0; i < a.a->size(); ++i)
      if (!equal((*a.a)[i], (*b.a)[i]))
        return false;
    return true;
  case value::kind::object:
  case value::kind::ns: {
    if (a.o->size() != b.o->size())
      return false;
    for (const auto& [k, v] : *a.o) {
      const value* other = b.find(k);
      if (other == nullptr || !equal(v, *other))
        return false;
    }
    return true;
  }
  default:
    return true; // undefined == undefined, none == none
  }
}

std::string to_text(const value& v) {
  switch (v.type) {
  case value::kind::undefined:
    return "";
  case value::kind::none:
    return "None";
  case value::kind::boolean:
    return v.b ? "True" : "False";
  case value::kind::integer:
    return std::to_string(v.i);
  case value::kind::number:
    return python_float(v.d);
  case value::kind::string:
    return v.s;
  case value::kind::array: {
    std::string out = "[";
    for (size_t i = 0; i < v.a->size(); ++i) {
      const value& item = (*v.a)[i];
      if (i > 0)
        out += ", ";
      out += item.type == value::kind::string ? "'" + item.s + "'" : to_text(item);
    }
    return out + "]";
  }
  case value::kind::object:
  case value::kind::ns: {
    std::string out = "{";
    bool first = true;
    for (const auto& [k, item] : *v.o) {
      out += (first ? "'" : ", '") + k + "': ";
      out += item.type == value::kind::string ? "'" + item.s + "'" : to_text(item);
      first = false;
    }
    return out + "}";
  }
  }
  return "";
}

std::string to_json(const value& v, int indent, int depth) {
  std::string out;
  const std::string pad = indent >= 0 ? "\n" + std::string((depth + 1) * indent, ' ') : "";
  const std::string end_pad = indent >= 0 ? "\n" + std::string(depth * indent, ' ') : "";
  const char* sep = indent >= 0 ? "," : ", ";
  switch (v.type) {
  case value::kind::undefined:
  case value::kind::none:
    return "null";
  case value::kind::boolean:
    return v.b ? "true" : "false";
  case value::kind::integer:
    return std::to_string(v.i);
  case value::kind::number:
    return std::isfinite(v.d) ? python_float(v.d) : "NaN";
  case value::kind::string:
    json_string(out, v.s);
    return out;
  case value::kind::array:
    if (v.a->empty())
      return "[]";
    out = "[";
    for (size_t i = 0; i < v.a->size(); ++i)
      out += (i > 0 ? sep : "") + pad + to_json((*v.a)[i], indent, depth + 1);
    return out + end_pad + "]";
  case value::kind::object:
  case value::kind::ns:
    if (v.o->empty())
      return "{}";
    out = "{";
    for (size_t i = 0; i < v.o->size(); ++i) {
      out += (i > 0 ? sep : "") + pad;
      json_string(out, (*v.o)[i].first);
      out += ": " + to_json((*v.o)[i].second, indent, depth + 1);
    }
    return out + end_pad + "}";
  }
  return "null";
}

} // namespace troupe::engine::jinja
