// CPU emulation of the CUDA kernels of sparsenet/cuda.py (SOURCE), for tests/test_cuda_emulated.py.
//
// Build (the test does this once per session, with SOURCE written to DIR/kernels.cu):
//     g++ -std=c++20 -O1 -pthread -ffp-contract=off -Wno-unknown-pragmas -I DIR cuda_emulator.cpp -o emu
// -ffp-contract=off (and no -ffast-math) keeps every float operation rounded on its own, as NumPy's
// float32 arithmetic and the kernels compiled with --fmad=false round it.
//
// Run:
//     emu KERNEL GX GY GZ BX BY BZ IN OUT
// launches KERNEL on a (GX, GY, GZ) grid of (BX, BY, BZ) blocks with the arguments read from IN, then
// writes the arguments (arrays with what the kernel left in them) to OUT in the same format:
//     "CUEM" | u32 nargs | nargs x (u32 kind | u64 n | payload)
//     kind 0: a scalar, n its size in bytes (1..8), then the n bytes (little-endian);
//     kind 1: an array, n its size in bytes, then the n bytes;
//     kind 2: an alias, n the index of an earlier array argument (the same device pointer; no payload).
// Each argument is checked against the kernel's parameter: scalars by size, arrays by element size.
// Exit status: 0 ran, 2 bad input or launch configuration, 3 the kernel broke an emulation rule (a
// full-mask shuffle in a warp with an exited or missing lane); the reason goes to stderr.
//
// Execution model: blocks one after another; within a block its warps one after another; the 32 lanes of
// a warp as 32 std::threads (started once, reused for every warp), so __shfl_down_sync can exchange values
// (a per-warp slot array between two std::barrier phases). There is no __syncthreads and no __shared__: a kernel using them does not compile
// here, which is the signal to extend this file.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

// ----------------------------------------------------------------------------- CUDA C, emulated
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// __restrict__ is a g++ keyword already (same meaning: a promise of no aliasing).

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

// fmaxf, expf, logf: <cmath> declares them in the global namespace (glibc's single-precision versions; libstdc++ 12
// has no std::expf). They are within a few ulp of CUDA's, not bit-identical: compare softmax_xent with tolerances.

// CUDA's integer min/max for device code.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, sizeof i);
    return i;
}

namespace emu {

std::atomic<bool> broken{false};
std::string broken_why;  // written once, by the thread that sets `broken`

void fail(const std::string& why) {
    bool expected = false;
    if (broken.compare_exchange_strong(expected, true)) broken_why = why;
}

// One warp in flight: `lanes` threads (32, or fewer in a block whose size is not a multiple of 32).
struct Warp {
    explicit Warp(int lanes) : lanes(lanes), bar(lanes) {
        for (int l = 0; l < 32; ++l) gone[l] = l >= lanes;
    }
    int lanes;
    std::barrier<> bar;
    std::uint64_t slot[32] = {};
    std::atomic<bool> gone[32];  // exited (returned from the kernel) or not part of the block
};

thread_local Warp* warp = nullptr;
thread_local int lane = 0;

template <class T>
T shfl_down(unsigned int mask, T v, unsigned int delta, int width) {
    static_assert(sizeof(T) <= 8);
    Warp* w = warp;
    if (w == nullptr) {
        fail("__shfl_down_sync called outside a launch");
        return v;
    }
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof v);
    w->slot[lane] = bits;
    w->bar.arrive_and_wait();  // every lane still running has written its slot
    // A lane that has exited arrived for good (arrive_and_drop) after setting gone[], so it is seen here.
    for (int l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && w->gone[l].load())
            fail("__shfl_down_sync with mask 0x" + [&] {
                char b[16];
                std::snprintf(b, sizeof b, "%08x", mask);
                return std::string(b);
            }() + " names lane " + std::to_string(l) + ", which has exited or does not exist (undefined on a GPU)");
    if (!(mask >> lane & 1u)) fail("__shfl_down_sync called by lane " + std::to_string(lane) + " outside its mask");
    const int base = lane / width * width;
    const int src = lane + static_cast<int>(delta);
    T r = v;
    if (src < base + width) std::memcpy(&r, &w->slot[src], sizeof r);
    w->bar.arrive_and_wait();  // nobody overwrites a slot before every lane has read
    return r;
}

}  // namespace emu

inline float __shfl_down_sync(unsigned int mask, float v, unsigned int delta, int width = 32) {
    return emu::shfl_down(mask, v, delta, width);
}
inline int __shfl_down_sync(unsigned int mask, int v, unsigned int delta, int width = 32) {
    return emu::shfl_down(mask, v, delta, width);
}
inline unsigned int __shfl_down_sync(unsigned int mask, unsigned int v, unsigned int delta, int width = 32) {
    return emu::shfl_down(mask, v, delta, width);
}

// ----------------------------------------------------------------------------- the kernels
#include "kernels.cu"

// ----------------------------------------------------------------------------- launch
namespace emu {

[[noreturn]] void die(int code, const std::string& why) {
    std::fprintf(stderr, "cuda_emulator: %s\n", why.c_str());
    std::exit(code);
}

// CUDA's own checks of a launch configuration (cudaErrorInvalidConfiguration / CUDA_ERROR_INVALID_VALUE).
void check_config(dim3 g, dim3 b) {
    if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0)
        die(2, "invalid launch configuration: a grid or block dimension is 0");
    if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u) die(2, "invalid launch configuration: grid too large");
    if (b.x > 1024u || b.y > 1024u || b.z > 64u || std::uint64_t(b.x) * b.y * b.z > 1024u)
        die(2, "invalid launch configuration: more than 1024 threads per block");
}

// 32 lane threads, started once and reused for every warp (starting threads costs more than the kernels).
class Lanes {
  public:
    Lanes() {
        for (int l = 0; l < 32; ++l) threads_.emplace_back([this, l] { serve(l); });
    }
    ~Lanes() {
        quit_ = true;
        start_.arrive_and_wait();
        for (auto& t : threads_) t.join();
    }
    // Runs `kernel` as the warp of block `block` whose first thread (linear index in the block) is `first`.
    void run(const std::function<void()>& kernel, uint3 block, int first, Warp& w) {
        kernel_ = &kernel, block_ = block, first_ = first, warp_ = &w;
        start_.arrive_and_wait();
        done_.arrive_and_wait();
    }

  private:
    void serve(int l) {
        for (;;) {
            start_.arrive_and_wait();  // the job's fields, written before, are visible after this
            if (quit_) return;
            Warp& w = *warp_;
            if (l < w.lanes) {
                const unsigned t = static_cast<unsigned>(first_ + l);
                blockIdx = block_;
                threadIdx = {t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
                warp = &w;
                lane = l;
                (*kernel_)();  // a `return` in the kernel ends up here: the lane has exited
                w.gone[l].store(true);
                w.bar.arrive_and_drop();
                warp = nullptr;
            }
            done_.arrive_and_wait();
        }
    }
    std::barrier<> start_{33}, done_{33};
    std::vector<std::thread> threads_;
    const std::function<void()>* kernel_ = nullptr;
    uint3 block_{};
    int first_ = 0;
    Warp* warp_ = nullptr;
    bool quit_ = false;
};

void launch(dim3 g, dim3 b, const std::function<void()>& kernel) {
    check_config(g, b);
    gridDim = g;
    blockDim = b;
    const int threads = static_cast<int>(b.x * b.y * b.z);
    Lanes lanes;
    for (unsigned bz = 0; bz < g.z; ++bz)
        for (unsigned by = 0; by < g.y; ++by)
            for (unsigned bx = 0; bx < g.x; ++bx)
                for (int first = 0; first < threads; first += 32) {
                    Warp w(std::min(32, threads - first));
                    lanes.run(kernel, uint3{bx, by, bz}, first, w);
                }
}

// ----------------------------------------------------------------------------- arguments
struct Arg {
    std::uint32_t kind = 0;
    std::uint64_t n = 0;     // bytes (scalar, array) or the index aliased
    unsigned char* p = nullptr;  // array: exactly n bytes of malloc (so AddressSanitizer sees overruns)
    unsigned char scalar[8] = {};
};

std::vector<Arg> args;

template <class T>
void get(FILE* f, T& v, const char* what) {
    if (std::fread(&v, sizeof v, 1, f) != 1) die(2, std::string("truncated input reading ") + what);
}

void read_args(const char* path) {
    FILE* f = std::fopen(path, "rb");
    if (!f) die(2, std::string("cannot open ") + path);
    char magic[4];
    if (std::fread(magic, 1, 4, f) != 4 || std::memcmp(magic, "CUEM", 4) != 0) die(2, "input is not a CUEM file");
    std::uint32_t count;
    get(f, count, "the argument count");
    args.resize(count);
    for (std::uint32_t i = 0; i < count; ++i) {
        Arg& a = args[i];
        get(f, a.kind, "an argument kind");
        get(f, a.n, "an argument size");
        if (a.kind == 0) {
            if (a.n < 1 || a.n > 8) die(2, "scalar argument " + std::to_string(i) + " of " + std::to_string(a.n) + " bytes");
            if (std::fread(a.scalar, 1, a.n, f) != a.n) die(2, "truncated scalar");
        } else if (a.kind == 1) {
            a.p = static_cast<unsigned char*>(std::malloc(a.n ? a.n : 1));
            if (!a.p) die(2, "out of memory");
            if (a.n && std::fread(a.p, 1, a.n, f) != a.n) die(2, "truncated array");
        } else if (a.kind == 2) {
            if (a.n >= i || args[a.n].kind != 1) die(2, "alias of argument " + std::to_string(a.n) + " that is not an earlier array");
        } else {
            die(2, "unknown argument kind " + std::to_string(a.kind));
        }
    }
    std::fclose(f);
}

void write_args(const char* path) {
    FILE* f = std::fopen(path, "wb");
    if (!f) die(2, std::string("cannot create ") + path);
    const std::uint32_t count = static_cast<std::uint32_t>(args.size());
    std::fwrite("CUEM", 1, 4, f);
    std::fwrite(&count, sizeof count, 1, f);
    for (const Arg& a : args) {
        std::fwrite(&a.kind, sizeof a.kind, 1, f);
        std::fwrite(&a.n, sizeof a.n, 1, f);
        if (a.kind == 0) std::fwrite(a.scalar, 1, a.n, f);
        if (a.kind == 1 && a.n) std::fwrite(a.p, 1, a.n, f);
    }
    if (std::fclose(f) != 0) die(2, std::string("cannot write ") + path);
}

// Typed access, checked against the kernel's parameter types.
template <class T>
T* ptr(std::size_t i) {
    if (i >= args.size()) die(2, "too few arguments");
    const Arg* a = &args[i];
    if (a->kind == 2) a = &args[a->n];
    if (a->kind != 1) die(2, "argument " + std::to_string(i) + " should be an array");
    if (a->n % sizeof(T)) die(2, "array argument " + std::to_string(i) + " has " + std::to_string(a->n) +
                                      " bytes, not a whole number of " + std::to_string(sizeof(T)) + "-byte elements");
    return reinterpret_cast<T*>(a->p);
}

template <class T>
T val(std::size_t i) {
    if (i >= args.size()) die(2, "too few arguments");
    const Arg& a = args[i];
    if (a.kind != 0 || a.n != sizeof(T))
        die(2, "argument " + std::to_string(i) + " should be a " + std::to_string(sizeof(T)) + "-byte scalar");
    T v;
    std::memcpy(&v, a.scalar, sizeof v);
    return v;
}

void expect(std::size_t n) {
    if (args.size() != n) die(2, "kernel takes " + std::to_string(n) + " arguments, got " + std::to_string(args.size()));
}

}  // namespace emu

int main(int argc, char** argv) {
    using namespace emu;
    if (argc != 10) die(2, "usage: emu KERNEL GX GY GZ BX BY BZ IN OUT");
    const std::string name = argv[1];
    unsigned v[6];
    for (int i = 0; i < 6; ++i) {
        char* end;
        const unsigned long x = std::strtoul(argv[2 + i], &end, 10);
        if (*end || x > 0xffffffffUL) die(2, std::string("bad dimension ") + argv[2 + i]);
        v[i] = static_cast<unsigned>(x);
    }
    const dim3 grid{v[0], v[1], v[2]}, block{v[3], v[4], v[5]};
    read_args(argv[8]);

    std::function<void()> k;
    if (name == "sgd_update") {
        expect(13);
        auto W = ptr<float>(0);
        auto G = ptr<const float>(1);
        auto V = ptr<float>(2);
        auto keep = ptr<const unsigned int>(3);
        auto n = val<long long>(4);
        auto has_keep = val<int>(5), has_wd = val<int>(6);
        auto wd = val<float>(7);
        auto has_l1 = val<int>(8);
        auto l1 = val<float>(9), mu = val<float>(10);
        auto scale = ptr<const float>(11);
        auto slot = val<int>(12);
        k = [=] { sgd_update(W, G, V, keep, n, has_keep, has_wd, wd, has_l1, l1, mu, scale, slot); };
    } else if (name == "softmax_xent") {
        expect(9);
        auto z = ptr<const float>(0);
        auto sn = val<long long>(1), sk = val<long long>(2);
        auto t = ptr<const long long>(3);
        auto N = val<int>(4), K = val<int>(5);
        auto loss = ptr<float>(6), gz = ptr<float>(7);
        auto scale = val<float>(8);
        k = [=] { softmax_xent(z, sn, sk, t, N, K, loss, gz, scale); };
    } else if (name == "maxpool_backward") {
        expect(12);
        auto x = ptr<const float>(0), y = ptr<const float>(1), gy = ptr<const float>(2);
        auto gx = ptr<float>(3);
        int d[8];
        for (int i = 0; i < 8; ++i) d[i] = val<int>(4 + i);
        k = [=] { maxpool_backward(x, y, gy, gx, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]); };
    } else if (name == "csr_matmul_t_1" || name == "csr_matmul_t_8") {
        expect(8);
        auto data = ptr<const float>(0);
        auto indices = ptr<const int>(1), indptr = ptr<const int>(2);
        auto F = val<int>(3);
        auto X = ptr<const float>(4);
        auto M = val<int>(5), K = val<int>(6);
        auto Y = ptr<float>(7);
        if (name == "csr_matmul_t_1")
            k = [=] { csr_matmul_t_1(data, indices, indptr, F, X, M, K, Y); };
        else
            k = [=] { csr_matmul_t_8(data, indices, indptr, F, X, M, K, Y); };
    } else {
        die(2, "unknown kernel " + name);
    }
    launch(grid, block, k);
    if (broken.load()) die(3, broken_why);
    write_args(argv[9]);
    for (Arg& a : args)
        if (a.kind == 1) std::free(a.p);
    return 0;
}
