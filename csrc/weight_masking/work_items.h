// Multi-tensor work lists for the weight-masking kernels.
//
// A list of tensors is cut into work items (tensor, start, length) of at most kItemSize elements, in
// tensor order then index order; one kernel launch (or one parallel loop on CPU) covers all of them.
// kItemSize is a multiple of 8 so that every item starts on a byte of a 1-bit-per-element mask.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace unlearn_engine {

constexpr int64_t kItemSize = 1 << 16;

struct WorkItems {
  std::vector<int64_t> tensor, start, length;  // one entry per item
  int64_t size() const { return static_cast<int64_t>(tensor.size()); }
  // (W, 3) int64 table [tensor, start, length], on `device`.
  at::Tensor table(const at::Device& device) const {
    auto t = at::empty({size(), 3}, at::kLong);
    auto a = t.accessor<int64_t, 2>();
    for (int64_t i = 0; i < size(); ++i) {
      a[i][0] = tensor[i];
      a[i][1] = start[i];
      a[i][2] = length[i];
    }
    return t.to(device);
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
  auto t = at::empty({static_cast<int64_t>(tensors.size())}, at::kLong);
  auto a = t.accessor<int64_t, 1>();
  for (size_t i = 0; i < tensors.size(); ++i) a[i] = reinterpret_cast<int64_t>(tensors[i].data_ptr());
  return t.to(device);
}

}  // namespace unlearn_engine
