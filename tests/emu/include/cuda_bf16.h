/* tests/emu/include/cuda_bf16.h — stands in for the CUDA toolkit header of this name
 * when a .cu file is built against the emulator (tests/emu/cuda_emu.h). */
#include "../cuda_emu.h"
