// A simulated CUDA execution model: the project's .cu files compile as plain C++ against this header (the simulator
// build, UE_SIM, force-includes it) and their kernels run on the CPU, each block's threads as cooperative fibers.
//
// It runs every block of a launch, block order and thread order shuffled from a seed; the threads of a block switch
// only at __syncthreads() and at warp operations (shuffle, ballot, vote), which is where CUDA code may rely on the
// other threads. What it checks, as compute-sanitizer's synccheck would, and reports as a C++ exception (a Python
// RuntimeError) naming the kernel and the source line:
//   - a __syncthreads() that not every thread of the block reaches (one exited, or waits at another barrier),
//   - a warp operation whose mask names a lane that exited, or that waits somewhere else (a divergent shuffle or
//     ballot), or whose mask leaves out the calling lane,
//   - a launch beyond the grid or block limits (1024 threads a block, 65535 blocks in y and z), or with dynamic
//     shared memory (no kernel here uses it),
//   - a launch of a kernel that declares no __launch_bounds__, or with a block wider than the bound it declares
//     (setup.py's generated unit for each kernel source registers the bounds: register_launch_bounds below),
//   - misuse of the cub stand-ins (cub_sim.h).
// Shared memory (declared with UE_SHARED, csrc/common/shared.h) is heap storage fresh for every block, filled with a
// pattern (0x00 or 0xff, from the seed), so a read before any write gives a different value in the two runs of a
// test; canaries on both sides of each variable are checked when the block ends, so a write past either end is
// reported naming the variable and its declaration (under ASan the canaries are poisoned: any access, at once).
//
// Not modelled: timing, the memory model (every memory access is sequentially consistent here; a race between two
// threads with no barrier between them shows only when the shuffled order changes the result), streams, events,
// graphs, cuBLAS. Those need a GPU (scripts/gpu_check.sh).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <torch/library.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define UE_SIM_ASAN 1
#endif

// ------------------------------------------------------------------------------------------------ CUDA's vocabulary
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)  // read by setup.py from the source, checked at launch (launch_bounds below)
// Shared memory is declared with UE_SHARED (csrc/common/shared.h), which the simulator can check; a plain __shared__
// is a compile error here.
#define __shared__                                                                                                \
  static_assert(sizeof(char) == 0, "declare shared memory with UE_SHARED(type, name, dims) (csrc/common/shared.h), " \
                                   "not __shared__: the simulator gives it per-block storage with canaries");

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

namespace ue_sim {

using Stream = int;  // streams are not modelled: every launch runs to completion before it returns

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kStackBytes =
#ifdef UE_SIM_ASAN
    512 * 1024;  // ASan's redzones make frames larger
#else
    128 * 1024;
#endif

enum class Wait { kNone, kBarrier, kWarp, kExited };
enum class WarpOp { kShflDown, kShflIdx, kBallot, kAll, kAny };

// One UE_SHARED variable of the block being simulated: kCanaryBytes of canary, the variable, kCanaryBytes of canary.
constexpr size_t kCanaryBytes = 64;
constexpr unsigned char kCanary = 0x5a;  // neither fill pattern
struct FreeShared {
  size_t total;
  void operator()(unsigned char* p) const {
#ifdef UE_SIM_ASAN
    ASAN_UNPOISON_MEMORY_REGION(p, total);
#endif
    std::free(p);
  }
};
struct SharedVariable {
  const void* site;  // the declaration's key (shared.h)
  const char* name;
  const char* file;
  int line;
  size_t bytes;
  std::unique_ptr<unsigned char, FreeShared> storage;
};

struct Thread {
  ucontext_t context;
  dim3 index;
  unsigned linear = 0;  // x + y * X + z * X * Y: the lane is linear % 32, the warp linear / 32
  Wait wait = Wait::kNone;
  const char* file = nullptr;  // where it waits
  int line = 0;
  WarpOp op = WarpOp::kShflDown;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0;
#ifdef UE_SIM_ASAN
  void* fake_stack = nullptr;
#endif
};

// Run-wide settings (set from Python through unlearn_engine._C_sim.configure) and what has run.
struct Settings {
  uint64_t seed = 0;
  std::map<std::string, int64_t> launches;  // kernel -> launches
  std::map<std::string, int64_t> blocks;    // kernel -> blocks run
};
inline Settings& settings() {
  static Settings s;
  return s;
}

// The launch being simulated (one at a time per OS thread).
struct Launch {
  const char* kernel = "";
  const char* file = "";
  int line = 0;
  dim3 grid, block, block_index;
  unsigned threads = 0;
  std::vector<Thread> thread;
  char* stacks = nullptr;
  ucontext_t scheduler;
#ifdef UE_SIM_ASAN
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
  Thread* current = nullptr;
  uint64_t barrier_epoch = 0;  // barriers released in this block so far (the cub stand-ins check reuse with it)
  unsigned char pattern = 0;   // fresh shared memory's bytes (from the seed)
  std::vector<SharedVariable> shared;  // this block's, in the order its threads first reached them
  std::string error;           // set by a thread that found a violation; the scheduler throws it
  std::function<void()> body;  // the kernel call with its arguments
};
inline thread_local Launch* g_launch = nullptr;

// The fibers' stacks, kept from launch to launch (uninitialised: zeroing 64 MiB per launch would dominate).
inline char* stack_pool(size_t bytes) {
  static thread_local std::unique_ptr<char[]> pool;
  static thread_local size_t size = 0;
  if (size < bytes) {
    pool.reset(new char[bytes]);
    size = bytes;
  }
  return pool.get();
}

inline Launch& launch_state() { return *g_launch; }
inline Thread& self() { return *g_launch->current; }

[[noreturn]] inline void fail(const std::string& what) {
  const Launch& l = *g_launch;
  std::ostringstream out;
  out << "CUDA simulator: " << l.kernel << " (launched at " << l.file << ":" << l.line << "), block ("
      << l.block_index.x << "," << l.block_index.y << "," << l.block_index.z << "): " << what;
  throw std::runtime_error(out.str());
}

// --------------------------------------------------------------------------------------------------- fibers
inline void switch_to(ucontext_t* from, ucontext_t* to, const void* to_stack, size_t to_size, bool exiting,
                      void** fake_stack_save) {
#ifdef UE_SIM_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : fake_stack_save, to_stack, to_size);
#else
  (void)to_stack; (void)to_size; (void)exiting; (void)fake_stack_save;
#endif
  swapcontext(from, to);
#ifdef UE_SIM_ASAN
  __sanitizer_finish_switch_fiber(*fake_stack_save, nullptr, nullptr);
#endif
}

// From a thread back to the scheduler (the thread waits, or has exited).
inline void yield_to_scheduler(bool exiting = false) {
  Launch& l = launch_state();
  Thread& t = self();
#ifdef UE_SIM_ASAN
  switch_to(&t.context, &l.scheduler, l.scheduler_stack_bottom, l.scheduler_stack_size, exiting, &t.fake_stack);
#else
  switch_to(&t.context, &l.scheduler, nullptr, 0, exiting, nullptr);
#endif
}

inline void thread_entry() {
  Launch& l = launch_state();
#ifdef UE_SIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &l.scheduler_stack_bottom, &l.scheduler_stack_size);
#endif
  try {
    l.body();
  } catch (const std::exception& e) {
    if (l.error.empty()) l.error = e.what();
  }
  self().wait = Wait::kExited;
  yield_to_scheduler(true);
}

// ------------------------------------------------------------------------------------------- index variables
struct Index {
  static const dim3& thread() { return self().index; }
  static const dim3& block() { return g_launch->block_index; }
  static const dim3& block_dim() { return g_launch->block; }
  static const dim3& grid_dim() { return g_launch->grid; }
};

// ----------------------------------------------------------------------------------------------- barriers
inline void syncthreads(const char* file, int line) {
  Thread& t = self();
  t.wait = Wait::kBarrier;
  t.file = file;
  t.line = line;
  yield_to_scheduler();
}

inline std::string where(const Thread& t) {
  std::ostringstream out;
  out << "thread " << t.linear << " (";
  if (t.wait == Wait::kExited) out << "exited";
  else out << (t.wait == Wait::kBarrier ? "__syncthreads" : "warp operation") << " at " << t.file << ":" << t.line;
  out << ")";
  return out.str();
}

// A warp operation: the lane posts its value and waits until every lane of the mask has posted at the same place.
template <typename T>
uint64_t bits_of(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp exchange of a value wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, const char* file, int line) {
  Thread& t = self();
  const unsigned lane = t.linear % kWarpSize;
  if (!((mask >> lane) & 1u)) {
    std::ostringstream out;
    out << "warp operation at " << file << ":" << line << " called by lane " << lane << " (thread " << t.linear
        << ") with mask 0x" << std::hex << mask << ", which leaves that lane out";
    fail(out.str());
  }
  t.wait = Wait::kWarp;
  t.op = op;
  t.mask = mask;
  t.value = value;
  t.arg = arg;
  t.file = file;
  t.line = line;
  yield_to_scheduler();
  return t.result;
}

// The scheduler's half of a warp operation: all lanes of the mask wait at the same place -> results, runnable.
// Returns false when some lane of the mask has not arrived; throws when it never can.
inline bool complete_warp_op(Launch& l, unsigned warp_base, Thread& first) {
  const unsigned mask = first.mask;
  std::vector<Thread*> lanes(kWarpSize, nullptr);
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    if (!((mask >> lane) & 1u)) continue;
    const unsigned linear = warp_base + lane;
    std::ostringstream out;
    if (linear >= l.threads) {
      out << "warp operation at " << first.file << ":" << first.line << " has mask 0x" << std::hex << mask << std::dec
          << ", which names lane " << lane << " of a warp that has no such thread";
      fail(out.str());
    }
    Thread& other = l.thread[linear];
    if (other.wait == Wait::kNone) return false;  // still running: it may yet arrive
    if (other.wait != Wait::kWarp || other.line != first.line || other.file != first.file || other.mask != mask ||
        other.op != first.op) {
      out << "warp operation at " << first.file << ":" << first.line << " (mask 0x" << std::hex << mask << std::dec
          << ") waits for lane " << lane << ", but " << where(other);
      fail(out.str());
    }
    lanes[lane] = &other;
  }
  unsigned ballot = 0;
  for (unsigned lane = 0; lane < kWarpSize; ++lane)
    if (lanes[lane] && lanes[lane]->value) ballot |= 1u << lane;
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    Thread* t = lanes[lane];
    if (!t) continue;
    switch (first.op) {
      case WarpOp::kShflDown: {
        const unsigned src = lane + static_cast<unsigned>(t->arg);
        if (src >= kWarpSize) { t->result = t->value; break; }
        if (!lanes[src]) fail("__shfl_down_sync reads a lane outside its mask (undefined on a GPU)");
        t->result = lanes[src]->value;
        break;
      }
      case WarpOp::kShflIdx: {
        const unsigned src = static_cast<unsigned>(t->arg) % kWarpSize;
        if (!lanes[src]) fail("__shfl_sync reads a lane outside its mask (undefined on a GPU)");
        t->result = lanes[src]->value;
        break;
      }
      case WarpOp::kBallot: t->result = ballot; break;
      case WarpOp::kAll: t->result = ballot == mask; break;
      case WarpOp::kAny: t->result = ballot != 0; break;
    }
  }
  for (Thread* t : lanes)
    if (t) t->wait = Wait::kNone;
  return true;
}

// ------------------------------------------------------------------------------------------ launch bounds
// The first argument of each kernel's __launch_bounds__ (its most threads a block), by kernel name. setup.py scans
// every kernel source for the declarations and registers them from the source's generated unit, where the bound's
// expression is evaluated in the kernel's namespace. A name declared twice with different bounds cannot be checked
// by name: launching it fails.
struct LaunchBound {
  int64_t max_threads = 0;
  std::string declared_at;  // file:line
  bool conflict = false;
};
inline std::map<std::string, LaunchBound>& launch_bounds() {
  static std::map<std::string, LaunchBound> bounds;
  return bounds;
}
inline bool register_launch_bounds(const char* kernel, int64_t max_threads, const char* file, int line) {
  const std::string at = std::string(file) + ":" + std::to_string(line);
  auto [it, added] = launch_bounds().try_emplace(kernel, LaunchBound{max_threads, at});
  if (!added && it->second.max_threads != max_threads) {
    it->second.conflict = true;
    it->second.declared_at += " and " + at;
  }
  return true;
}

// The kernel's name in UE_LAUNCH's text: "ns::row_pass_kernel<scalar_t>" -> "row_pass_kernel".
inline std::string kernel_name(const std::string& launched) {
  std::string name = launched.substr(0, launched.find('<'));
  const size_t scope = name.rfind("::");
  if (scope != std::string::npos) name = name.substr(scope + 2);
  const size_t first = name.find_first_not_of(" \t\n"), last = name.find_last_not_of(" \t\n");
  return first == std::string::npos ? std::string() : name.substr(first, last - first + 1);
}

inline void check_launch_bounds(const char* kernel, uint64_t threads) {
  const std::string name = kernel_name(kernel);
  const auto it = launch_bounds().find(name);
  if (it == launch_bounds().end())
    fail("the kernel declares no __launch_bounds__ (every kernel must; setup.py registers it from the source)");
  const LaunchBound& bound = it->second;
  if (bound.conflict)
    fail("kernels named " + name + " declare different __launch_bounds__ (" + bound.declared_at +
         "): rename one, the launch check finds a bound by name");
  if (threads > static_cast<uint64_t>(bound.max_threads))
    fail("block of " + std::to_string(threads) + " threads is wider than the kernel's __launch_bounds__(" +
         std::to_string(bound.max_threads) + ") (" + bound.declared_at + ")");
}

// ------------------------------------------------------------------------------------------ shared memory
// The storage of a UE_SHARED variable in the block being simulated: the first thread to reach the declaration
// allocates it (malloc: under ASan it also gets ASan's redzones), fills it with the pattern and puts canaries around.
inline unsigned char* shared_storage(const void* site, size_t bytes, const char* name, const char* file, int line) {
  Launch& l = launch_state();
  for (SharedVariable& v : l.shared)
    if (v.site == site) return v.storage.get() + kCanaryBytes;
  const size_t total = bytes + 2 * kCanaryBytes;
  auto* p = static_cast<unsigned char*>(std::malloc(total));  // 16-byte aligned, as is p + kCanaryBytes
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, kCanary, kCanaryBytes);
  std::memset(p + kCanaryBytes, l.pattern, bytes);
  std::memset(p + kCanaryBytes + bytes, kCanary, kCanaryBytes);
#ifdef UE_SIM_ASAN
  ASAN_POISON_MEMORY_REGION(p, kCanaryBytes);
  ASAN_POISON_MEMORY_REGION(p + kCanaryBytes + bytes, kCanaryBytes);
#endif
  l.shared.push_back(SharedVariable{site, name, file, line, bytes, {p, FreeShared{total}}});
  return p + kCanaryBytes;
}

template <typename T>
T& shared(const void* site, const char* name, const char* file, int line) {
  static_assert(std::is_trivially_destructible_v<T> && alignof(T) <= 16,
                "UE_SHARED: the simulator's storage is not constructed or destroyed, and is 16-byte aligned");
  return *reinterpret_cast<T*>(shared_storage(site, sizeof(T), name, file, line));
}

// At the end of a block: every canary intact, else the variable was written past one of its ends. Frees the storage.
inline void check_shared(Launch& l) {
  for (const SharedVariable& v : l.shared) {
    const unsigned char* p = v.storage.get();
#ifdef UE_SIM_ASAN
    ASAN_UNPOISON_MEMORY_REGION(p, v.bytes + 2 * kCanaryBytes);
#endif
    const unsigned char* after = p + kCanaryBytes + v.bytes;
    size_t before_changed = 0, after_changed = 0;
    for (size_t i = 0; i < kCanaryBytes; ++i) {
      before_changed += p[i] != kCanary;
      after_changed += after[i] != kCanary;
    }
    if (before_changed || after_changed) {
      std::ostringstream out;
      out << "shared variable `" << v.name << "` (" << v.file << ":" << v.line << ", " << v.bytes
          << " bytes) was written " << (after_changed ? "past its end" : "before its start") << ": "
          << (after_changed ? after_changed : before_changed) << " of the " << kCanaryBytes << " canary bytes "
          << (after_changed ? "after" : "before") << " it changed";
      fail(out.str());
    }
  }
  l.shared.clear();
}

// ------------------------------------------------------------------------------------------------- the launch
inline void run_block(Launch& l, std::mt19937_64& rng) {
  std::vector<unsigned> order(l.threads);
  for (unsigned i = 0; i < l.threads; ++i) order[i] = i;
  for (unsigned i = 0; i < l.threads; ++i) {
    Thread& t = l.thread[i];
    t = Thread{};
    t.linear = i;
    t.index = dim3(i % l.block.x, (i / l.block.x) % l.block.y, i / (l.block.x * l.block.y));
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = l.stacks + static_cast<size_t>(i) * kStackBytes;
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = nullptr;
    makecontext(&t.context, &thread_entry, 0);
  }
  l.barrier_epoch = 0;
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);  // a different interleaving at every release
    for (unsigned i : order) {
      Thread& t = l.thread[i];
      if (t.wait != Wait::kNone) continue;
      l.current = &t;
#ifdef UE_SIM_ASAN
      void* save = nullptr;
      switch_to(&l.scheduler, &t.context, t.context.uc_stack.ss_sp, kStackBytes, false, &save);
#else
      switch_to(&l.scheduler, &t.context, nullptr, 0, false, nullptr);
#endif
      l.current = nullptr;
      if (!l.error.empty()) throw std::runtime_error(l.error);
    }
    // Every thread now waits or has exited. Warp operations first: they release part of a warp.
    bool released = false, all_exited = true;
    for (unsigned i = 0; i < l.threads; ++i) {
      Thread& t = l.thread[i];
      if (t.wait != Wait::kExited) all_exited = false;
      if (t.wait == Wait::kWarp) {
        l.current = &t;  // for fail()'s report
        released |= complete_warp_op(l, i - i % kWarpSize, t);
        l.current = nullptr;
      }
    }
    if (all_exited) return;
    if (released) continue;
    // A block barrier: every thread must wait at the same __syncthreads().
    const Thread* at = nullptr;
    for (const Thread& t : l.thread)
      if (t.wait == Wait::kBarrier) { at = &t; break; }
    if (!at) fail("deadlock: warp operations wait for each other");
    for (const Thread& t : l.thread) {
      if (t.wait == Wait::kBarrier && t.line == at->line && t.file == at->file) continue;
      std::ostringstream out;
      out << "__syncthreads() at " << at->file << ":" << at->line << " (" << where(*at)
          << ") is not reached by every thread of the block: " << where(t);
      fail(out.str());
    }
    for (Thread& t : l.thread) t.wait = Wait::kNone;
    ++l.barrier_epoch;
  }
}

template <typename Kernel>
struct Launcher {
  const char* kernel;
  const char* file;
  int line;
  dim3 grid, block;
  size_t shared_bytes;
  Kernel fn;

  template <typename... Args>
  void operator()(Args... args) const {  // by value, as a CUDA launch copies its arguments
    const uint64_t threads = uint64_t{block.x} * block.y * block.z;
    Launch l;
    l.kernel = kernel;
    l.file = file;
    l.line = line;
    l.grid = grid;
    l.block = block;
    Launch* outer = g_launch;
    g_launch = &l;
    struct Restore { Launch* outer; ~Restore() { g_launch = outer; } } restore{outer};
    if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64)
      fail("block of " + std::to_string(block.x) + "x" + std::to_string(block.y) + "x" + std::to_string(block.z) +
           " threads: a block holds 1 to 1024 threads (z at most 64)");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > kMaxGridYZ ||
        grid.z > kMaxGridYZ)
      fail("grid of " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z) +
           " blocks is outside the limits (x in [1, 2^31), y and z in [1, 65535])");
    check_launch_bounds(kernel, threads);
    if (shared_bytes != 0) fail("dynamic shared memory is not simulated");
    l.threads = static_cast<unsigned>(threads);
    l.thread.resize(l.threads);
    l.stacks = stack_pool(static_cast<size_t>(l.threads) * kStackBytes);
    const std::tuple<Args...> captured(args...);
    l.body = [this, &captured] { std::apply(fn, captured); };

    Settings& s = settings();
    ++s.launches[kernel];
    std::mt19937_64 rng(s.seed * 0x9e3779b97f4a7c15ull + s.launches[kernel]);
    l.pattern = (s.seed & 1) ? 0xff : 0x00;
    std::vector<uint64_t> blocks(uint64_t{grid.x} * grid.y * grid.z);
    for (uint64_t b = 0; b < blocks.size(); ++b) blocks[b] = b;
    std::shuffle(blocks.begin(), blocks.end(), rng);
    for (uint64_t b : blocks) {
      l.block_index = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                           static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y)));
      l.shared.clear();
      run_block(l, rng);
      check_shared(l);
      ++s.blocks[kernel];
    }
  }
};

template <typename Kernel>
Launcher<Kernel> launch(const char* kernel, const char* file, int line, dim3 grid, dim3 block, size_t shared_bytes,
                        Stream, Kernel fn) {
  return Launcher<Kernel>{kernel, file, line, grid, block, shared_bytes, fn};
}

// --------------------------------------------------------------------------------------------- intrinsics
template <typename T>
T atomic_add(T* address, T value) {
  const T old = *address;  // threads switch only at barriers and warp operations: this is atomic here
  *address = old + value;
  return old;
}
template <typename T>
T atomic_or(T* address, T value) {
  const T old = *address;
  *address = old | value;
  return old;
}

}  // namespace ue_sim

#define threadIdx (::ue_sim::Index::thread())
#define blockIdx (::ue_sim::Index::block())
#define blockDim (::ue_sim::Index::block_dim())
#define gridDim (::ue_sim::Index::grid_dim())
#define warpSize 32

#define __syncthreads() ::ue_sim::syncthreads(__FILE__, __LINE__)
#define __shfl_down_sync(mask, value, delta)                                                                        \
  ::ue_sim::from_bits<decltype(value)>(::ue_sim::warp_op(::ue_sim::WarpOp::kShflDown, (mask),                     \
                                                         ::ue_sim::bits_of(value), (delta), __FILE__, __LINE__))
#define __shfl_sync(mask, value, src_lane)                                                                          \
  ::ue_sim::from_bits<decltype(value)>(::ue_sim::warp_op(::ue_sim::WarpOp::kShflIdx, (mask),                      \
                                                         ::ue_sim::bits_of(value), (src_lane), __FILE__, __LINE__))
#define __ballot_sync(mask, predicate)                                                                       \
  static_cast<unsigned>(::ue_sim::warp_op(::ue_sim::WarpOp::kBallot, (mask), static_cast<bool>(predicate), 0, \
                                          __FILE__, __LINE__))
#define __all_sync(mask, predicate) \
  static_cast<int>(::ue_sim::warp_op(::ue_sim::WarpOp::kAll, (mask), static_cast<bool>(predicate), 0, __FILE__, __LINE__))
#define __any_sync(mask, predicate) \
  static_cast<int>(::ue_sim::warp_op(::ue_sim::WarpOp::kAny, (mask), static_cast<bool>(predicate), 0, __FILE__, __LINE__))

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return ::ue_sim::atomic_add(a, v); }
inline int atomicAdd(int* a, int v) { return ::ue_sim::atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return ::ue_sim::atomic_add(a, v); }
inline float atomicAdd(float* a, float v) { return ::ue_sim::atomic_add(a, v); }
inline unsigned atomicOr(unsigned* a, unsigned v) { return ::ue_sim::atomic_or(a, v); }

// Kernels register their CUDA implementations with TORCH_LIBRARY_IMPL(ns, CUDA, m): here those go to the CPU key (the
// simulated kernels take CPU tensors) and the real CPU registrations are dropped, so every op runs the CUDA path.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) UE_SIM_LIBRARY_IMPL_##k(ns, m, C10_UID)
#define UE_SIM_LIBRARY_IMPL_CUDA(ns, m, uid) _TORCH_LIBRARY_IMPL(ns, CPU, m, uid)
#define UE_SIM_LIBRARY_IMPL_CPU(ns, m, uid) UE_SIM_UNUSED_IMPL(m, uid)
#define UE_SIM_UNUSED_IMPL(m, uid) UE_SIM_UNUSED_IMPL2(m, uid)
#define UE_SIM_UNUSED_IMPL2(m, uid) [[maybe_unused]] static void ue_sim_unregistered_##uid(torch::Library& m)
