//! The `NB_SRVID` stickiness cookie: a node label signed with HMAC-SHA256 under a 32-byte
//! secret kept in `state_dir`, so a client cannot steer itself to a node it picks, and every
//! balancer that shares the secret file honours the same cookies.

use std::{
    fs,
    io::Read,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwapOption;
use hmac::{Hmac, Mac};
use http::HeaderValue;
use sha2::Sha256;
use thiserror::Error;

use crate::secret_file;

/// The cookie's name (README "Configuration": `stickiness = "http_cookie"`).
pub const COOKIE_NAME: &str = "NB_SRVID";
/// The secret's file name inside `state_dir`.
pub const KEY_FILE: &str = "stickiness.key";
/// Bytes of the MAC kept in the cookie: 128 bits are far beyond guessing and keep it short.
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Why the stickiness secret could not be read or made.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("stickiness secret {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "stickiness secret {path}: {len} bytes, expected {KEY_LEN}; delete it and restart to have \
         a new one made (cookies signed with the old one then stop sticking: those clients are \
         balanced afresh, once)"
    )]
    Length { path: PathBuf, len: usize },
    #[error(
        "stickiness secret {path} is empty (cut short while it was written); delete it and \
         restart to have a new one made (cookies signed with the old one then stop sticking: \
         those clients are balanced afresh, once)"
    )]
    Empty { path: PathBuf },
}

/// The secret that signs and checks `NB_SRVID` cookies.
#[derive(Clone)]
pub struct CookieKey {
    key: [u8; KEY_LEN],
}

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieKey(..)")
    }
}

impl CookieKey {
    /// A key from raw bytes (tests, and balancers handed the secret some other way).
    pub fn from_bytes(key: [u8; KEY_LEN]) -> CookieKey {
        CookieKey { key }
    }

    /// Reads `state_dir/stickiness.key`, or creates it (mode 0600, from the kernel's random
    /// source) when it does not exist yet: the same file on every restart keeps cookies valid.
    /// It is created whole or not at all (see [`secret_file::write_atomic`]), so a crash while
    /// it is made cannot leave a short key that would stop the next start.
    pub fn load_or_create(state_dir: &Path) -> Result<CookieKey, KeyError> {
        let path = state_dir.join(KEY_FILE);
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        if !state_dir.exists() {
            fs::create_dir_all(state_dir).map_err(io)?;
            fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        match fs::read(&path) {
            Ok(bytes) => {
                secret_file::warn_if_exposed(&path, "stickiness secret");
                if bytes.is_empty() {
                    return Err(KeyError::Empty { path });
                }
                let key: [u8; KEY_LEN] =
                    bytes.as_slice().try_into().map_err(|_| KeyError::Length {
                        path: path.clone(),
                        len: bytes.len(),
                    })?;
                Ok(CookieKey { key })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; KEY_LEN];
                fs::File::open("/dev/urandom")
                    .and_then(|mut r| r.read_exact(&mut key))
                    .map_err(io)?;
                secret_file::write_atomic(&path, &key, 0o600).map_err(io)?;
                Ok(CookieKey { key })
            }
            Err(e) => Err(io(e)),
        }
    }

    fn mac(&self, port: u16, label: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&port.to_be_bytes());
        mac.update(label.as_bytes());
        mac
    }

    /// The cookie value naming `label` on `port`: `LABEL.HEXTAG`. The port is signed too, so a
    /// cookie of one port never steers another port's traffic.
    pub fn sign(&self, port: u16, label: &str) -> String {
        let tag = self.mac(port, label).finalize().into_bytes();
        let mut out = String::with_capacity(label.len() + 1 + 2 * TAG_LEN);
        out.push_str(label);
        out.push('.');
        for b in &tag[..TAG_LEN] {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// The label a cookie value names, if its signature is ours for `port`; `None` for
    /// anything else (forged, stale key, malformed), which callers treat as no cookie.
    pub fn verify<'a>(&self, port: u16, value: &'a str) -> Option<&'a str> {
        let (label, hex) = value.rsplit_once('.')?;
        if hex.len() != 2 * TAG_LEN || label.is_empty() {
            return None;
        }
        // Only the spelling `sign` writes: `from_str_radix` alone also takes upper case and a
        // '+' before a digit, other spellings of the same cookie.
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut tag = [0u8; TAG_LEN];
        for (i, b) in tag.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        self.mac(port, label)
            .verify_truncated_left(&tag)
            .ok()
            .map(|_| label)
    }
}

/// The `NB_SRVID` values in the `Cookie` header values `headers` (several when an HTTP/2
/// client splits them).
pub fn find<'a>(headers: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    headers
        .flat_map(|h| h.split(';'))
        .filter_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name.trim() == COOKIE_NAME).then(|| value.trim().trim_matches('"'))
        })
        .collect()
}

/// A `Cookie` header value without `NB_SRVID` (backends never see the balancer's cookie),
/// or `None` when nothing is left.
pub fn strip(header: &str) -> Option<String> {
    let kept: Vec<&str> = header
        .split(';')
        .map(str::trim)
        .filter(|c| {
            !c.is_empty()
                && c.split_once('=')
                    .is_none_or(|(name, _)| name.trim() != COOKIE_NAME)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// A node's `Set-Cookie` answers, signed once for the key and port they were made with: a
/// port with cookie stickiness answers every client without a valid cookie with one, and an
/// HMAC and a header per answer cost about a tenth of the balancer's time (measured with
/// `NB_BENCH_L7_COOKIE=1 cargo xtask bench l7`). A new key (a reload after the secret file
/// changed) or port signs anew at the next answer. Read without a lock.
#[derive(Debug, Default)]
pub struct SetCookieCache(ArcSwapOption<Signed>);

/// The answers one key made for one port: without and with `Secure`.
#[derive(Debug)]
pub struct Signed {
    key: Arc<CookieKey>,
    port: u16,
    values: [HeaderValue; 2],
}

impl SetCookieCache {
    /// The `Set-Cookie` value sticking a client to `label` on `port` under `key`.
    pub fn get(
        &self,
        key: &Arc<CookieKey>,
        port: u16,
        label: &str,
        secure: bool,
    ) -> Option<HeaderValue> {
        if let Some(s) = &*self.0.load()
            && Arc::ptr_eq(&s.key, key)
            && s.port == port
        {
            return Some(s.values[usize::from(secure)].clone());
        }
        let v = key.sign(port, label);
        let values = [
            HeaderValue::from_str(&set_cookie(&v, false)).ok()?,
            HeaderValue::from_str(&set_cookie(&v, true)).ok()?,
        ];
        let answer = values[usize::from(secure)].clone();
        self.0.store(Some(Arc::new(Signed {
            key: key.clone(),
            port,
            values,
        })));
        Some(answer)
    }
}

/// The `Set-Cookie` value that sticks a client to the node `value` names.
pub fn set_cookie(value: &str, secure: bool) -> String {
    let mut s = format!("{COOKIE_NAME}={value}; Path=/; HttpOnly; SameSite=Lax");
    if secure {
        s.push_str("; Secure");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache answers what signing anew would, and signs anew for another key or port.
    #[test]
    fn the_cache_answers_as_signing_would_for_its_key_and_port() {
        let cache = SetCookieCache::default();
        let (k1, k2) = (Arc::new(key(1)), Arc::new(key(2)));
        let fresh = |k: &CookieKey, port, secure| set_cookie(&k.sign(port, "b1"), secure);
        for _ in 0..2 {
            for secure in [false, true] {
                let v = cache.get(&k1, 80, "b1", secure).expect("value");
                assert_eq!(v.to_str().unwrap(), fresh(&k1, 80, secure));
            }
        }
        let v = cache.get(&k2, 80, "b1", false).expect("value");
        assert_eq!(v.to_str().unwrap(), fresh(&k2, 80, false), "a new key");
        let v = cache.get(&k2, 81, "b1", true).expect("value");
        assert_eq!(v.to_str().unwrap(), fresh(&k2, 81, true), "another port");
    }

    fn key(b: u8) -> CookieKey {
        CookieKey::from_bytes([b; KEY_LEN])
    }

    #[test]
    fn signed_value_verifies_and_names_the_label() {
        let k = key(7);
        let v = k.sign(80, "web.1-a");
        assert!(v.starts_with("web.1-a."), "{v}");
        assert_eq!(k.verify(80, &v), Some("web.1-a"));
    }

    #[test]
    fn forged_or_foreign_values_are_ignored() {
        let k = key(7);
        let v = k.sign(80, "web1");
        // Another label with web1's tag.
        let forged = v.replacen("web1", "web2", 1);
        assert_eq!(k.verify(80, &forged), None);
        // One flipped hex digit.
        let mut flipped = v.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(k.verify(80, std::str::from_utf8(&flipped).unwrap()), None);
        // Another key (a stale secret), another port.
        assert_eq!(key(8).verify(80, &v), None);
        assert_eq!(k.verify(81, &v), None);
        // Malformed values never panic.
        for bad in [
            "",
            ".",
            "web1",
            "web1.",
            "web1.zz",
            ".00112233445566778899aabbccddeeff",
        ] {
            assert_eq!(k.verify(80, bad), None, "{bad:?}");
        }
        let non_ascii = format!("web1.{}", "é".repeat(16));
        assert_eq!(k.verify(80, &non_ascii), None);
    }

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("nb-cookie-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn key_file_is_created_0600_whole_and_reused() {
        let dir = scratch("create");
        let a = CookieKey::load_or_create(&dir).expect("create");
        let path = dir.join(KEY_FILE);
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read(&path).expect("read").len(), KEY_LEN);
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [KEY_FILE], "no temporary left beside the key");
        let b = CookieKey::load_or_create(&dir).expect("reuse");
        assert_eq!(a.key, b.key, "the same secret after a restart");
        assert_eq!(b.verify(80, &a.sign(80, "n1")), Some("n1"));
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn empty_or_short_key_is_an_error_naming_the_file_and_the_fix() {
        let dir = scratch("bad");
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(KEY_FILE);
        fs::write(&path, b"").expect("write");
        let e = CookieKey::load_or_create(&dir).expect_err("empty");
        assert!(matches!(e, KeyError::Empty { .. }), "{e:?}");
        let m = e.to_string();
        assert!(m.contains(&path.display().to_string()), "{m}");
        assert!(m.contains("is empty") && m.contains("delete it"), "{m}");
        assert_eq!(
            fs::read(&path).expect("kept"),
            b"",
            "an error replaces nothing"
        );
        fs::write(&path, b"short").expect("write");
        let e = CookieKey::load_or_create(&dir).expect_err("short");
        assert!(matches!(e, KeyError::Length { len: 5, .. }), "{e:?}");
        let m = e.to_string();
        assert!(m.contains(&path.display().to_string()), "{m}");
        assert!(
            m.contains("5 bytes, expected 32") && m.contains("delete it"),
            "{m}"
        );
        assert!(m.contains("stop sticking"), "says what deleting does: {m}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_key_others_may_read_is_used_with_a_warning() {
        let dir = scratch("mode");
        let a = CookieKey::load_or_create(&dir).expect("create");
        let path = dir.join(KEY_FILE);
        assert_eq!(secret_file::exposure(&path, "stickiness secret"), None);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let w = secret_file::exposure(&path, "stickiness secret").expect("a warning");
        assert!(w.contains(&format!("chmod 600 {}", path.display())), "{w}");
        let b = CookieKey::load_or_create(&dir).expect("still loads");
        assert_eq!(a.key, b.key);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn cookie_header_parsing_and_stripping() {
        let h = ["a=1; NB_SRVID=x.y; b=2", "NB_SRVID=\"q\""];
        assert_eq!(find(h.iter().copied()), vec!["x.y", "q"]);
        assert_eq!(strip("a=1; NB_SRVID=x.y; b=2").as_deref(), Some("a=1; b=2"));
        assert_eq!(strip("NB_SRVID=x.y"), None);
        assert_eq!(
            set_cookie("v", true),
            "NB_SRVID=v; Path=/; HttpOnly; SameSite=Lax; Secure"
        );
        assert!(!set_cookie("v", false).contains("Secure"));
    }
}
