// A small pool that splits one kernel call's output channels across the cores (cpu_threads.cpp).
//
// Why not OpenMP or torch's intra-op threads: on the 2-core VMs this serves, torch's 2-thread
// matmuls ran slower than its 1-thread ones at decode sizes (the team sleeps between calls and
// each wake-up costs more than the call), while a spinning hand-off costs ~0.1 us. A decode step
// makes ~150 kernel calls a few microseconds apart, so the workers spin between calls for a short
// while (kSpinMicros) and sleep only when the engine goes quiet.
#pragma once

#include <stdint.h>

// fn(ctx, begin, end) over [0, count) in contiguous parts, one per pool thread (the caller's
// thread takes the first part). Runs serially where the pool has one thread, where count < 2, or
// while another thread is inside a parallel call (one engine thread drives the pool; others
// simply do not share it).
void slim_parallel_run(int64_t count, void (*fn)(void *, int64_t, int64_t), void *ctx);

template <class Body>
static inline void slim_parallel(int64_t count, Body &&body) {
  slim_parallel_run(
      count, [](void *ctx, int64_t begin, int64_t end) { (*(Body *)ctx)(begin, end); },
      (void *)&body);
}
