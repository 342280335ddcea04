//! The typed model of `nb.toml`, with a parser whose every complaint names file and line.
//!
//! `model` holds the typed config, `walk` reads a TOML document into it (every error naming
//! file and line), and `rules` holds the checks on values and between fields and ports,
//! shared by the file and the admin API.

use std::{
    fmt,
    path::{Path, PathBuf},
};

mod model;
mod rules;
#[cfg(test)]
mod tests;
mod walk;

pub use model::{
    Admin, Algorithm, Balancer, CheckKind, CipherSuite, Config, Fleet, Node, NodeMode, Port,
    Protocol, ProxyProtocol, Stickiness, XdpMode,
};
pub use rules::{node_address, node_weight, validate_port};
pub use walk::{parse, port_from_table};

/// One problem in a config file, located so an operator can go straight to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Why a config file could not be loaded; `Invalid` holds every problem, one per line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
}

/// Reads and parses `path`; the one entry point for both the daemon and `nb-agent check`.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text).map_err(LoadError::Invalid)
}
