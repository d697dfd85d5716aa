// dtype_name (cpu_isa.h): "torch.float32"-style names for the error messages, as Python prints
// them. A file of its own so that the CUDA emulator's build (csrc/cuda_emu/) links it too.
#include <string>

#include <c10/core/ScalarType.h>

#include "cpu_isa.h"

namespace quantkernels {
namespace cpu {

std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "torch.float32";
    case c10::ScalarType::Half: return "torch.float16";
    case c10::ScalarType::BFloat16: return "torch.bfloat16";
    case c10::ScalarType::Double: return "torch.float64";
    case c10::ScalarType::Char: return "torch.int8";
    case c10::ScalarType::Byte: return "torch.uint8";
    case c10::ScalarType::Short: return "torch.int16";
    case c10::ScalarType::Int: return "torch.int32";
    case c10::ScalarType::Long: return "torch.int64";
    case c10::ScalarType::Bool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

}  // namespace cpu
}  // namespace quantkernels
