// The CUDA emulator's runtime: launches, fibers and their scheduling,
// barriers, warps, shared memory, device properties (see cuda_emu.h).
#include "cuda_emu.h"
#undef threadIdx  // the runtime names the fields themselves
#undef blockIdx
#undef blockDim
#undef gridDim

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <semaphore>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define EMU_TSAN 1
extern "C" {
void* __tsan_get_current_fiber();
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#else
#define EMU_TSAN 0
#endif
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                     size_t* size_old);
}
#else
#define EMU_ASAN 0
#endif

// Switching between a host thread and its fibers: on x86-64 a few
// instructions (callee-saved registers, MXCSR and the x87 control word, the
// stack pointer); elsewhere ucontext (which also saves the signal mask with a
// system call at every switch).
#if defined(__x86_64__)
extern "C" {
void emu_switch_stack(void** save_sp, void* load_sp);
void emu_fiber_start();
}
asm(R"(
  .text
  .globl emu_switch_stack
  .hidden emu_switch_stack
  .type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stack, .-emu_switch_stack

  .globl emu_fiber_start
  .hidden emu_fiber_start
  .type emu_fiber_start, @function
emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size emu_fiber_start, .-emu_fiber_start
  .section .note.GNU-stack, "", @progbits
  .text
)");
#endif

namespace emu {
namespace {

// A saved execution context: where a switch away left it.
struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Saves the running context in `from`, runs `to`.
inline void switch_context(Context& from, Context& to) {
#if defined(__x86_64__)
  emu_switch_stack(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

#if !defined(__x86_64__)
// makecontext passes int arguments: the two pointers in halves.
void ucontext_start(unsigned entry_lo, unsigned entry_hi, unsigned arg_lo, unsigned arg_hi) {
  auto join = [](unsigned lo, unsigned hi) { return (static_cast<uintptr_t>(hi) << 32) | lo; };
  reinterpret_cast<void (*)(void*)>(join(entry_lo, entry_hi))(
      reinterpret_cast<void*>(join(arg_lo, arg_hi)));
}
#endif

// `ctx` set to start entry(arg) on the stack [bottom, bottom + size).
inline void make_context(Context& ctx, char* bottom, size_t size, void (*entry)(void*),
                         void* arg) {
#if defined(__x86_64__)
  // The frame emu_switch_stack pops: MXCSR and x87 control word (the
  // current ones), r15, r14, r13 = entry, r12 = arg, rbx, rbp, return
  // address = emu_fiber_start, which calls entry(arg) with an aligned stack.
  auto* top = reinterpret_cast<uint64_t*>(
      (reinterpret_cast<uintptr_t>(bottom + size) & ~uintptr_t(15)));
  uint64_t* sp = top - 8;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = mxcsr | (static_cast<uint64_t>(fpucw) << 32);
  sp[1] = 0;                                            // r15
  sp[2] = 0;                                            // r14
  sp[3] = reinterpret_cast<uint64_t>(entry);            // r13
  sp[4] = reinterpret_cast<uint64_t>(arg);              // r12
  sp[5] = 0;                                            // rbx
  sp[6] = 0;                                            // rbp
  sp[7] = reinterpret_cast<uint64_t>(&emu_fiber_start); // return address
  ctx.sp = sp;
#else
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = bottom;
  ctx.uc.uc_stack.ss_size = size;
  ctx.uc.uc_link = nullptr;
  const auto e = reinterpret_cast<uintptr_t>(entry), a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&ctx.uc, reinterpret_cast<void (*)()>(&ucontext_start), 4,
              static_cast<unsigned>(e), static_cast<unsigned>(e >> 32), static_cast<unsigned>(a),
              static_cast<unsigned>(a >> 32));
#endif
}

constexpr size_t kStaticSharedLimit = 48 << 10;    // static __shared__ per block
constexpr size_t kDynamicSharedDefault = 48 << 10;  // without cudaFuncSetAttribute
constexpr size_t kSharedOptin = 227 << 10;          // per block, opted in (sm_90)
constexpr size_t kSharedPerSM = 228 << 10;
constexpr size_t kSharedReserved = 1 << 10;         // per block, by the system
constexpr int kThreadsPerSM = 2048, kBlocksPerSM = 32;
constexpr unsigned long long kMaxConcurrentThreads = 1 << 16;  // fibers of a grid at once
constexpr size_t kStackBytes = (EMU_ASAN ? 1024 : 256) << 10;

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

int sm_count() {
  static const int n = std::max(1, env_int("LSTM_FUSED_EMU_SMS", 8));
  return n;
}

// What a barrier orders, told to ThreadSanitizer (fibers switch without
// synchronizing, so that only the barriers order them).
inline void tsan_release(const void* token) {
#if EMU_TSAN
  __tsan_release(const_cast<void*>(token));
#else
  (void)token;
#endif
}
inline void tsan_acquire(const void* token) {
#if EMU_TSAN
  __tsan_acquire(const_cast<void*>(token));
#else
  (void)token;
#endif
}

// Thrown in a fiber resumed from a barrier of a launch that failed: it
// unwinds the kernel.
struct Aborted {};

// Where a fiber is. Bookkeeping shared by the fibers of a block and their
// host thread is atomic (relaxed: one host thread touches it) so that the
// race detector sees no race in it and no order from it.
enum State : int { kRunnable, kAtBlock, kAtWarp, kAtGrid, kDone };

// A fiber's stack. No guard page (one per stack would split the mapping,
// and tens of thousands of fibers would exceed the process's map count):
// a canary at the far end, checked when the fiber returns, reports an
// overflow instead.
struct Stack {
  static constexpr uint64_t kCanary = 0x5ca1ab1e0ddba11ull;
  explicit Stack(size_t bytes) : size(bytes) {
    base = static_cast<char*>(mmap(nullptr, size, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (base == MAP_FAILED) throw std::runtime_error("emu: cannot map a fiber stack");
    *reinterpret_cast<uint64_t*>(base) = kCanary;
  }
  ~Stack() { munmap(base, size); }
  char* bottom() const { return base + 64; }
  size_t usable() const { return size - 64; }
  bool intact() const { return *reinterpret_cast<const uint64_t*>(base) == kCanary; }
  char* base;
  size_t size;
};

struct Launch;
struct Block;
struct Runner;

struct Fiber {
  Builtins builtins;
  unsigned tid = 0, lane = 0, warp = 0;
  size_t cursor = 0;  // next static shared allocation
  Block* block = nullptr;
  Runner* runner = nullptr;
  std::atomic<int> state{kRunnable};
  std::atomic<bool> abort{false};
  bool started = false;
  Context context;
  Stack stack{kStackBytes};
  void* tsan = nullptr;
  const std::function<void()>* body = nullptr;
};

struct Warp {
  std::atomic<unsigned> live{0};     // lanes that have not returned
  std::atomic<unsigned> waiting{0};  // lanes held at the warp's barrier
  uint64_t slots[32] = {};
  int token = 0;  // its address: what the warp's barrier orders
};

struct Block {
  Launch* launch = nullptr;
  uint3 idx;
  std::atomic<unsigned> live{0}, at_block{0}, at_grid{0};
  std::vector<std::unique_ptr<Warp>> warps;
  std::unique_ptr<unsigned char[]> arena;
  size_t static_base = 0, arena_bytes = 0;
  int token = 0, done_token = 0;
};

// A barrier of host threads (the blocks of a cooperative grid): parties can
// leave (a block whose threads all returned), a failed launch aborts it.
class HostBarrier {
 public:
  void reset(int parties) {
    std::lock_guard<std::mutex> lock(m_);
    expected_ = parties;
    arrived_ = 0;
    aborted_ = false;
  }
  bool arrive_and_wait() {  // false: aborted
    std::unique_lock<std::mutex> lock(m_);
    if (aborted_) return false;
    const uint64_t gen = gen_;
    if (++arrived_ >= expected_) {
      release();
      return true;
    }
    cv_.wait(lock, [&] { return gen_ != gen || aborted_; });
    return gen_ != gen;
  }
  void leave() {
    std::lock_guard<std::mutex> lock(m_);
    --expected_;
    if (arrived_ > 0 && arrived_ >= expected_) release();
  }
  void abort() {
    std::lock_guard<std::mutex> lock(m_);
    aborted_ = true;
    cv_.notify_all();
  }

 private:
  void release() {
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int expected_ = 0, arrived_ = 0;
  uint64_t gen_ = 0;
  bool aborted_ = false;
};

struct Launch {
  dim3 grid, block;
  size_t dynamic_shared = 0;
  unsigned threads = 0;  // per block
  bool cooperative = false, concurrent = false;
  const std::function<void()>* body = nullptr;
  HostBarrier grid_barrier;
  int grid_token = 0;
  std::string drop_function;
  unsigned drop_line = 0;
  enum { kForward, kReverse, kRandom } order = kForward;
  unsigned seed = 0;
  std::mutex m;
  std::string error;
  std::atomic<bool> failed{false};

  void fail(const std::string& what) {
    {
      std::lock_guard<std::mutex> lock(m);
      if (failed) return;
      error = what;
      failed = true;
    }
    grid_barrier.abort();
  }
  bool drops(const std::source_location& where) const {
    return !drop_function.empty() &&
           std::strstr(where.function_name(), drop_function.c_str()) != nullptr &&
           (drop_line == 0 || where.line() == drop_line);
  }
};

// A host thread running the fibers of one block at a time.
struct Runner {
  Context context;
  void* tsan = nullptr;
  const void* stack_bottom = nullptr;  // of the host thread (for ASan)
  size_t stack_size = 0;
  std::vector<std::unique_ptr<Fiber>> fibers;
  Fiber* current = nullptr;

  void run(Launch& L, Block& b);
  void settle(Block& b, unsigned warp);
  void resume(Fiber& f);
  void yield(Fiber& f, bool dying);
  void abort_all(unsigned n);
  std::string describe(unsigned n) const;
};

thread_local Runner* tl_runner = nullptr;
// The fiber running now on this host thread (atomic: written by the host
// thread's scheduler, read by its fibers).
thread_local std::atomic<Fiber*> tl_fiber{nullptr};

Fiber& current() {
  Fiber* f = tl_fiber.load(std::memory_order_relaxed);
  if (f == nullptr) throw std::runtime_error("emu: a device function called outside a kernel");
  return *f;
}

void fiber_main(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &f.runner->stack_bottom, &f.runner->stack_size);
#endif
  Block& b = *f.block;
  try {
    (*f.body)();
  } catch (const Aborted&) {
  } catch (const std::exception& e) {
    b.launch->fail(e.what());
  } catch (...) {
    b.launch->fail("emu: unknown exception in a kernel");
  }
  if (!f.stack.intact()) b.launch->fail("emu: a CUDA thread overflowed its emulated stack");
  // The thread returned: it no longer takes part in barriers, which may now
  // be complete without it.
  b.warps[f.warp]->live.fetch_and(~(1u << f.lane), std::memory_order_relaxed);
  b.live.fetch_sub(1, std::memory_order_relaxed);
  f.state.store(kDone, std::memory_order_relaxed);
  Runner& runner = *f.runner;
  runner.settle(b, f.warp);
  tsan_release(&b.done_token);  // after the fiber's last access: all it did is ordered
  runner.yield(f, /*dying=*/true);
}

void Runner::resume(Fiber& f) {
  // The scheduler's own bookkeeping comes first: after the switch below the
  // race detector counts every access as the fiber's.
  const bool first = !f.started;
  f.started = true;
  current = &f;
  tl_fiber.store(&f, std::memory_order_relaxed);
#if EMU_TSAN
  // The first switch into a fiber orders it after the launch's set-up; every
  // later switch orders nothing.
  __tsan_switch_to_fiber(f.tsan, first ? 0 : 1);
#endif
  (void)first;
#if EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack.bottom(), f.stack.usable());
#endif
  switch_context(context, f.context);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  tl_fiber.store(nullptr, std::memory_order_relaxed);
  current = nullptr;
}

void Runner::yield(Fiber& f, bool dying) {
#if EMU_TSAN
  __tsan_switch_to_fiber(tsan, 1);
#endif
#if EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(dying ? nullptr : &fake, stack_bottom, stack_size);
#endif
  switch_context(f.context, context);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, &stack_bottom, &stack_size);
#endif
  (void)dying;
}

// Wait states of the n fibers, for a deadlock report.
std::string Runner::describe(unsigned n) const {
  unsigned counts[5] = {};
  for (unsigned i = 0; i < n; ++i) ++counts[fibers[i]->state.load(std::memory_order_relaxed)];
  return std::to_string(counts[kAtBlock]) + " at __syncthreads, " +
         std::to_string(counts[kAtWarp]) + " at a warp barrier, " +
         std::to_string(counts[kAtGrid]) + " at grid.sync, " + std::to_string(counts[kDone]) +
         " returned";
}

// Every waiting fiber resumes to throw Aborted and unwind.
void Runner::abort_all(unsigned n) {
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = *fibers[i];
    if (f.state.load(std::memory_order_relaxed) != kDone) {
      f.abort.store(true, std::memory_order_relaxed);
      f.state.store(kRunnable, std::memory_order_relaxed);
    }
  }
}

// Completes the barriers that every live thread (of the block; of the warp)
// has reached: their threads can run again.
void Runner::settle(Block& b, unsigned warp) {
  const unsigned n = b.launch->threads;
  const unsigned live = b.live.load(std::memory_order_relaxed);
  if (live > 0 && b.at_block.load(std::memory_order_relaxed) == live) {
    b.at_block.store(0, std::memory_order_relaxed);
    for (unsigned i = 0; i < n; ++i)
      if (fibers[i]->state.load(std::memory_order_relaxed) == kAtBlock)
        fibers[i]->state.store(kRunnable, std::memory_order_relaxed);
  }
  Warp& w = *b.warps[warp];
  const unsigned lanes = w.live.load(std::memory_order_relaxed);
  if (lanes != 0 && w.waiting.load(std::memory_order_relaxed) == std::popcount(lanes)) {
    w.waiting.store(0, std::memory_order_relaxed);
    for (unsigned i = 32 * warp; i < std::min(n, 32 * warp + 32); ++i)
      if (fibers[i]->state.load(std::memory_order_relaxed) == kAtWarp)
        fibers[i]->state.store(kRunnable, std::memory_order_relaxed);
  }
}

void Runner::run(Launch& L, Block& b) {
  const unsigned n = L.threads;
  while (fibers.size() < n) {
    fibers.push_back(std::make_unique<Fiber>());
#if EMU_TSAN
    fibers.back()->tsan = __tsan_create_fiber(0);
#endif
  }
#if EMU_TSAN
  if (tsan == nullptr) tsan = __tsan_get_current_fiber();
#endif
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = *fibers[t];
    f.builtins.thread_idx = {t % L.block.x, t / L.block.x % L.block.y,
                             t / (L.block.x * L.block.y)};
    f.builtins.block_idx = b.idx;
    f.builtins.block_dim = L.block;
    f.builtins.grid_dim = L.grid;
    f.tid = t;
    f.lane = t % 32;
    f.warp = t / 32;
    f.cursor = b.static_base;
    f.block = &b;
    f.runner = this;
    f.body = L.body;
    f.started = false;
    f.abort.store(false, std::memory_order_relaxed);
    f.state.store(kRunnable, std::memory_order_relaxed);
    make_context(f.context, f.stack.bottom(), f.stack.usable(), &fiber_main, &f);
  }
  std::vector<unsigned> order(n);
  for (unsigned t = 0; t < n; ++t) order[t] = L.order == Launch::kReverse ? n - 1 - t : t;
  std::mt19937 rng(L.seed + b.idx.x * 7919u + b.idx.y * 104729u + b.idx.z);
  bool aborted = false;
  while (b.live.load(std::memory_order_relaxed) > 0) {
    if (L.order == Launch::kRandom) std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (unsigned t : order) {
      Fiber& f = *fibers[t];
      if (f.state.load(std::memory_order_relaxed) != kRunnable) continue;
      resume(f);
      ran = true;
    }
    if (L.failed && !aborted) {
      abort_all(n);
      aborted = true;
      continue;
    }
    if (ran) continue;
    const unsigned live = b.live.load(std::memory_order_relaxed);
    if (live == 0) break;
    if (L.cooperative && b.at_grid.load(std::memory_order_relaxed) == live) {
      // Every live thread of the block is at grid.sync(): wait for the other blocks.
      const bool ok = L.grid_barrier.arrive_and_wait();
      b.at_grid.store(0, std::memory_order_relaxed);
      if (!ok) {
        abort_all(n);
        aborted = true;
      } else {
        for (unsigned i = 0; i < n; ++i)
          if (fibers[i]->state.load(std::memory_order_relaxed) == kAtGrid)
            fibers[i]->state.store(kRunnable, std::memory_order_relaxed);
      }
      continue;
    }
    L.fail("emu: deadlock in block (" + std::to_string(b.idx.x) + ", " +
           std::to_string(b.idx.y) + ", " + std::to_string(b.idx.z) + "): " + describe(n));
    abort_all(n);
    aborted = true;
  }
  tsan_acquire(&b.done_token);
  if (L.cooperative || L.concurrent) L.grid_barrier.leave();
}

// Host threads that run blocks of concurrent launches, reused.
class Pool {
 public:
  // fn(i) for every i < n, each on its own host thread, all at once.
  void run(unsigned n, const std::function<void(unsigned)>& fn) {
    while (workers_.size() < n) workers_.push_back(std::make_unique<Worker>(this));
    job_ = &fn;
    pending_ = n;
    for (unsigned i = 0; i < n; ++i) {
      workers_[i]->index = i;
      workers_[i]->go.release();
    }
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [&] { return pending_ == 0; });
  }

 private:
  struct Worker {
    explicit Worker(Pool* pool) : owner(pool), thread([this] { main(); }) { thread.detach(); }
    void main() {
      for (;;) {
        go.acquire();
        (*owner->job_)(index);
        std::lock_guard<std::mutex> lock(owner->m_);
        if (--owner->pending_ == 0) owner->done_.notify_one();
      }
    }
    Pool* owner;
    unsigned index = 0;
    std::binary_semaphore go{0};
    std::thread thread;
  };
  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  std::mutex m_;
  std::condition_variable done_;
  unsigned pending_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads live as long as the process
  return *p;
}

Runner& runner() {
  if (tl_runner == nullptr) tl_runner = new Runner();  // one per host thread, kept
  return *tl_runner;
}

std::mutex& launch_mutex() {  // one kernel at a time, as on one stream
  static std::mutex m;
  return m;
}

std::mutex& attr_mutex() {
  static std::mutex m;
  return m;
}
std::map<const void*, size_t>& max_dynamic_shared() {
  static std::map<const void*, size_t> m;
  return m;
}

thread_local cudaError_t last_error = cudaSuccess;
thread_local std::string last_detail;

cudaError_t fail_launch(cudaError_t code, const std::string& what) {
  last_error = code;
  last_detail = what;
  return code;
}

void prepare(Block& b, Launch& L, uint3 idx) {
  b.launch = &L;
  b.idx = idx;
  b.live.store(L.threads, std::memory_order_relaxed);
  b.at_block.store(0, std::memory_order_relaxed);
  b.at_grid.store(0, std::memory_order_relaxed);
  const unsigned warps = (L.threads + 31) / 32;
  if (b.warps.size() != warps) {
    b.warps.clear();
    for (unsigned w = 0; w < warps; ++w) b.warps.push_back(std::make_unique<Warp>());
  }
  for (unsigned w = 0; w < warps; ++w) {
    const unsigned lanes = std::min(32u, L.threads - 32 * w);
    b.warps[w]->live.store(lanes == 32 ? 0xffffffffu : (1u << lanes) - 1,
                           std::memory_order_relaxed);
    b.warps[w]->waiting.store(0, std::memory_order_relaxed);
  }
  b.static_base = (L.dynamic_shared + 127) / 128 * 128;
  const size_t bytes = b.static_base + kStaticSharedLimit;
  if (b.arena_bytes < bytes) {
    b.arena.reset(new unsigned char[bytes]);
    b.arena_bytes = bytes;
  }
  std::memset(b.arena.get(), 0xFF, b.arena_bytes);  // NaN in every float type
}

uint3 block_index(const dim3& grid, unsigned long long i) {
  uint3 idx;
  idx.x = static_cast<unsigned>(i % grid.x);
  idx.y = static_cast<unsigned>(i / grid.x % grid.y);
  idx.z = static_cast<unsigned>(i / (static_cast<unsigned long long>(grid.x) * grid.y));
  return idx;
}

int blocks_per_sm(unsigned threads, size_t dynamic_shared) {
  if (dynamic_shared > kSharedOptin) return 0;
  const int by_threads = kThreadsPerSM / static_cast<int>((threads + 31) / 32 * 32);
  const int by_shared = static_cast<int>(kSharedPerSM / (dynamic_shared + kSharedReserved));
  return std::max(0, std::min({kBlocksPerSM, by_threads, by_shared}));
}

// Holds the calling fiber at a barrier (`state`) until its host thread
// releases it; then orders it after everything released at `token`.
void wait_at(Fiber& f, State state, const void* token) {
  tsan_release(token);
  f.state.store(state, std::memory_order_relaxed);
  f.runner->settle(*f.block, f.warp);
  f.runner->yield(f, false);
  if (f.abort.load(std::memory_order_relaxed)) throw Aborted{};
  tsan_acquire(token);
}

}  // namespace

const Builtins& builtins() { return current().builtins; }

cudaError_t launch(const cudaLaunchConfig_t& config, const void* kernel,
                   const std::function<void()>& body) {
  Launch L;
  L.grid = config.gridDim;
  L.block = config.blockDim;
  L.dynamic_shared = config.dynamicSmemBytes;
  L.body = &body;
  for (unsigned i = 0; i < config.numAttrs; ++i)
    if (config.attrs[i].id == cudaLaunchAttributeCooperative && config.attrs[i].val.cooperative)
      L.cooperative = true;
  L.concurrent = L.cooperative || env_int("LSTM_FUSED_EMU_CONCURRENT", 0) != 0;
  const dim3 &g = L.grid, &b = L.block;
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  const unsigned long long blocks = 1ull * g.x * g.y * g.z;
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024)
    return fail_launch(cudaErrorInvalidConfiguration,
                       "emu: block (" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " +
                           std::to_string(b.z) + ") outside the limits (1024 threads)");
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535)
    return fail_launch(cudaErrorInvalidConfiguration,
                       "emu: grid (" + std::to_string(g.x) + ", " + std::to_string(g.y) + ", " +
                           std::to_string(g.z) + ") outside the limits");
  L.threads = static_cast<unsigned>(threads);
  size_t max_dynamic = kDynamicSharedDefault;
  {
    std::lock_guard<std::mutex> lock(attr_mutex());
    auto it = max_dynamic_shared().find(kernel);
    if (it != max_dynamic_shared().end()) max_dynamic = it->second;
  }
  if (L.dynamic_shared > max_dynamic)
    return fail_launch(cudaErrorInvalidValue,
                       "emu: " + std::to_string(L.dynamic_shared) +
                           " bytes of dynamic shared memory, above the kernel's limit of " +
                           std::to_string(max_dynamic) +
                           " (cudaFuncAttributeMaxDynamicSharedMemorySize)");
  if (L.cooperative) {
    const unsigned long long resident =
        1ull * blocks_per_sm(L.threads, L.dynamic_shared) * sm_count();
    if (blocks > resident)
      return fail_launch(cudaErrorCooperativeLaunchTooLarge,
                         "emu: cooperative launch of " + std::to_string(blocks) +
                             " blocks, only " + std::to_string(resident) + " can be resident");
  }
  if (L.concurrent && blocks * threads > kMaxConcurrentThreads)
    return fail_launch(cudaErrorLaunchOutOfResources,
                       "emu: " + std::to_string(blocks * threads) +
                           " threads are too many to emulate at once");
  if (const char* drop = std::getenv("LSTM_FUSED_EMU_DROP_SYNC"); drop != nullptr && *drop) {
    const std::string spec(drop);
    const size_t colon = spec.find(':');
    L.drop_function = spec.substr(0, colon);
    if (colon != std::string::npos) L.drop_line = std::stoul(spec.substr(colon + 1));
  }
  if (const char* order = std::getenv("LSTM_FUSED_EMU_SCHEDULE"); order != nullptr) {
    const std::string spec(order);
    if (spec == "reverse") {
      L.order = Launch::kReverse;
    } else if (spec.rfind("random", 0) == 0) {
      L.order = Launch::kRandom;
      L.seed = spec.size() > 7 ? static_cast<unsigned>(std::stoul(spec.substr(7))) : 0;
    }
  }

  std::lock_guard<std::mutex> serial(launch_mutex());
  if (L.concurrent) {
    std::vector<std::unique_ptr<Block>> all(blocks);
    for (unsigned long long i = 0; i < blocks; ++i) {
      all[i] = std::make_unique<Block>();
      prepare(*all[i], L, block_index(g, i));
    }
    L.grid_barrier.reset(static_cast<int>(blocks));
    pool().run(static_cast<unsigned>(blocks), [&](unsigned i) { runner().run(L, *all[i]); });
  } else {
    static thread_local Block blk;  // reused: its arena and warps
    for (unsigned long long i = 0; i < blocks && !L.failed; ++i) {
      prepare(blk, L, block_index(g, i));
      runner().run(L, blk);
    }
  }
  if (L.failed) return fail_launch(cudaErrorLaunchFailure, L.error);
  return cudaSuccess;
}

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kSharedOptin)
    return fail_launch(cudaErrorInvalidValue,
                       "emu: cudaFuncAttributeMaxDynamicSharedMemorySize " +
                           std::to_string(bytes) + " above the device's " +
                           std::to_string(kSharedOptin));
  std::lock_guard<std::mutex> lock(attr_mutex());
  max_dynamic_shared()[kernel] = static_cast<size_t>(bytes);
  return cudaSuccess;
}

cudaError_t occupancy(int* blocks, const void*, int block_size, size_t dynamic_shared) {
  if (block_size <= 0 || block_size > 1024)
    return fail_launch(cudaErrorInvalidValue, "emu: occupancy of a block size outside 1..1024");
  *blocks = blocks_per_sm(static_cast<unsigned>(block_size), dynamic_shared);
  return cudaSuccess;
}

void sync_block(const std::source_location& where) {
  Fiber& f = current();
  Block& b = *f.block;
  if (b.launch->drops(where)) return;
  b.at_block.fetch_add(1, std::memory_order_relaxed);
  wait_at(f, kAtBlock, &b.token);
}

void sync_grid(const std::source_location& where) {
  Fiber& f = current();
  Block& b = *f.block;
  if (!b.launch->cooperative)
    throw std::runtime_error("emu: grid.sync() in a kernel not launched cooperatively");
  if (b.launch->drops(where)) return;
  b.at_grid.fetch_add(1, std::memory_order_relaxed);
  wait_at(f, kAtGrid, &b.launch->grid_token);
}

namespace {
Warp& checked_warp(Fiber& f, unsigned mask) {
  Warp& w = *f.block->warps[f.warp];
  const unsigned live = w.live.load(std::memory_order_relaxed);
  if ((mask & live) != live || !(mask >> f.lane & 1u))
    throw std::runtime_error("emu: a warp operation whose mask does not name every live lane "
                             "(partial masks are not emulated)");
  return w;
}
void warp_barrier(Fiber& f, Warp& w) {
  w.waiting.fetch_add(1, std::memory_order_relaxed);
  wait_at(f, kAtWarp, &w.token);
}
}  // namespace

void sync_warp(unsigned mask) {
  Fiber& f = current();
  warp_barrier(f, checked_warp(f, mask));
}

uint64_t warp_exchange(unsigned mask, uint64_t value, int src) {
  Fiber& f = current();
  Warp& w = checked_warp(f, mask);
  if (src < 0 || src >= 32 || !(w.live.load(std::memory_order_relaxed) >> src & 1u))
    throw std::runtime_error("emu: a shuffle reads lane " + std::to_string(src) +
                             ", which is not live");
  w.slots[f.lane] = value;
  warp_barrier(f, w);
  const uint64_t out = w.slots[src];
  warp_barrier(f, w);
  return out;
}

unsigned warp_ballot(unsigned mask, bool predicate) {
  Fiber& f = current();
  Warp& w = checked_warp(f, mask);
  w.slots[f.lane] = predicate ? 1 : 0;
  warp_barrier(f, w);
  unsigned bits = 0;
  const unsigned live = w.live.load(std::memory_order_relaxed);
  for (unsigned l = 0; l < 32; ++l)
    if ((live >> l & 1u) && w.slots[l]) bits |= 1u << l;
  warp_barrier(f, w);
  return bits & mask;
}

unsigned lane_id() { return current().lane; }

void* shared_static(size_t bytes, size_t align) {
  Fiber& f = current();
  align = std::max<size_t>(align, 16);
  const size_t at = (f.cursor + align - 1) / align * align;
  if (at + bytes - f.block->static_base > kStaticSharedLimit)
    throw std::runtime_error("emu: static shared memory above 48 KB");
  f.cursor = at + bytes;
  return f.block->arena.get() + at;
}

void* shared_dynamic() {
  Fiber& f = current();
  return f.block->launch->dynamic_shared > 0 ? f.block->arena.get() : nullptr;
}

void kernel_error(const char* what) { throw std::runtime_error(std::string("emu: ") + what); }

const char* last_error_detail() { return last_detail.c_str(); }

}  // namespace emu

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return emu::last_error; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  *p = cudaDeviceProp{};
  std::snprintf(p->name, sizeof(p->name), "lstm_fused CUDA emulator (sm_90, %d SMs)",
                emu::sm_count());
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = emu::sm_count();
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647;
  p->maxGridSize[1] = p->maxGridSize[2] = 65535;
  p->maxThreadsPerMultiProcessor = emu::kThreadsPerSM;
  p->maxBlocksPerMultiProcessor = emu::kBlocksPerSM;
  p->sharedMemPerBlock = emu::kStaticSharedLimit;
  p->sharedMemPerBlockOptin = emu::kSharedOptin;
  p->sharedMemPerMultiprocessor = emu::kSharedPerSM;
  p->warpSize = 32;
  p->cooperativeLaunch = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrCooperativeLaunch: *value = 1; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = emu::sm_count(); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
