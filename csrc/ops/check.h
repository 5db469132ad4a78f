// Argument checks for the torch glue. Messages are concatenated with
// std::string and std::to_string, never streamed: with GCC 13 building against
// torch 2.11 (the H200 machine), any std::ostringstream use inside this
// library crashed the process when a check failed, while c10::str of a single
// string (no stream) worked. Passing one finished std::string to TORCH_CHECK_*
// keeps every error a clean Python exception there too.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>
#include <type_traits>

namespace prunepath::msg {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(c10::string_view s) { return std::string(s.data(), s.size()); }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(c10::IntArrayRef a) {
  std::string out = "[";
  for (size_t i = 0; i < a.size(); ++i) out += (i ? ", " : "") + std::to_string(a[i]);
  return out + "]";
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
std::string piece(T v) {
  return std::to_string(v);
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::string out;
  ((out += piece(args)), ...);
  return out;
}

}  // namespace prunepath::msg

#define PRUNEPATH_CHECK(cond, ...) TORCH_CHECK(cond, ::prunepath::msg::cat(__VA_ARGS__))
#define PRUNEPATH_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::prunepath::msg::cat(__VA_ARGS__))
#define PRUNEPATH_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::prunepath::msg::cat(__VA_ARGS__))
