//! Empty: the XDP program is the `nb-ebpf` binary (see `main.rs`).
#![no_std]
