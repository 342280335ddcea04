//! The system programs the demo, the tests and the benchmarks run, and the Debian packages
//! that bring them: checked before anything is built, installed with apt-get when some are
//! missing (once, saying what), or, where that cannot be done (no apt-get, not root,
//! `NB_NO_INSTALL=1`), a stop with one line that names the packages to install.

use std::{
    collections::BTreeSet,
    ffi::{OsStr, OsString},
    path::Path,
    process::Command,
};

use anyhow::{Result, bail};

/// A program and the Debian package it comes in.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub command: &'static str,
    pub package: &'static str,
}

const fn tool(command: &'static str, package: &'static str) -> Tool {
    Tool { command, package }
}

/// What the demo runs: namespaces and links, offloads of the veths, a ping, the pinned maps.
pub const DEMO: &[Tool] = &[
    tool("ip", "iproute2"),
    tool("ss", "iproute2"),
    tool("ethtool", "ethtool"),
    tool("ping", "iputils-ping"),
    tool("bpftool", "bpftool"),
    tool("curl", "curl"),
    tool("sysctl", "procps"),
];

/// What the tests run besides the demo's: descriptor limits, the fleet's BGP speaker and
/// VRRP daemon, and a browser for the status page.
pub const TEST: &[Tool] = &[
    tool("prlimit", "util-linux"),
    tool("bird", "bird2"),
    tool("keepalived", "keepalived"),
    tool("chromium-headless-shell", "chromium-headless-shell"),
];

/// What the benchmarks run besides the demo's: the load generator and the anchors.
pub const BENCH: &[Tool] = &[
    tool("wrk", "wrk"),
    tool("nginx", "nginx-light"),
    tool("haproxy", "haproxy"),
    tool("nft", "nftables"),
    tool("openssl", "openssl"),
    tool("cc", "gcc"),
];

/// Whether `command` is an executable file in one of `path`'s directories.
fn on_path(command: &str, path: &OsStr) -> bool {
    std::env::split_paths(path).any(|dir| {
        let f = dir.join(command);
        std::fs::metadata(&f)
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
            .unwrap_or(false)
    })
}

/// The packages of `tools` whose program `path` lacks.
pub fn missing(tools: &[&[Tool]], path: &OsStr) -> BTreeSet<&'static str> {
    tools
        .iter()
        .flat_map(|t| t.iter())
        .filter(|t| !on_path(t.command, path))
        .map(|t| t.package)
        .collect()
}

/// Why the packages could not be installed here, if they cannot.
fn cannot_install(path: &OsStr) -> Option<&'static str> {
    if std::env::var_os("NB_NO_INSTALL").is_some_and(|v| v == "1") {
        return Some("NB_NO_INSTALL=1");
    }
    if !on_path("apt-get", path) {
        return Some("no apt-get here");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root");
    }
    None
}

/// Makes sure every program of `tools` is there: installs the missing packages with apt-get
/// (saying which), or stops with one line naming them.
pub fn ensure(what: &str, tools: &[&[Tool]]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    // sbin holds several of these programs but is not on every user's PATH.
    let mut dirs: Vec<_> = std::env::split_paths(&path).collect();
    for extra in ["/usr/sbin", "/sbin"] {
        if !dirs.iter().any(|d| d == Path::new(extra)) {
            dirs.push(extra.into());
        }
    }
    let path = std::env::join_paths(dirs)?;
    check(what, tools, &path, cannot_install(&path))
}

/// [`ensure`] for a given PATH, and why installing is impossible (`None`: install).
fn check(what: &str, tools: &[&[Tool]], path: &OsStr, no_install: Option<&str>) -> Result<()> {
    let need = missing(tools, path);
    if need.is_empty() {
        return Ok(());
    }
    let list = need.iter().copied().collect::<Vec<_>>().join(" ");
    if let Some(why) = no_install {
        bail!("{what} needs these Debian packages ({why}): apt-get install {list}");
    }
    println!("{what} needs {list}: installing them with apt-get");
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?;
        if !status.success() {
            bail!(
                "apt-get {} failed ({status}): apt-get install {list}",
                args[0]
            );
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(need.iter().copied());
    apt(&install)?;
    let still = missing(tools, path);
    if !still.is_empty() {
        let list = still.into_iter().collect::<Vec<_>>().join(" ");
        bail!("{what}: still missing after apt-get install: {list}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PATH holding fake programs named `names`, in a directory of its own.
    fn fake_path(tag: &str, names: &[&str]) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("nb-xtask-path-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for n in names {
            let f = dir.join(n);
            std::fs::write(&f, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    }

    /// The demo's check on a PATH without ethtool: one line naming the package, not a panic.
    #[test]
    fn a_missing_program_is_one_line_naming_its_package() {
        let all: Vec<&str> = DEMO.iter().map(|t| t.command).collect();
        let without: Vec<&str> = all.iter().copied().filter(|c| *c != "ethtool").collect();
        let dir = fake_path("demo", &without);
        let e = check("the demo", &[DEMO], dir.as_os_str(), Some("not root")).unwrap_err();
        let text = format!("{e:#}");
        assert_eq!(
            text,
            "the demo needs these Debian packages (not root): apt-get install ethtool"
        );
        assert!(!text.contains('\n'));
        let full = fake_path("full", &all);
        assert!(check("the demo", &[DEMO], full.as_os_str(), Some("not root")).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&full);
    }

    #[test]
    fn packages_are_named_once() {
        let dir = fake_path("empty", &[]);
        let need = missing(&[DEMO], dir.as_os_str());
        assert_eq!(need.iter().filter(|p| **p == "iproute2").count(), 1);
        assert!(
            need.contains("ethtool") && need.contains("curl"),
            "{need:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
