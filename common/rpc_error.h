#pragma once
// RpcError: a failed call to one of our gRPC services, as the service clients report it
// (actor/actor_client.h, and any other client of the rlhf.v1 services). It carries the
// canonical status code, so a caller can tell "the service is down or slow" (UNAVAILABLE,
// DEADLINE_EXCEEDED) from "the service refused this request" (INVALID_ARGUMENT,
// FAILED_PRECONDITION, ...) without parsing text. Header-only and free of gRPC headers: the
// codes are the canonical numbers that grpc::StatusCode and absl::StatusCode share (0 OK .. 16
// UNAUTHENTICATED).
#include <string>

#include "common/error.h"

namespace rlhf {

// "UNAVAILABLE" for 14 and so on; "CODE_<n>" for a number outside the canonical set.
inline std::string rpc_code_name(int code) {
  static constexpr const char* kNames[] = {
      "OK",                  // 0
      "CANCELLED",           // 1
      "UNKNOWN",             // 2
      "INVALID_ARGUMENT",    // 3
      "DEADLINE_EXCEEDED",   // 4
      "NOT_FOUND",           // 5
      "ALREADY_EXISTS",      // 6
      "PERMISSION_DENIED",   // 7
      "RESOURCE_EXHAUSTED",  // 8
      "FAILED_PRECONDITION", // 9
      "ABORTED",             // 10
      "OUT_OF_RANGE",        // 11
      "UNIMPLEMENTED",       // 12
      "INTERNAL",            // 13
      "UNAVAILABLE",         // 14
      "DATA_LOSS",           // 15
      "UNAUTHENTICATED",     // 16
  };
  if (code >= 0 && code < int(sizeof(kNames) / sizeof(kNames[0]))) return kNames[code];
  return "CODE_" + std::to_string(code);
}

class RpcError : public Error {
 public:
  // Canonical codes a caller commonly branches on.
  static constexpr int kCancelled = 1;
  static constexpr int kInvalidArgument = 3;
  static constexpr int kDeadlineExceeded = 4;
  static constexpr int kResourceExhausted = 8;
  static constexpr int kFailedPrecondition = 9;
  static constexpr int kUnavailable = 14;

  // `target` names the service and its address ("actor 127.0.0.1:50052"), `method` the call
  // ("Generate"); what() reads "actor 127.0.0.1:50052: Generate failed: UNAVAILABLE: <detail>".
  RpcError(const std::string& target, const std::string& method, int code,
           const std::string& detail)
      : Error(target + ": " + method + " failed: " + rpc_code_name(code) + ": " + detail),
        target_(target), method_(method), code_(code), detail_(detail) {}

  int code() const { return code_; }
  const std::string& target() const { return target_; }
  const std::string& method() const { return method_; }
  // The server's (or the channel's) own message, without the prefix.
  const std::string& detail() const { return detail_; }
  // True for the failures that say nothing about the request itself: the service could not be
  // reached or did not answer in time. Retrying an idempotent call is safe after these.
  bool transient() const { return code_ == kUnavailable || code_ == kDeadlineExceeded; }

 private:
  std::string target_;
  std::string method_;
  int code_;
  std::string detail_;
};

}  // namespace rlhf
