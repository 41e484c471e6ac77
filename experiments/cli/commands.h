// One function per omniq subcommand; each lives in its own file under experiments/cli/.
#pragma once

namespace omniq::cli {

int run_eval(int argc, char** argv);
int run_calibrate(int argc, char** argv);

}  // namespace omniq::cli
