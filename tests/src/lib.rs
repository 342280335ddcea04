//! Test support for nb: network namespaces and backends (`netns`), packet frames (`packet`),
//! the packet-table rig (`rig`), raw packets and tc programs (`raw`), and whole test networks
//! with a running agent (`topo`), and a fleet of balancers behind a BGP router (`fleet`).

pub mod fleet;
pub mod netns;
pub mod packet;
pub mod raw;
pub mod rig;
pub mod topo;

/// Privileged tests run as root or fail loudly: a skipped test checks nothing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (BPF, network namespaces); run `cargo xtask test` as root");
    }
}
