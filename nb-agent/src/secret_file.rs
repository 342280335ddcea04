//! Files that hold secrets (README "File permissions"): the stickiness key the agent makes,
//! the token files an operator writes, and the state the agent records.
//!
//! What the agent writes is written so that a crash at any moment leaves either the old file
//! or the new one, never a torn one: a torn stickiness key would stop every restart.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use log::warn;

/// Replaces `path` with `data`, file mode `mode`: a temporary file in the same directory
/// (a rename across file systems would not be atomic), fsync, rename over `path`, fsync of
/// the directory so the rename itself survives a power cut.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir)?;
    let tmp = temporary(path);
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open is cut by the umask, and a leftover temporary keeps its own.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fs::File::open(dir)?.sync_all()
}

/// `DIR/.NAME.tmp`: hidden, next to the file it becomes.
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// The warning for a secret file that group or others may read, or `None` when only its
/// owner may (or it cannot be examined: whoever reads it reports that).
pub fn exposure(path: &Path, what: &str) -> Option<String> {
    let mode = fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{what} {} is readable by group or others (mode {mode:04o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        )
    })
}

/// Logs [`exposure`]'s warning. A warning and not a refusal: a config-management tool that
/// writes the file 0644 would otherwise stop a running balancer from restarting, an outage
/// worse than the exposure, which the log now names.
pub fn warn_if_exposed(path: &Path, what: &str) {
    if let Some(m) = exposure(path, what) {
        warn!("{m}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_with_the_mode_and_no_leftover() {
        let dir = std::env::temp_dir().join(format!("nb-secret-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let f = dir.join("s.key");
        write_atomic(&f, b"one", 0o600).expect("first");
        write_atomic(&f, b"two", 0o600).expect("second");
        assert_eq!(fs::read(&f).expect("read"), b"two");
        let mode = fs::metadata(&f).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!temporary(&f).exists(), "no temporary left");
        assert_eq!(exposure(&f, "key"), None);
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
        let m = exposure(&f, "key").expect("exposed");
        assert!(m.contains(&f.display().to_string()), "{m}");
        assert!(m.contains("chmod 600"), "{m}");
        assert_eq!(exposure(&dir.join("absent"), "key"), None);
        fs::remove_dir_all(&dir).expect("clean");
    }
}
