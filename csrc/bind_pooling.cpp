#include "bind_common.hpp"

namespace pyad {

namespace {

void check_window(const py::array& x, int kernel, int stride, int padding) {
    if (kernel < 1 || stride < 1 || padding < 0 || 2 * padding > kernel)
        throw py::value_error("kernel/stride/padding: expected kernel >= 1, stride >= 1, 0 <= padding <= kernel/2");
    if (x.shape(2) + 2 * padding < kernel || x.shape(3) + 2 * padding < kernel)
        throw py::value_error("fmap: spatial size smaller than the kernel");
}

py::array_t<float> patch_pool(const py::array& x, int kernel, int stride, int padding, const std::string& mode) {
    require(x, "fmap", "float32", 4);
    const int md = pool_mode(mode);
    if (md == kUnfold) throw py::value_error("mode: 'unfold' needs an output length (use patch_embed)");
    check_window(x, kernel, stride, padding);
    const int64_t b = x.shape(0), c = x.shape(1), h = x.shape(2), w = x.shape(3);
    const int64_t ho = (h + 2 * padding - kernel) / stride + 1, wo = (w + 2 * padding - kernel) / stride + 1;
    py::array_t<float> out({b, ho, wo, md == kAvgMax ? 2 * c : c});
    const float* xp = static_cast<const float*>(x.data());
    float* op = out.mutable_data();
    {
        py::gil_scoped_release release;
        active().patch_pool(xp, b, c, h, w, kernel, stride, padding, md, op);
    }
    return out;
}

py::array_t<float> patch_embed(const py::array& x, int64_t out_dim, int kernel, int stride, int padding,
                               const std::string& mode) {
    require(x, "fmap", "float32", 4);
    const int md = pool_mode(mode);
    check_window(x, kernel, stride, padding);
    if (out_dim < 1) throw py::value_error("out_dim: expected a positive length");
    const int64_t b = x.shape(0), c = x.shape(1), h = x.shape(2), w = x.shape(3);
    const int64_t ho = (h + 2 * padding - kernel) / stride + 1, wo = (w + 2 * padding - kernel) / stride + 1;
    py::array_t<float> out({b, ho, wo, out_dim});
    const float* xp = static_cast<const float*>(x.data());
    float* op = out.mutable_data();
    {
        py::gil_scoped_release release;
        active().patch_embed(xp, b, c, h, w, kernel, stride, padding, md, out_dim, op);
    }
    return out;
}

py::array_t<float> channel_pool(const py::array& x, int64_t out_dim) {
    require(x, "x", "float32", 2);
    if (out_dim < 1) throw py::value_error("out_dim: expected a positive length");
    const int64_t r = x.shape(0), l = x.shape(1);
    py::array_t<float> out({r, out_dim});
    const float* xp = static_cast<const float*>(x.data());
    float* op = out.mutable_data();
    {
        py::gil_scoped_release release;
        active().channel_pool(xp, r, l, out_dim, op);
    }
    return out;
}

}  // namespace

void register_pooling(py::module_& m) {
    m.def("patch_pool", &patch_pool, py::arg("fmap"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
          py::arg("mode"), "fmap [B,C,H,W] f32 -> [B,H',W',C] (2C for 'avgmax').");
    m.def("patch_embed", &patch_embed, py::arg("fmap"), py::arg("out_dim"), py::arg("kernel"), py::arg("stride"),
          py::arg("padding"), py::arg("mode"), "fmap [B,C,H,W] f32 -> [B,H',W',out_dim]: pool, reduce, relayout.");
    m.def("channel_pool", &channel_pool, py::arg("x"), py::arg("out_dim"),
          "x [R,L] f32 -> [R,out_dim]: adaptive average over the last axis.");
}

}  // namespace pyad
