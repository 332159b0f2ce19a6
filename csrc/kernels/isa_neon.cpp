// The kernels compiled for one instruction set (flags in CMakeLists.txt).
#define PYAD_TARGET_NEON
#define PYAD_NS pyad_neon
#define PYAD_ISA_NAME "neon"
#include "impl.hpp"

namespace pyad {
const KernelTable* table_neon() { return &PYAD_NS::table; }
}  // namespace pyad
