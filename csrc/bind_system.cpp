#include <stdexcept>

#include "bind_common.hpp"

namespace pyad {

void register_system(py::module_& m) {
    m.def("isa", [] { return std::string(active().isa); }, "Instruction set of the kernels in use.");
    m.def("compiled_isas", &compiled_isas, "Instruction sets compiled into this build, narrowest first.");
    m.def("supported_isas", &supported_isas, "Compiled instruction sets this CPU runs, narrowest first.");
    m.def(
        "set_isa",
        [](const std::string& name) {
            try {
                select_isa(name);
            } catch (const std::invalid_argument& e) {
                throw py::value_error(e.what());
            }
        },
        py::arg("name"), "Use the kernels compiled for `name` (ValueError if unavailable).");
    m.def("num_threads", &num_threads, "Threads used by the parallel kernels.");
    m.def("set_num_threads", &set_num_threads, py::arg("n"),
          "Threads for the parallel kernels; n <= 0 restores the OpenMP default.");
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
    m.def(
        "stream_sum",
        [](const py::array& x) {
            require(x, "x", "float32", 1);
            const float* p = static_cast<const float*>(x.data());
            const int64_t n = x.shape(0);
            py::gil_scoped_release release;
            return active().stream_sum(p, n);
        },
        py::arg("x"), "Sum of a float32 vector read by all threads (a memory-bandwidth probe).");
}

}  // namespace pyad
