// One function per omniq subcommand; each lives in its own file under experiments/cli/.
#pragma once

namespace omniq::cli {

int run_eval(int argc, char** argv);
int run_calibrate(int argc, char** argv);
int run_sweep_command(int argc, char** argv);  // omniq sweep FILE.yaml
int run_run_command(int argc, char** argv);    // omniq run FILE.yaml
int run_bench(int argc, char** argv);          // omniq bench calibrate ...

}  // namespace omniq::cli
