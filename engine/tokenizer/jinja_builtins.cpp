// Jinja subset: string/dict methods, filters, tests and global functions used by chat templates.
#include <algorithm>

#include "engine/tokenizer/jinja_ast.hpp"

namespace troupe::engine::jinja {

[[noreturn]] void fail(int line, const std::string& what);

namespace {

constexpr std::string_view whitespace = " \t\n\r\f\v";

std::string strip(const std::string& s, const std::vector<value>& args, bool left, bool right) {
  const std::string chars =
      args.empty() || args[0].type == value::kind::none ? std::string(whitespace) : args[0].s;
  size_t b = 0, e = s.size();
  if (left)
    while (b < e && chars.find(s[b]) != std::string::npos)
      ++b;
  if (right)
    while (e > b && chars.find(s[e - 1]) != std::string::npos)
      --e;
  return s.substr(b, e - b);
}

value split(const std::string& s, const std::vector<value>& args) {
  array out;
  const int64_t max_split = args.size() > 1 ? args[1].i : -1;
  if (args.empty() || args[0].type == value::kind::none) { // runs of whitespace, no empties
    size_t i = 0;
    while (true) {
      i = s.find_first_not_of(whitespace, i);
      if (i == std::string::npos)
        break;
      if (max_split >= 0 && int64_t(out.size()) == max_split) {
        out.push_back(value::string(s.substr(i)));
        break;
      }
      const size_t j = std::min(s.find_first_of(whitespace, i), s.size());
      out.push_back(value::string(s.substr(i, j - i)));
      i = j;
    }
    return value::list(std::move(out));
  }
  const std::string& sep = args[0].s;
  if (sep.empty())
    throw std::invalid_argument("empty separator");
  size_t i = 0;
  for (;;) {
    const size_t j = s.find(sep, i);
    if (j == std::string::npos || (max_split >= 0 && int64_t(out.size()) == max_split)) {
      out.push_back(value::string(s.substr(i)));
      break;
    }
    out.push_back(value::string(s.substr(i, j - i)));
    i = j + sep.size();
  }
  return value::list(std::move(out));
}

bool affix(const std::string& s, const value& arg, bool prefix) {
  auto one = [&](const std::string& a) {
    return a.size() <= s.size() && (prefix ? s.compare(0, a.size(), a) == 0
                                           : s.compare(s.size() - a.size(), a.size(), a) == 0);
  };
  if (arg.type == value::kind::array)
    return std::any_of(arg.a->begin(), arg.a->end(), [&](const value& v) { return one(v.s); });
  return one(arg.s);
}

std::string convert_case(std::string s, bool upper) {
  for (char& c : s)
    c = static_cast<char>(upper ? std::toupper(static_cast<unsigned char>(c))
                                : std::tolower(static_cast<unsigned char>(c)));
  return s;
}

int64_t length_of(const value& v) {
  switch (v.type) {
  case value::kind::string: {
    int64_t n = 0; // code points, as Python's len()
    for (char c : v.s)
      n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
    return n;
  }
  case value::kind::array:
    return v.a->size();
  case value::kind::object:
  case value::kind::ns:
    return v.o->size();
  default:
    return 0;
  }
}

} // namespace

value call_method(const value& self, const std::string& name, const std::vector<value>& args,
                  int line) {
  auto need_string_arg = [&](size_t n) {
    for (size_t i = 0; i < std::min(n, args.size()); ++i)
      if (args[i].type != value::kind::string && args[i].type != value::kind::none &&
          args[i].type != value::kind::array)
        fail(line, fmt::format("{}() expects string arguments", name));
  };
  if (self.type == value::kind::string) {
    const std::string& s = self.s;
    need_string_arg(2);
    if ((name == "startswith" || name == "endswith") && !args.empty())
      return value::boolean(affix(s, args[0], name == "startswith"));
    if (name == "strip")
      return value::string(strip(s, args, true, true));
    if (name == "lstrip")
      return value::string(strip(s, args, true, false));
    if (name == "rstrip")
      return value::string(strip(s, args, false, true));
    if (name == "upper")
      return value::string(convert_case(s, true));
    if (name == "lower")
      return value::string(convert_case(s, false));
    if (name == "split" || name == "rsplit") {
      if (name == "rsplit" && args.size() > 1)
        fail(line, "rsplit() with maxsplit is not supported");
      try {
        return split(s, args);
      } catch (const std::invalid_argument&) {
        fail(line, "split(): empty separator");
      }
    }
    if (name == "replace" && args.size() >= 2) {
      if (args[0].s.empty())
        fail(line, "replace() with an empty pattern is not supported");
      const std::string &from = args[0].s, &to = args[1].s;
      size_t count = 0;
      for (size_t pos = 0; (pos = s.find(from, pos)) != std::string::npos; pos += from.size())
        ++count;
      const double bytes = double(s.size()) + double(count) * (double(to.size()) - from.size());
      if (bytes > double(max_text_bytes))
        fail(line, fmt::format("replace() would make a string of {} bytes (at most {})", bytes,
                               max_text_bytes));
      std::string out;
      out.reserve(static_cast<size_t>(bytes));
      size_t done = 0;
      for (size_t pos = 0; (pos = s.find(from, pos)) != std::string::npos; pos += from.size()) {
        out.append(s, done, pos - done).append(to);
        done = pos + from.size();
      }
      out.append(s, done);
      return value::string(std::move(out));
    }
  }
  if (self.is_mapping()) {
    if (name == "get" && !args.empty()) {
      const value* v = self.find(to_text(args[0]));
      return v ? *v : (args.size() > 1 ? args[1] : value::none());
    }
    if (name == "items" || name == "keys" || name == "values") {
      array out;
      for (const auto& [k, v] : *self.o)
        out.push_back(name == "items"  ? value::list({value::string(k), v})
                      : name == "keys" ? value::string(k)
                                       : v);
      return value::list(std::move(out));
    }
  }
  fail(line, fmt::format("unknown method '{}' on {}", name, to_text(self).substr(0, 40)));
}

value apply_filter(const std::string& name, const value& input, const std::vector<value>& args,
                   const std::vector<std::string>& kwnames, int line) {
  if (name == "tojson") {
    int indent = -1;
    for (size_t i = 0; i < args.size(); ++i) {
      const size_t kw = i + kwnames.size() - args.size(); // index into kwnames when keyword
      const bool is_indent = i + kwnames.size() < args.size() ? i == 0 : kwnames[kw] == "indent";
      if (is_indent && args[i].type == value::kind::integer) {
        if (args[i].i < 0 || args[i].i > 64)
          fail(line, fmt::format("tojson indent {} is outside [0, 64]", args[i].i));
        indent = static_cast<int>(args[i].i);
      }
    }
    return value::string(to_json(input, indent));
  }
  if (name == "trim")
    return value::string(strip(to_text(input), {}, true, true));
  if (name == "length" || name == "count")
    return value::integer(length_of(input));
  if (name == "string")
    return value::string(to_text(input));
  if (name == "upper" || name == "lower")
    return value::string(convert_case(to_text(input), name == "upper"));
  if (name == "default" || name == "d") {
    const bool boolean = args.size() > 1 && truthy(args[1]);
    const bool use_default = input.is_undefined() || (boolean && !truthy(input));
    return use_default ? (args.empty() ? value::string("") : args[0]) : input;
  }
  if ((name == "first" || name == "last") && input.type == value::kind::array) {
    if (input.a->empty())
      return value();
    return name == "first" ? input.a->front() : input.a->back();
  }
  if (name == "join" && input.type == value::kind::array) {
    std::string out;
    const std::string sep = args.empty() ? "" : to_text(args[0]);
    for (size_t i = 0; i < input.a->size(); ++i) {
      out += (i > 0 ? sep : "") + to_text((*input.a)[i]);
      if (out.size() > max_text_bytes)
        fail(line, fmt::format("join() makes a string of more than {} bytes", max_text_bytes));
    }
    return value::string(std::move(out));
  }
  if (name == "list" && input.type == value::kind::array)
    return input;
  if (name == "reverse" && input.type == value::kind::array) {
    array out(input.a->rbegin(), input.a->rend());
    return value::list(std::move(out));
  }
  fail(line, fmt::format("filter '{}' is not supported here", name));
}

bool apply_test(const std::string& name, const value& v, const std::vector<value>& args, int line) {
  using k = value::kind;
  if (name == "defined")
    return !v.is_undefined();
  if (name == "undefined")
    return v.is_undefined();
  if (name == "none")
    return v.type == k::none;
  if (name == "string")
    return v.type == k::string;
  if (name == "number")
    return v.type == k::integer || v.type == k::number;
  if (name == "integer")
    return v.type == k::integer;
  if (name == "float")
    return v.type == k::number;
  if (name == "boolean")
    return v.type == k::boolean;
  if (name == "true")
    return v.type == k::boolean && v.b;
  if (name == "false")
    return v.type == k::boolean && !v.b;
  if (name == "mapping")
    return v.is_mapping();
  if (name == "sequence" || name == "iterable")
    return v.type == k::array || v.type == k::string || v.is_mapping();
  if ((name == "equalto" || name == "eq" || name == "sameas") && !args.empty())
    return equal(v, args[0]);
  fail(line, fmt::format("test '{}' is not supported", name));
}

value call_global(const std::string& name, const std::vector<value>& args,
                  const std::vector<std::string>& kwnames, int line) {
  if (name == "namespace") {
    value ns = value::dict({}, value::kind::ns);
    const size_t positional = args.size() - kwnames.size();
    for (size_t i = 0; i < positional; ++i) // namespace(dict) copies the dict
      if (args[i].is_mapping())
        for (const auto& [k, v] : *args[i].o)
          ns.put(k, v);
    for (size_t i = 0; i < kwnames.size(); ++i)
      ns.put(kwnames[i], args[positional + i]);
    return ns;
  }
  if (name == "raise_exception")
    fail(line, args.empty() ? "raise_exception()" : to_text(args[0]));
  if (name == "range" && !args.empty()) {
    int64_t start = 0, stop = args[0].i, step = 1;
    if (args.size() > 1) {
      start = args[0].i;
      stop = args[1].i;
    }
    if (args.size() > 2)
      step = args[2].i;
    if (step == 0)
      fail(line, "range() step cannot be zero");
    // Python's length, in 128 bits: no overflow for any int64 arguments.
    const __int128 span = step > 0 ? __int128(stop) - start : __int128(start) - stop;
    const __int128 mag = step > 0 ? __int128(step) : -__int128(step);
    const __int128 n = span <= 0 ? 0 : (span + mag - 1) / mag;
    if (n > max_list_items)
      fail(line,
           fmt::format("range() of {} items (at most {})", static_cast<double>(n), max_list_items));
    array out;
    for (int64_t k = 0; k < static_cast<int64_t>(n); ++k)
      out.push_back(value::integer(static_cast<int64_t>(start + __int128(k) * step)));
    return value::list(std::move(out));
  }
  fail(line, fmt::format("function '{}' is not supported", name));
}

} // namespace troupe::engine::jinja
