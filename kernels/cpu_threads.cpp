// The kernels' thread pool (see cpu_threads.h).
//
// A call is cut into chunks that every participating thread claims one at a time, the caller
// included: a worker that is asleep, or descheduled because the serving processes hold its core,
// just leaves its chunks to the others, so the caller never waits for a thread that has not
// started. The caller waits only for chunks already claimed. A claim carries the call's sequence
// number (`ticket`: sequence << 24 | next chunk), so a worker that wakes late can never take a
// chunk of a later call for the one it read.
//
// Workers are made on the first parallel call after slim_set_threads and, in a forked child,
// made again (threads do not survive a fork).

#include "cpu_threads.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <new>
#include <thread>

#include <immintrin.h>

namespace {

// How long an idle worker polls for the next call before it sleeps: longer than the gaps between
// a decode step's kernel calls, short enough to hand the core back soon when the engine idles.
constexpr int64_t kSpinMicros = 100;
constexpr int kMaxThreads = 64;
// The largest chunks: a thread's share over this, small enough that a thread preempted mid-chunk
// holds the caller up little.
constexpr int64_t kChunksPerThread = 4;
constexpr int kChunkBits = 24;
constexpr uint64_t kChunkMask = (1ull << kChunkBits) - 1;

constexpr int64_t kMaxChunks = 256;

struct Job {
  void (*fn)(void *, int64_t, int64_t);
  void *ctx;
  int64_t chunks;
  const int64_t *bounds;  // chunk c is [bounds[c], bounds[c + 1])
};

// Cuts [0, count) for `threads` threads into bounds[0 .. chunks]; returns the chunk count.
// Chunks of a quarter of a thread's share (kChunksPerThread a thread) until half the work is out,
// then ever smaller ones (half of what is left per thread, at least one), so the threads run out
// of work together: with equal chunks, the last one claimed left the other threads idle for up
// to a whole chunk (kernels/README.md).
int64_t cut(int64_t count, int threads, int64_t *bounds) {
  const int64_t share = kChunksPerThread * threads, largest = (count + share - 1) / share;
  int64_t chunks = 0, at = 0;
  bounds[0] = 0;
  while (at < count) {
    const int64_t left = count - at;
    int64_t size = (left + 2 * threads - 1) / (2 * threads);
    if (size > largest) size = largest;
    if (chunks == kMaxChunks - 1) size = left;
    at += size;
    bounds[++chunks] = at;
  }
  return chunks;
}

struct Pool {
  std::mutex driving;  // held by the one thread inside a parallel call
  std::atomic<int> wanted{1};
  int running = 1;  // threads the workers were made for (caller included)
  pid_t owner = 0;
  uint64_t sequence = 0;     // calls so far (written by the driving thread)
  Job job{};                 // the current call; stable while its sequence is in `ticket`
  std::atomic<uint64_t> published{0};  // sequence of the newest call, for the workers to see
  std::atomic<uint64_t> ticket{0};     // sequence << kChunkBits | next chunk to claim
  std::atomic<int64_t> done{0};        // chunks of the current call finished
  int64_t bounds[kMaxChunks + 1];      // the current call's chunks (Job::bounds)
  std::mutex sleep_mutex;
  std::condition_variable wake;
  std::atomic<int> sleepers{0};
};

// Never destroyed: workers may still poll it while the process exits.
Pool &pool() {
  static Pool *instance = new Pool();
  return *instance;
}

// Claims and runs chunks of call `sequence` (whose job the caller read as `job`) until none is
// left or a later call has begun.
void work_on(Pool &p, uint64_t sequence, const Job &job) {
  uint64_t seen = p.ticket.load(std::memory_order_acquire);
  for (;;) {
    if (seen >> kChunkBits != sequence) return;
    const int64_t chunk = (int64_t)(seen & kChunkMask);
    if (chunk >= job.chunks) return;
    if (!p.ticket.compare_exchange_weak(seen, seen + 1, std::memory_order_acq_rel)) continue;
    const int64_t begin = job.bounds[chunk], end = job.bounds[chunk + 1];
    if (begin < end) job.fn(job.ctx, begin, end);
    p.done.fetch_add(1, std::memory_order_acq_rel);
    seen = p.ticket.load(std::memory_order_acquire);
  }
}

void worker_loop(Pool *p, uint64_t seen) {
  using Clock = std::chrono::steady_clock;
  for (;;) {
    auto idle_since = Clock::now();
    uint32_t spins = 0;
    uint64_t now;
    while ((now = p->published.load(std::memory_order_acquire)) == seen) {
      _mm_pause();
      if (++spins % 256 != 0) continue;
      if (Clock::now() - idle_since < std::chrono::microseconds(kSpinMicros)) continue;
      std::unique_lock<std::mutex> lock(p->sleep_mutex);
      p->sleepers.fetch_add(1);
      p->wake.wait(lock, [&] { return p->published.load() != seen; });
      p->sleepers.fetch_sub(1);
      idle_since = Clock::now();
    }
    seen = now;
    // The job is read before any claim; the claim then checks the call is still `now` (the
    // fence keeps the ticket's read after the job's), so a job read while a later call was
    // being written is never run: that call closed claims first (slim_parallel_run).
    const Job job = p->job;
    std::atomic_thread_fence(std::memory_order_acquire);
    work_on(*p, now, job);
  }
}

// Called with `driving` held.
void ensure_workers(Pool &p, int wanted) {
  const pid_t pid = getpid();
  if (p.owner == pid && p.running >= wanted) return;
  if (p.owner != pid) {
    // A forked child: the parent's workers are not here, and one may have held the sleep lock
    // at the fork, so the child starts from fresh ones.
    p.running = 1;
    new (&p.sleep_mutex) std::mutex();
    new (&p.wake) std::condition_variable();
    p.sleepers.store(0);
  }
  for (int made = p.running; made < wanted; made++)
    std::thread(worker_loop, &p, p.published.load()).detach();
  if (wanted > p.running) p.running = wanted;
  p.owner = pid;
}

}  // namespace

void slim_parallel_run(int64_t count, void (*fn)(void *, int64_t, int64_t), void *ctx) {
  Pool &p = pool();
  const int wanted = p.wanted.load(std::memory_order_relaxed);
  if (wanted <= 1 || count < 2 || !p.driving.try_lock()) {
    fn(ctx, 0, count);
    return;
  }
  ensure_workers(p, wanted);
  const uint64_t sequence = ++p.sequence & ((1ull << (64 - kChunkBits)) - 1);
  // Claims close before the chunks and the job are rewritten: a worker that saw the last call
  // published, then was descheduled, may read this job half-written; the last call's ticket
  // would still let it claim with the old sequence (when this call has more chunks) and run
  // one call's function on another's context. The new sequence with no chunk left refuses it.
  p.ticket.store(sequence << kChunkBits | kChunkMask, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);  // before the writes below
  const int64_t chunks = cut(count, wanted, p.bounds);
  p.job = Job{fn, ctx, chunks, p.bounds};
  p.done.store(0, std::memory_order_relaxed);
  p.ticket.store(sequence << kChunkBits, std::memory_order_release);
  p.published.store(sequence);
  if (p.sleepers.load() > 0) {
    std::lock_guard<std::mutex> lock(p.sleep_mutex);
    p.wake.notify_all();
  }
  work_on(p, sequence, p.job);
  while (p.done.load(std::memory_order_acquire) < chunks) _mm_pause();
  p.driving.unlock();
}

// Threads every later kernel call may use (1: the caller's only), clamped to [1, 64].
extern "C" void slim_set_threads(int threads) {
  pool().wanted.store(threads < 1 ? 1 : threads > kMaxThreads ? kMaxThreads : threads);
}

extern "C" int slim_threads(void) { return pool().wanted.load(); }
