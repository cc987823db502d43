//! The launcher's tests as one binary: real processes on loopback.

mod launch_processes;
mod process_training;
