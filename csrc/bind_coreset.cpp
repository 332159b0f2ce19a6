#include "bind_common.hpp"

namespace pyad {

namespace {

py::array_t<int64_t> greedy_coreset(const py::array& x, int64_t k, int64_t start, py::array& mind) {
    const char* dt = has_dtype(x, "float16") ? "float16" : has_dtype(x, "int8") ? "int8" : "float32";
    require(x, "features", dt, 2);
    const bool ints = dt[0] == 'i';
    require(mind, "mind", ints ? "int32" : "float32", 1);
    const int64_t m = x.shape(0), d = x.shape(1);
    if (mind.shape(0) != m) throw py::value_error("mind: expected one distance per point");
    if (k < 1 || k > m) throw py::value_error("k: expected 1 <= k <= number of points");
    if (start >= m) throw py::value_error("start: expected an index below the number of points");
    py::array_t<int64_t> idx(k);
    int64_t* ip = idx.mutable_data();
    const void* xp = x.data();
    void* mp = mind.mutable_data();
    {
        py::gil_scoped_release release;
        const KernelTable& t = active();
        if (ints) t.coreset_i8(static_cast<const int8_t*>(xp), m, d, k, start, static_cast<int32_t*>(mp), ip);
        else if (dt[5] == '1') t.coreset_f16(static_cast<const uint16_t*>(xp), m, d, k, start, static_cast<float*>(mp), ip);
        else t.coreset_f32(static_cast<const float*>(xp), m, d, k, start, static_cast<float*>(mp), ip);
    }
    return idx;
}

}  // namespace

void register_coreset(py::module_& m) {
    m.def("greedy_coreset", &greedy_coreset, py::arg("features"), py::arg("k"), py::arg("start"), py::arg("mind"),
          "features [M,d] f32|f16|i8; mind [M] squared distances (f32, i32 for i8), updated in place; "
          "start < 0 begins at argmax(mind) -> indices [k] i64.");
}

}  // namespace pyad
