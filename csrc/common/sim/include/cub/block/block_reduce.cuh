// Simulator build only: cub::BlockReduce as the kernels use it (csrc/common/sim/cub_sim.h).
#pragma once
#include "common/sim/cub_sim.h"
