//! Loading and draining the collector's eBPF programs.
