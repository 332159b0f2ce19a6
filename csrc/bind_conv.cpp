#include "bind_common.hpp"

namespace pyad {

namespace {

void check_kernel(int r, int pad) {
    if (r != 3 && r != 4) throw py::value_error("kernel_size: expected 3 or 4");
    if (pad < 0 || pad > r - 1) throw py::value_error("pad: expected 0 <= pad <= kernel_size - 1");
}

// Both write into caller-owned buffers (views of the torch tensors the Python layer allocates).
void winograd_input(const py::array& x, int r, int pad, int64_t t0, py::array& v) {
    require(x, "x", "float32", 4);
    require(v, "out", "float32", 3);
    if (!v.writeable()) throw py::value_error("out: expected a writable array");
    const int64_t b = x.shape(0), h = x.shape(1), w = x.shape(2), c = x.shape(3), tc = v.shape(1);
    check_kernel(r, pad);
    const int64_t ho = h + 2 * pad - r + 1, wo = w + 2 * pad - r + 1, m = 7 - r;
    if (ho < 1 || wo < 1) throw py::value_error("x: spatial size smaller than the kernel");
    const int64_t tiles = b * ((ho + m - 1) / m) * ((wo + m - 1) / m);
    if (v.shape(0) != 36 || v.shape(2) != c) throw py::value_error("out: expected shape [36, tiles, channels]");
    if (t0 < 0 || t0 + tc > tiles) throw py::value_error("t0: tiles [t0, t0 + out.shape[1]) out of range");
    const float* xp = static_cast<const float*>(x.data());
    float* vp = static_cast<float*>(v.mutable_data());
    py::gil_scoped_release release;
    active().winograd_input(xp, b, h, w, c, r, pad, t0, tc, vp);
}

void winograd_output(const py::array& m, int r, int64_t t0, const py::object& bias, const py::object& residual, bool relu,
                     py::array& out) {
    require(m, "m", "float32", 3);
    require(out, "out", "float32", 4);
    if (!out.writeable()) throw py::value_error("out: expected a writable array");
    const int64_t b = out.shape(0), ho = out.shape(1), wo = out.shape(2), k = out.shape(3), tc = m.shape(1);
    check_kernel(r, 0);
    const int64_t tiles = b * ((ho + 6 - r) / (7 - r)) * ((wo + 6 - r) / (7 - r));
    if (m.shape(0) != 36 || m.shape(2) != k) throw py::value_error("m: expected shape [36, tiles, out channels]");
    if (t0 < 0 || t0 + tc > tiles) throw py::value_error("t0: tiles [t0, t0 + m.shape[1]) out of range");
    const float* bp = nullptr;
    const float* rp = nullptr;
    py::array ba, ra;
    if (!bias.is_none()) {
        ba = bias.cast<py::array>();
        require(ba, "bias", "float32", 1);
        if (ba.shape(0) != k) throw py::value_error("bias: expected one value per output channel");
        bp = static_cast<const float*>(ba.data());
    }
    if (!residual.is_none()) {
        ra = residual.cast<py::array>();
        require(ra, "residual", "float32", 4);
        for (int i = 0; i < 4; ++i)
            if (ra.shape(i) != out.shape(i)) throw py::value_error("residual: expected the output's shape");
        rp = static_cast<const float*>(ra.data());
    }
    const float* mp = static_cast<const float*>(m.data());
    float* op = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    active().winograd_output(mp, b, ho, wo, k, r, t0, tc, bp, rp, relu ? 1 : 0, op);
}

void winograd_output_grad(const py::array& dy, int r, int64_t t0, py::array& out) {
    require(dy, "dy", "float32", 4);
    require(out, "out", "float32", 3);
    if (!out.writeable()) throw py::value_error("out: expected a writable array");
    const int64_t b = dy.shape(0), ho = dy.shape(1), wo = dy.shape(2), k = dy.shape(3), tc = out.shape(1);
    check_kernel(r, 0);
    const int64_t tiles = b * ((ho + 6 - r) / (7 - r)) * ((wo + 6 - r) / (7 - r));
    if (out.shape(0) != 36 || out.shape(2) != k) throw py::value_error("out: expected shape [36, tiles, channels]");
    if (t0 < 0 || t0 + tc > tiles) throw py::value_error("t0: tiles [t0, t0 + out.shape[1]) out of range");
    const float* dp = static_cast<const float*>(dy.data());
    float* op = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    active().winograd_output_grad(dp, b, ho, wo, k, r, t0, tc, op);
}

}  // namespace

void register_conv(py::module_& m) {
    m.def("winograd_input", &winograd_input, py::arg("x"), py::arg("kernel_size"), py::arg("pad"), py::arg("t0"),
          py::arg("out"),
          "x [B,H,W,C] f32 -> out [36,T,C]: Winograd F(4x4,3x3) / F(3x3,4x4) input transform of tiles [t0, t0+T).");
    m.def("winograd_output", &winograd_output, py::arg("m"), py::arg("kernel_size"), py::arg("t0"), py::arg("bias"), py::arg("residual"),
          py::arg("relu"), py::arg("out"),
          "m [36,T,K] f32 -> out [B,Ho,Wo,K] (tiles [t0, t0+T)): output transform, + bias, + residual, ReLU.");
    m.def("winograd_output_grad", &winograd_output_grad, py::arg("dy"), py::arg("kernel_size"), py::arg("t0"),
          py::arg("out"),
          "dy [B,Ho,Wo,K] f32 -> out [36,T,K]: the output transform's adjoint A dY A^T of tiles [t0, t0+T).");
}

}  // namespace pyad
