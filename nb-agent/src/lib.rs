//! nb-agent: configuration, the XDP data path from user space, and the daemon around them.

pub mod agent;
pub mod announce;
pub mod api;
pub mod appliers;
pub mod config;
pub mod dataplane;
pub mod fds;
pub mod fleet;
#[cfg(test)]
mod fuzz;
pub mod health;
pub mod history;
mod map_batch;
pub mod metrics;
pub mod model;
pub mod pins;
pub mod plan;
pub mod proxy;
pub mod secret_file;
pub mod selection;
pub mod slow_start;
pub mod sync;
pub mod upgrade;
