//! Types shared by kernel and user space. Everything is `repr(C)` with explicit
//! padding so both sides agree byte for byte.
#![cfg_attr(target_arch = "bpf", no_std)]
