// A CPU emulation of the CUDA C that bitnetc's code generator writes, for tests on machines
// without a GPU. A block runs at a time; its threads are fibers (stacks of their own, switched
// by a few instructions of x86-64 assembly) that run one after another up to their next point
// of synchronization: `__syncthreads` waits for every live thread of the block, a warp shuffle
// for every live lane of the warp (the lanes' values are exchanged there). `__shared__`
// variables are static, which is what they are while one block runs. Only what the generated
// kernels use is here: a kernel that needs more does not compile, a block whose threads wait at
// different kinds of barrier is reported as a deadlock.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;

struct uint3 {
    unsigned x, y, z;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

namespace emu {

enum Wait { RUN = 0, BLOCK = 1, WARP = 2, DONE = 3 };

struct Fiber {
    void* sp;
    uint3 tid;
    int wait;
};

static Fiber* cur;
static void* sched_sp;
static uint3 block_idx, block_dim, grid_dim;
static std::vector<Fiber> fibers;
static std::vector<char*> stacks;
static const size_t STACK = 256 * 1024;
// Per warp and lane: the value a lane offers at a shuffle, and the values as they were when
// the warp's lanes were released (what each lane reads).
static uint64_t offered[32][32], released[32][32];
static void (*entry)(void**);
static void** entry_args;
static char error[256];

}  // namespace emu

extern "C" void emu_switch(void** save, void* to);
asm(R"(
.text
.globl emu_switch
.hidden emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");

namespace emu {

static void yield_as(int wait) {
    cur->wait = wait;
    emu_switch(&cur->sp, sched_sp);
}

static void fiber_main() {
    entry(entry_args);
    cur->wait = DONE;
    emu_switch(&cur->sp, sched_sp);
    abort();  // a finished fiber is never resumed
}

static unsigned linear(const uint3& t) {
    return t.x + block_dim.x * (t.y + block_dim.y * t.z);
}

template <class T>
static T shuffle(T v, int (*src)(int lane, int arg), int arg) {
    const unsigned id = linear(cur->tid);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    offered[id / 32][id % 32] = bits;
    yield_as(WARP);
    const uint64_t got = released[id / 32][src(id % 32, arg) & 31];
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

static int xor_lane(int lane, int o) { return lane ^ o; }
static int direct_lane(int, int src) { return src; }

// Runs one block to its end; 0, or 1 with `error` set.
static int run_block() {
    const unsigned n = block_dim.x * block_dim.y * block_dim.z;
    fibers.assign(n, Fiber{});
    while (stacks.size() < n) stacks.push_back((char*)std::aligned_alloc(64, STACK));
    for (unsigned i = 0; i < n; i++) {
        Fiber& f = fibers[i];
        f.tid = uint3{i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
        f.wait = RUN;
        // What emu_switch pops: six registers, then fiber_main as the return address, above
        // it a slot where a caller's return address would be (so the stack is aligned as at
        // a call).
        void** top = (void**)(stacks[i] + STACK);
        top[-1] = nullptr;
        top[-2] = (void*)&fiber_main;
        for (int r = 3; r <= 8; r++) top[-r] = nullptr;
        f.sp = &top[-8];
    }
    const unsigned warps = (n + 31) / 32;
    for (;;) {
        for (unsigned i = 0; i < n; i++) {
            if (fibers[i].wait != RUN) continue;
            cur = &fibers[i];
            emu_switch(&sched_sp, cur->sp);
        }
        bool live = false, released_any = false, all_block = true;
        for (unsigned w = 0; w < warps; w++) {
            bool any = false, all_warp = true;
            for (unsigned i = w * 32; i < n && i < w * 32 + 32; i++) {
                const int s = fibers[i].wait;
                if (s == DONE) continue;
                any = true;
                if (s != WARP) all_warp = false;
                if (s != BLOCK) all_block = false;
            }
            if (!any) continue;
            live = true;
            if (all_warp) {
                std::memcpy(released[w], offered[w], sizeof offered[w]);
                for (unsigned i = w * 32; i < n && i < w * 32 + 32; i++)
                    if (fibers[i].wait == WARP) fibers[i].wait = RUN;
                released_any = true;
            }
        }
        if (!live) return 0;
        if (released_any) continue;
        if (all_block) {
            for (auto& f : fibers)
                if (f.wait == BLOCK) f.wait = RUN;
            continue;
        }
        std::snprintf(error, sizeof error,
                      "deadlock in block (%u, %u, %u): threads wait at different barriers",
                      block_idx.x, block_idx.y, block_idx.z);
        return 1;
    }
}

}  // namespace emu

#define threadIdx (emu::cur->tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define INFINITY __int_as_float(0x7f800000)

static inline void __syncthreads() { emu::yield_as(emu::BLOCK); }
static inline void __threadfence() {}
template <class T>
static inline T __shfl_xor_sync(unsigned, T v, int o) { return emu::shuffle(v, emu::xor_lane, o); }
template <class T>
static inline T __shfl_sync(unsigned, T v, int src) { return emu::shuffle(v, emu::direct_lane, src); }
static inline int atomicAdd(int* p, int v) { const int old = *p; *p = old + v; return old; }
template <class T>
static inline T __ldcg(const T* p) { return *p; }

static inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline int __float_as_int(float v) { int i; std::memcpy(&i, &v, 4); return i; }
static inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
// Round half to even, as cvt.rni (the default rounding mode of the host is to nearest even).
static inline int __float2int_rn(float v) { return (int)std::nearbyint(v); }
static inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
    return c;
}
static inline unsigned __vsub4(unsigned a, unsigned b) {
    unsigned r = 0;
    for (int i = 0; i < 4; i++) r |= ((((a >> (8 * i)) & 0xffu) - ((b >> (8 * i)) & 0xffu)) & 0xffu) << (8 * i);
    return r;
}
using std::max;
using std::min;

// f16 conversions, round to nearest even, through the compiler's _Float16.
static inline float h2f(u16 h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
static inline u16 f2h(float f) { _Float16 v = (_Float16)f; u16 h; std::memcpy(&h, &v, 2); return h; }

// Launches run one after the other: nothing to wait for. A prefetch reads its byte, so that an
// address outside the weights fails here.
static inline void await_inputs() {}
static inline void prefetch_l2(const void* p) { (void)*(const volatile unsigned char*)p; }

static std::mutex emu_lock;

// Runs a kernel (through its trampoline) over a grid, block by block in order.
extern "C" int emu_launch(void (*kernel)(void**), void** args, unsigned gx, unsigned gy, unsigned gz,
                          unsigned bx) {
    std::lock_guard<std::mutex> guard(emu_lock);
    emu::entry = kernel;
    emu::entry_args = args;
    emu::grid_dim = uint3{gx, gy, gz};
    emu::block_dim = uint3{bx, 1, 1};
    for (unsigned z = 0; z < gz; z++)
        for (unsigned y = 0; y < gy; y++)
            for (unsigned x = 0; x < gx; x++) {
                emu::block_idx = uint3{x, y, z};
                if (emu::run_block()) return 1;
            }
    return 0;
}

extern "C" const char* emu_error() { return emu::error; }
