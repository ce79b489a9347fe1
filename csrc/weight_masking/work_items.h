// Multi-tensor work lists for the weight-masking kernels.
//
// A list of tensors is cut into work items (tensor, start, length) of at most kItemSize elements, in
// tensor order then index order; one kernel launch (or one parallel loop on CPU) covers all of them.
// kItemSize is a multiple of 8 so that every item starts on a byte of a 1-bit-per-element mask.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

namespace unlearn_engine {

constexpr int64_t kItemSize = 1 << 16;

// A small int64 host table on its way to `device`: for a CUDA device it is filled in pinned memory and copied
// asynchronously on the current stream (a pageable copy would block the host until the GPU is idle). The
// caching host allocator keeps the pinned block until that copy has run.
inline at::Tensor host_table(at::IntArrayRef sizes, const at::Device& device) {
  return at::empty(sizes, at::TensorOptions().dtype(at::kLong).pinned_memory(device.is_cuda()));
}

inline at::Tensor to_device(const at::Tensor& host, const at::Device& device) {
  return device.is_cuda() ? host.to(device, /*non_blocking=*/true) : host;
}

// A host vector as an int64 tensor on `device`, through a pinned asynchronous copy on CUDA.
inline at::Tensor device_vector(const std::vector<int64_t>& values, const at::Device& device) {
  auto t = host_table({static_cast<int64_t>(values.size())}, device);
  std::copy(values.begin(), values.end(), t.data_ptr<int64_t>());
  return to_device(t, device);
}

struct WorkItems {
  std::vector<int64_t> tensor, start, length;  // one entry per item
  int64_t size() const { return static_cast<int64_t>(tensor.size()); }
  // (W, 3) int64 table [tensor, start, length], on `device`.
  at::Tensor table(const at::Device& device) const {
    auto t = host_table({size(), 3}, device);
    auto a = t.accessor<int64_t, 2>();
    for (int64_t i = 0; i < size(); ++i) {
      a[i][0] = tensor[i];
      a[i][1] = start[i];
      a[i][2] = length[i];
    }
    return to_device(t, device);
  }
};

inline WorkItems make_work_items(const std::vector<int64_t>& lengths) {
  WorkItems items;
  for (int64_t t = 0; t < static_cast<int64_t>(lengths.size()); ++t) {
    for (int64_t s = 0; s < lengths[t]; s += kItemSize) {
      items.tensor.push_back(t);
      items.start.push_back(s);
      items.length.push_back(std::min(kItemSize, lengths[t] - s));
    }
  }
  return items;
}

// Device array of the tensors' data pointers (as int64), so one kernel can address many tensors.
inline at::Tensor pointer_table(const std::vector<at::Tensor>& tensors, const at::Device& device) {
  auto t = host_table({static_cast<int64_t>(tensors.size())}, device);
  auto a = t.accessor<int64_t, 1>();
  for (size_t i = 0; i < tensors.size(); ++i) a[i] = reinterpret_cast<int64_t>(tensors[i].data_ptr());
  return to_device(t, device);
}

}  // namespace unlearn_engine
