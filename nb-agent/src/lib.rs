//! nb-agent: configuration, the XDP data path from user space, health checks and the daemon.

pub mod dataplane;
pub mod selection;
