// The kernels compiled for one instruction set (flags in CMakeLists.txt).
#define PYAD_TARGET_SCALAR
#define PYAD_NS pyad_scalar
#define PYAD_ISA_NAME "scalar"
#include "impl.hpp"

namespace pyad {
const KernelTable* table_scalar() { return &PYAD_NS::table; }
}  // namespace pyad
