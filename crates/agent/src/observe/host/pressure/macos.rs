//! macOS: the CPU time other processes took over a window and the CPU's thermal speed limit.
