// The kernels compiled for one instruction set (flags in CMakeLists.txt).
#define PYAD_TARGET_SSE
#define PYAD_NS pyad_sse
#define PYAD_ISA_NAME "sse"
#include "impl.hpp"

namespace pyad {
const KernelTable* table_sse() { return &PYAD_NS::table; }
}  // namespace pyad
