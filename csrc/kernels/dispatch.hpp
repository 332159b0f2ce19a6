// Run-time choice of the kernel table from the CPU's features.
#pragma once
#include <string>
#include <vector>

#include "table.hpp"

namespace pyad {

// ISAs compiled into this build, narrowest first.
std::vector<std::string> compiled_isas();
// Compiled ISAs this CPU (and OS) can run, narrowest first.
std::vector<std::string> supported_isas();
// The table in use; the widest supported ISA unless select_isa() chose another.
const KernelTable& active();
// Use `name` from now on; throws std::invalid_argument if it is not supported.
void select_isa(const std::string& name);

}  // namespace pyad
