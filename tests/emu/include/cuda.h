/* tests/emu/include/cuda.h — stands in for the CUDA toolkit header of this name
 * when a .cu file is built against the emulator (tests/emu/cuda_emu.h). */
#include "../cuda_emu.h"
