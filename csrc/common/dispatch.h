// The one dtype dispatch of the project. The masking and risk ops accept fp32, fp16 and bf16 only (their
// Python checks reject fp64), so no fp64 kernels are compiled for them; the unlearning loss and RMU also
// take fp64 (reference-precision runs), so they dispatch with it.
#pragma once

#include <ATen/Dispatch.h>

#define UE_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)           \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

#define UE_DISPATCH_FLOAT_HALF_BF16_DOUBLE(TYPE, NAME, ...)     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))
