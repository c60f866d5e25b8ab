"""CUDA kernels for the CuPy path: the GPU counterpart of :mod:`sparsenet.fast_layers`.

At batch 64 the LeNets are bound by kernel launches and Python per step, not arithmetic, so the GPU
path does the same work in fewer launches:

* :func:`sgd_update`: the optimiser's momentum/decay/L1/mask update of one parameter in one kernel
  (NumPy: seven array passes), op for op the arithmetic of :meth:`sparsenet.optim.SGD.step` with neither
  fused multiply-adds nor CuPy's flush-to-zero, so it gives the NumPy path's float32 values bit for bit.
* :func:`softmax_cross_entropy`: loss rows and the logits' gradient in one kernel (NumPy: about twelve).
* :func:`relu_backward`: ``gy · [y > 0]`` in one elementwise kernel (NumPy: two); :func:`maxpool_backward`:
  the pool's gradient routing in one kernel (NumPy: about fifteen operations).
* :class:`CapturedStep`: a whole training step (forward, backward, update, running sums) recorded
  once per batch shape as a CUDA graph and replayed, so a step costs a handful of launches.
* :class:`CSRMatrix`: CSR products ``X Wᵀ`` for few rows (one warp per row of W, the rows of X in
  registers), the sparse-inference kernel; :func:`time_ms` measures it against the dense product.
* :func:`matmul`: the layers' GEMMs as direct ``cublasSgemm`` calls, which a graph can record.

Nothing here runs on the CPU: CuPy is imported by the functions, never by the module, and only
:mod:`sparsenet.backend` and this module know CuPy exists. The kernel source is plain CUDA C
(``SOURCE``, compiled by NVRTC at first use); ``tests/test_cuda.py`` compiles it with ``nvcc`` where
one is installed and checks every kernel against the NumPy path on a GPU.
"""
import math
import os
import warnings

import numpy

from .util import SparsenetError

SOURCE = r"""
// IEEE float32 multiply, add and subtract, each rounded to nearest: CuPy compiles every kernel with
// -ftz=true, which would flush subnormal operands and results to zero, so on the GPU they are written as
// PTX without .ftz (nvcc and NVRTC leave inline PTX as written). Elsewhere (a CPU emulator) plain C.
#ifdef __CUDA_ARCH__
__device__ __forceinline__ float fmul_(float a, float b) { float r; asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float fadd_(float a, float b) { float r; asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float fsub_(float a, float b) { float r; asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
#else
__device__ __forceinline__ float fmul_(float a, float b) { return a * b; }
__device__ __forceinline__ float fadd_(float a, float b) { return a + b; }
__device__ __forceinline__ float fsub_(float a, float b) { return a - b; }
#endif

// numpy.sign of a float32 from its bits (float compares would flush subnormals): NaN stays NaN, ±0 gives +0.
__device__ __forceinline__ float sign_(float w) {
    const unsigned int b = __float_as_uint(w), m = b & 0x7fffffffu;
    if (m > 0x7f800000u) return w;
    if (m == 0u) return 0.f;
    return (b >> 31) ? -1.f : 1.f;
}

// sgd_update: one parameter's step (sparsenet.optim.SGD), each float op rounded as NumPy rounds it (no
// fused multiply-add, no flush to zero: bit for bit the CPU's update). scale[slot] = lr_t * lr_mult, staged
// on the device before the launch so a recorded graph reads the current learning rate. keep: the mask's
// bits (all ones kept, 0 pruned), or unused.
extern "C" __global__ void sgd_update(float* __restrict__ W, const float* __restrict__ G, float* __restrict__ V,
                                      const unsigned int* __restrict__ keep, long long n, int has_keep,
                                      int has_wd, float wd, int has_l1, float l1, float mu,
                                      const float* __restrict__ scale, int slot) {
    const float s = scale[slot];
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        float w = W[i], g = G[i];
        if (has_wd) g = fadd_(g, fmul_(w, wd));
        if (has_l1) g = fadd_(g, fmul_(sign_(w), l1));
        float v = fmul_(V[i], mu);
        g = fmul_(g, s);
        v = fadd_(v, g);
        w = fsub_(w, v);
        if (has_keep) {
            const unsigned int k = keep[i];
            w = __uint_as_float(__float_as_uint(w) & k);
            v = __uint_as_float(__float_as_uint(v) & k);
        }
        W[i] = w;
        V[i] = v;
    }
}

// Softmax cross-entropy, one thread per row n of the logits z (N, K) with element strides (sn, sk):
// loss[n] = -log p[n, t_n], gz[n, k] = (p[n, k] - [k = t_n]) * scale (gz row-major; scale = dL/dloss / N).
extern "C" __global__ void softmax_xent(const float* __restrict__ z, long long sn, long long sk,
                                        const long long* __restrict__ t, int N, int K,
                                        float* __restrict__ loss, float* __restrict__ gz, float scale) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* zn = z + n * sn;
    float m = zn[0];
    for (int k = 1; k < K; ++k) m = fmaxf(m, zn[k * sk]);
    float s = 0.f;
    for (int k = 0; k < K; ++k) s += expf(zn[k * sk] - m);
    const float lse = logf(s);
    const long long tn = t[n];
    loss[n] = (tn >= 0 && tn < K) ? -((zn[tn * sk] - m) - lse) : __int_as_float(0x7fc00000);
    for (int k = 0; k < K; ++k) {
        const float p = expf((zn[k * sk] - m) - lse);
        gz[(long long)n * K + k] = (p - (k == tn ? 1.f : 0.f)) * scale;
    }
}

// Max-pool backward (sparsenet.fast_layers.maxpool2d_backward), one thread per element (n, h, w, c) of the pooled
// (padded) input x (N, H, W, C): gx = the sum of gy (N, Ho, Wo, C) over the k×k windows, stride s, that contain
// (h, w) and whose first position in row-major order holding the window's maximum y is (h, w). The windows are
// visited as the CPU's offsets are (its sums run in that order): later windows first.
extern "C" __global__ void maxpool_backward(const float* __restrict__ x, const float* __restrict__ y,
                                            const float* __restrict__ gy, float* __restrict__ gx, int N, int H,
                                            int W, int C, int Ho, int Wo, int k, int s) {
    const long long total = (long long)N * H * W * C;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const int c = (int)(i % C);
        const long long p = i / C;
        const int w = (int)(p % W), h = (int)((p / W) % H);
        const long long n = p / ((long long)W * H);
        const float xv = x[i];
        const int ho0 = h < k ? 0 : (h - k + s) / s, ho1 = min(h / s, Ho - 1);
        const int wo0 = w < k ? 0 : (w - k + s) / s, wo1 = min(w / s, Wo - 1);
        float acc = 0.f;
        for (int ho = ho1; ho >= ho0; --ho) {
            for (int wo = wo1; wo >= wo0; --wo) {
                const long long o = ((n * Ho + ho) * Wo + wo) * C + c;
                const float m = y[o];
                if (!(xv == m)) continue;
                int first = -1;  // the window's first position holding m, as a * k + b
                for (int a = 0; a < k && first < 0; ++a)
                    for (int b = 0; b < k; ++b) {
                        const int hh = ho * s + a, ww = wo * s + b;
                        if (hh < H && ww < W && x[((n * H + hh) * W + ww) * C + c] == m) {
                            first = a * k + b;
                            break;
                        }
                    }
                if (first == (h - ho * s) * k + (w - wo * s)) acc += gy[o];
            }
        }
        gx[i] = acc;
    }
}

// Y (M, F) = X (M, K) Wᵀ with W (F, K) in CSR (data, indices, indptr; int32). One warp per row r of W and
// up to B rows of X (blockIdx.y picks which): the lanes stride through the row's non-zeros (coalesced
// reads of data and indices), each keeping B partial sums, reduced across the warp by shuffles.
template <int B>
__device__ void csr_rows(const float* __restrict__ data, const int* __restrict__ indices,
                         const int* __restrict__ indptr, int F, const float* __restrict__ X, int M, int K,
                         float* __restrict__ Y) {
    const int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const int m0 = blockIdx.y * B;
    if (r >= F) return;  // blockDim.x is a multiple of 32: whole warps leave together
    float acc[B];
#pragma unroll
    for (int b = 0; b < B; ++b) acc[b] = 0.f;
    const int end = indptr[r + 1];
    for (int p = indptr[r] + lane; p < end; p += 32) {
        const float w = data[p];
        const int c = indices[p];
#pragma unroll
        for (int b = 0; b < B; ++b)
            if (m0 + b < M) acc[b] += w * X[(long long)(m0 + b) * K + c];
    }
#pragma unroll
    for (int b = 0; b < B; ++b) {
        float v = acc[b];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0 && m0 + b < M) Y[(long long)(m0 + b) * F + r] = v;
    }
}

extern "C" __global__ void csr_matmul_t_1(const float* data, const int* indices, const int* indptr, int F,
                                          const float* X, int M, int K, float* Y) {
    csr_rows<1>(data, indices, indptr, F, X, M, K, Y);
}

extern "C" __global__ void csr_matmul_t_8(const float* data, const int* indices, const int* indptr, int F,
                                          const float* X, int M, int K, float* Y) {
    csr_rows<8>(data, indices, indptr, F, X, M, K, Y);
}
"""
KERNELS = ("sgd_update", "softmax_xent", "maxpool_backward", "csr_matmul_t_1", "csr_matmul_t_8")
OPTIONS = ("--std=c++14", "--fmad=false")
THREADS = 256

_module = None
_relu_backward = None


def _cupy():
    import cupy

    return cupy


def kernel(name):
    """The compiled kernel ``name`` of :data:`SOURCE` (compiled once per process)."""
    global _module
    if _module is None:
        _module = _cupy().RawModule(code=SOURCE, options=OPTIONS, name_expressions=None)
    return _module.get_function(name)


def _blocks(n):
    return max(1, min(math.ceil(n / THREADS), 65535))


# ----------------------------------------------------------------------------- cuBLAS
_cublas = None


def _find_cublas():
    """cuBLAS as CuPy loaded it: ``(library, &1.0f, &0.0f)``, or a string saying why it is out of reach. The
    library is the one CuPy's loader (cuda-pathfinder) returns, else the mapped ``libcublas.so.<major>`` of
    the version CuPy reports, else one found by name."""
    import ctypes
    import ctypes.util

    try:
        cupy = _cupy()
        major = cupy.cuda.cublas.getVersion(cupy.cuda.device.get_cublas_handle()) // 10000  # loads cuBLAS
    except Exception as e:  # noqa: BLE001 - no CuPy, no device: say so
        return f"no cuBLAS handle ({type(e).__name__}: {e})"
    path = None
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        path = load_nvidia_dynamic_lib("cublas").abs_path
    except Exception:  # noqa: BLE001 - not installed, or another layout: look in this process
        pass
    if not path:
        try:
            with open("/proc/self/maps") as f:
                mapped = {l.split(None, 5)[5].strip() for l in f if "/libcublas.so" in l and len(l.split(None, 5)) == 6}
            path = next((m for m in sorted(mapped) if f"libcublas.so.{major}" in m), None)
        except OSError:
            pass
    path = path or ctypes.util.find_library("cublas")
    if not path:
        return "cuBLAS library not found in this process"
    try:
        lib = ctypes.CDLL(path)
        lib.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cublasSetPointerMode_v2.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.cublasSgemm_v2.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    except (OSError, AttributeError) as e:
        return f"cuBLAS at {path} unusable ({e})"
    return lib, ctypes.byref(ctypes.c_float(1.0)), ctypes.byref(ctypes.c_float(0.0))


def cublas():
    """``(library, &1, &0)`` for :func:`matmul`, or a string saying why cuBLAS cannot be called."""
    global _cublas
    if _cublas is None:
        _cublas = _find_cublas()
    return _cublas


def _ptr(x):
    import ctypes

    return ctypes.c_void_p(x.data.ptr)


def matmul(a, b):
    """``a @ b`` for 2-D float32 CuPy arrays as one ``cublasSgemm`` call on the current stream: a new
    row-major (M, N) result; each operand is read as stored when it is row- or column-major.

    CuPy's own matmul refuses to run while a stream is being recorded into a CUDA graph (its cuBLAS
    wrapper checks, as of CuPy 14), so the GPU layers multiply through cuBLAS here; the same call runs
    eagerly and recorded, so replays give the eager values. Row-major C = A B is column-major
    Cᵀ = Bᵀ Aᵀ: a row-major operand is already its transpose to cuBLAS, a column-major one is taken
    with op = T.
    """
    import ctypes

    cupy = _cupy()
    lib = cublas()
    if isinstance(lib, str) or a.dtype != numpy.float32 or b.dtype != numpy.float32 or a.ndim != 2 or b.ndim != 2:
        return cupy.matmul(a, b)
    lib, one, zero = lib
    handle = ctypes.c_void_p(cupy.cuda.device.get_cublas_handle())  # CuPy's, for this device and thread
    (M, K), (K2, N) = a.shape, b.shape
    if K != K2:
        raise SparsenetError(f"matmul: shapes {a.shape} and {b.shape} do not chain")
    if M == 0 or N == 0 or K == 0:
        return cupy.zeros((M, N), numpy.float32)

    def operand(x, rows, cols):  # (array, op, leading dimension) in cuBLAS's column-major terms
        if x.flags.c_contiguous:
            return x, 0, max(1, cols)
        if x.flags.f_contiguous:
            return x, 1, max(1, rows)
        return cupy.ascontiguousarray(x), 0, max(1, cols)

    a, op_a, ld_a = operand(a, M, K)
    b, op_b, ld_b = operand(b, K, N)
    c = cupy.empty((M, N), numpy.float32)
    lib.cublasSetStream_v2(handle, ctypes.c_void_p(cupy.cuda.get_current_stream().ptr))
    lib.cublasSetPointerMode_v2(handle, 0)  # alpha, beta on the host (CuPy shares this handle)
    status = lib.cublasSgemm_v2(handle, op_b, op_a, N, M, K, one, _ptr(b), ld_b, _ptr(a), ld_a, zero, _ptr(c), N)
    if status != 0:
        raise SparsenetError(f"cublasSgemm failed with status {status} for shapes {a.shape} @ {b.shape}")
    return c


# ----------------------------------------------------------------------------- optimiser
def fusable(p):
    """Whether :func:`sgd_update` can step Param ``p``: float32, no shared values, contiguous state."""
    return p.codebook is None and p.data.dtype == numpy.float32 and p.data.flags.c_contiguous


def sgd_update(p, settings, scales, slot):
    """One :meth:`sparsenet.optim.SGD.step` of Param ``p`` (its grad set, :func:`fusable`) in one kernel.

    ``scales``: a device float32 array holding lr_t · lr_mult for this parameter at ``scales[slot]``
    (:class:`Upload`'s ``device``).
    The momentum buffer V is created (zeros) at the first step; ``p.grad`` is left as it was.
    """
    cupy = _cupy()
    v = p.state.get("momentum")
    if v is None:
        v = p.state["momentum"] = cupy.zeros_like(p.data)
    g = cupy.ascontiguousarray(p.grad, dtype=numpy.float32)
    keep = p._keep
    wd = settings["weight_decay"] * p.decay_mult
    l1 = settings["l1"] * p.decay_mult
    n = p.data.size
    kernel("sgd_update")((_blocks(n),), (THREADS,), (
        p.data, g, v, keep if keep is not None else p.data, numpy.int64(n), numpy.int32(keep is not None),
        numpy.int32(bool(settings["weight_decay"] and p.decay_mult)), numpy.float32(wd),
        numpy.int32(bool(settings["l1"] and p.decay_mult)), numpy.float32(l1),
        numpy.float32(settings["momentum"]), scales, numpy.int32(slot)))


class Upload:
    """A small device float32 buffer (``device``) refreshed from the host every step without stalling:
    :meth:`send` writes the values into one of ``RING`` pinned host slots and copies it asynchronously on
    the current stream, so the copy is ordered after the work already queued there (a replayed graph that
    still reads the previous values) and the host runs ahead. A slot is reused only after its copy is done
    (an event per slot). A copy from pageable memory, NumPy's, may make the host wait for the stream."""

    RING = 64

    def __init__(self, n):
        import cupyx

        cupy = _cupy()
        self.device = cupy.zeros(n, numpy.float32)
        self.host = cupyx.empty_pinned((self.RING, n), numpy.float32)
        self.events, self.next = [None] * self.RING, 0

    def send(self, values):
        cupy = _cupy()
        k, self.next = self.next, (self.next + 1) % self.RING
        if self.events[k] is not None:
            self.events[k].synchronize()
        self.host[k] = values
        self.device.set(self.host[k])
        self.events[k] = cupy.cuda.Event(block=False, disable_timing=True)
        self.events[k].record()


# ----------------------------------------------------------------------------- layers
def softmax_cross_entropy(z, t, gloss=1.0):
    """``(loss, gz)``: :func:`sparsenet.layers.softmax_cross_entropy_forward` and its backward in one
    kernel (rows of the loss) and one mean; z (N, K) float32 in any layout, t (N,) integer labels."""
    cupy = _cupy()
    N, K = z.shape
    if N == 0:  # NumPy's mean of nothing
        return cupy.full((), numpy.nan, numpy.float32), cupy.empty((0, K), numpy.float32)
    t = t if t.dtype == numpy.int64 else t.astype(numpy.int64)
    rows = cupy.empty(N, dtype=numpy.float32)
    gz = cupy.empty((N, K), dtype=numpy.float32)
    sn, sk = (s // z.itemsize for s in z.strides)
    kernel("softmax_xent")((math.ceil(N / 128),), (128,), (
        z, numpy.int64(sn), numpy.int64(sk), cupy.ascontiguousarray(t), numpy.int32(N), numpy.int32(K),
        rows, gz, numpy.float32(gloss / N)))
    return rows.mean(), gz


def maxpool_backward(x, y, gy, k, stride):
    """``gx`` of a k×k, ``stride`` max-pool over the (padded) input ``x`` (N, H, W, C) with output ``y`` and its
    gradient ``gy`` (N, Ho, Wo, C), in one kernel: :func:`sparsenet.fast_layers.maxpool2d_backward`'s
    routing (ties to the first position in row-major order), float32."""
    cupy = _cupy()
    x, y, gy = (cupy.ascontiguousarray(a, dtype=numpy.float32) for a in (x, y, gy))
    N, H, W, C = x.shape
    Ho, Wo = y.shape[1:3]
    gx = cupy.empty(x.shape, numpy.float32)
    kernel("maxpool_backward")((_blocks(x.size),), (THREADS,), (
        x, y, gy, gx, *(numpy.int32(v) for v in (N, H, W, C, Ho, Wo, k, stride))))
    return gx


def relu_backward(gy, y):
    """``gx = gy · [y > 0]`` (:func:`sparsenet.layers.relu_backward`) as one elementwise kernel."""
    global _relu_backward
    if _relu_backward is None:
        _relu_backward = _cupy().ElementwiseKernel("T gy, T y", "T gx", "gx = gy * (T)(y > (T)0)",
                                                   "sparsenet_relu_backward")
    return _relu_backward(gy, y)


# ----------------------------------------------------------------------------- sparse inference
class CSRMatrix:
    """A (F, K) float32 matrix in CSR on the GPU, multiplied by :meth:`matmul_t` (``X Wᵀ``)."""

    def __init__(self, data, indices, indptr, shape):
        cupy = _cupy()
        self.data = cupy.asarray(data, dtype=numpy.float32)
        self.indices = cupy.asarray(indices, dtype=numpy.int32)
        self.indptr = cupy.asarray(indptr, dtype=numpy.int32)
        self.shape = tuple(shape)
        if len(self.indptr) != self.shape[0] + 1:
            raise SparsenetError(f"CSR indptr has {len(self.indptr)} entries for {self.shape[0]} rows")

    @property
    def nnz(self):
        return int(self.data.size)

    def matmul_t(self, X):
        """``Y = X Wᵀ`` for dense X (M, K) → (M, F) float32."""
        cupy = _cupy()
        F, K = self.shape
        X = cupy.ascontiguousarray(X, dtype=numpy.float32)
        if X.ndim != 2 or X.shape[1] != K:
            raise SparsenetError(f"CSR product: X has shape {X.shape}, expected (rows, {K})")
        M = X.shape[0]
        Y = cupy.empty((M, F), dtype=numpy.float32)
        if M == 0 or F == 0:
            return Y
        b = 1 if M == 1 else 8
        warps, step = THREADS // 32, 65535 * b  # a grid has at most 65535 blocks along y
        for r in range(0, M, step):
            m = min(step, M - r)
            kernel(f"csr_matmul_t_{b}")((math.ceil(F / warps), math.ceil(m / b)), (THREADS,), (
                self.data, self.indices, self.indptr, numpy.int32(F), X[r:r + m], numpy.int32(m), numpy.int32(K),
                Y[r:r + m]))
        return Y


def time_ms(fn, repeat=5):
    """Median milliseconds of ``fn()`` on the GPU (CUDA events around each call, one warm-up call)."""
    cupy = _cupy()
    fn()
    times = []
    for _ in range(repeat):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return float(numpy.median(times))


# ----------------------------------------------------------------------------- CUDA graphs
GRAPHS_ENV = "SPARSENET_CUDA_GRAPHS"


def graphs_enabled():
    """False when ``$SPARSENET_CUDA_GRAPHS`` is 0/false/no/off (then every step runs eagerly)."""
    return os.environ.get(GRAPHS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def capturable(net, opt):
    """Why a training step of ``net`` with ``opt`` cannot be captured as a graph, or None if it can.

    A graph replays fixed kernels on fixed buffers, so it cannot draw new dropout masks (random numbers),
    step shared weights (the codebook step sums by code) or follow a parameter the step rebinds."""
    if not graphs_enabled():
        return f"{GRAPHS_ENV} is off"
    if any(l.kind == "dropout" and getattr(l, "rate", 0.0) > 0 for l in net.layers):
        return "dropout draws new masks every step"
    if not all(fusable(p) for p in opt.params.values()):
        return "a parameter has shared values or is not float32"
    if _failed:
        return f"an earlier capture in this process failed ({_failed})"
    return cublas() if isinstance(cublas(), str) else None


_stream = None
_failed = None


def _end_quietly(stream):
    try:
        stream.end_capture()
    except Exception:  # noqa: BLE001 - an invalidated capture raises here; it is over either way
        pass


class CapturedStep:
    """Training steps replayed from CUDA graphs, one per batch shape.

    ``body(x, t)`` runs one step (forward, backward, ``opt.apply`` with the staged device learning
    rates, running sums updated in place) on the arrays it is given. The first batch of each shape runs
    eagerly (it creates the optimiser state and compiles the kernels); the second is copied into
    buffers owned here and ``body`` is recorded on a private stream; it and every later batch of that
    shape are copied into those buffers and the graph is launched. The replayed kernels are the eager
    ones, so results are bit-identical to eager steps. If recording fails (an operation that waits for
    the device, say), a warning names the cause and every later step of the process runs eagerly.

    Use as a context manager around the epoch: entering waits for the current stream's work, leaving
    waits for the private stream's, so code before and after sees ordered results. Each graph's
    temporaries live in a memory pool of its own, freed with the graph when the epoch ends.
    """

    def __init__(self, body):
        global _stream
        if _stream is None:  # one per process: CuPy's memory pool keeps freed blocks per stream
            _stream = _cupy().cuda.Stream(non_blocking=True)
        self.body, self.graphs, self.seen, self.failed, self.stream = body, {}, set(), None, _stream

    def __enter__(self):
        _cupy().cuda.get_current_stream().synchronize()  # the default stream's (or per-thread stream's) work
        self.stream.__enter__()
        return self

    def __exit__(self, *exc):
        if self.stream.is_capturing():  # never left so by _record; a last guard
            _end_quietly(self.stream)
        self.stream.__exit__(*exc)
        self.stream.synchronize()
        self.graphs.clear()
        return False

    def __call__(self, x, t):
        key = (x.shape, x.dtype.str, t.shape, t.dtype.str)
        if self.failed or key not in self.seen:
            self.seen.add(key)
            return self.body(x, t)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._record(key, x, t)
            if entry is None:
                return self.body(x, t)
        graph, bx, bt, _ = entry
        bx[...] = x
        bt[...] = t
        graph.launch(self.stream)
        return None

    def _record(self, key, x, t):
        """Record ``body`` on the private stream, its temporaries in a memory pool of the graph's own (kept
        with it: CuPy's default pool may free its cached blocks to the device, e.g. when an allocation fails,
        and a replay must never write into memory that was handed back)."""
        cupy = _cupy()
        s, pool = self.stream, cupy.cuda.MemoryPool()
        with s:
            bx, bt = cupy.empty_like(x), cupy.empty_like(t)
            with cupy.cuda.using_allocator(pool.malloc):
                try:
                    s.begin_capture()
                except Exception as e:  # noqa: BLE001 - any driver refusal means: run eagerly
                    return self._give_up(e)
                try:
                    self.body(bx, bt)
                except BaseException as e:  # an interrupt, too, must not leave the stream recording
                    _end_quietly(s)
                    if not isinstance(e, Exception):
                        raise
                    return self._give_up(e)
                try:
                    graph = s.end_capture()
                except Exception as e:  # noqa: BLE001
                    return self._give_up(e)
        self.graphs[key] = (graph, bx, bt, pool)
        return self.graphs[key]

    def _give_up(self, e):
        global _failed
        self.failed = _failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"CUDA graph capture failed ({self.failed}); training steps run eagerly from now on",
                      stacklevel=3)
        return None
