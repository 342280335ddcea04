//! The admin and read tokens: read from their files on every request (a new token takes
//! effect without a restart), compared in constant time, checked before any body is read.

use std::path::Path;

use hyper::StatusCode;
use log::info;
use sha2::{Digest, Sha256};

use super::{Refusal, Reply};
use crate::config;

/// Compares two secrets in time independent of where they differ and of their lengths:
/// both are hashed first, then every byte of the digests is compared.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    let diff = da
        .iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token in a token file (read on every request that carries one, so a new token takes
/// effect without a restart), or why there is none, for the log: the answer to the caller
/// never names the file.
fn token_in(file: &Path) -> Result<String, String> {
    match std::fs::read_to_string(file) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => Err(format!("{} is empty", file.display())),
        Err(e) => Err(format!("{}: {e}", file.display())),
    }
}

/// The TOKEN of `Authorization: Bearer TOKEN`.
fn bearer(authorization: Option<&str>) -> Option<&str> {
    let (scheme, rest) = authorization?.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Whether `given` is the token in `file`; a missing or empty file matches nothing.
fn is_token(file: &Path, given: &str) -> bool {
    token_in(file).is_ok_and(|t| same_secret(given.as_bytes(), t.as_bytes()))
}

/// A write needs the admin token. No token file, or an empty one, refuses every write; the
/// read token is refused with 403 (it is known, but may not write).
pub(super) fn authorize_write(
    admin: &config::Admin,
    authorization: Option<&str>,
) -> Result<(), Refusal> {
    let unauthorized = |m: &str| Refusal::new(StatusCode::UNAUTHORIZED, m);
    if let Err(why) = token_in(&admin.token_file) {
        info!("admin API: write refused, no admin token: {why}");
        return Err(unauthorized(
            "writes are disabled: the agent has no admin token (see its log)",
        ));
    }
    let given = bearer(authorization)
        .ok_or_else(|| unauthorized("missing 'Authorization: Bearer TOKEN'"))?;
    if is_token(&admin.token_file, given) {
        return Ok(());
    }
    if admin
        .read_token_file
        .as_deref()
        .is_some_and(|f| is_token(f, given))
    {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "the read token may not write: use the admin token",
        ));
    }
    Err(unauthorized("bad token"))
}

/// Whether a read may see file paths (`true`: it carries the admin or the read token), or its
/// refusal: with `read_token_file` set, a read without either token is 401. Without it, reads
/// are open but show no paths.
pub(super) fn authorize_read(
    admin: &config::Admin,
    authorization: Option<&str>,
) -> Result<bool, Reply> {
    let known = bearer(authorization).is_some_and(|given| {
        is_token(&admin.token_file, given)
            || admin
                .read_token_file
                .as_deref()
                .is_some_and(|f| is_token(f, given))
    });
    if !known && admin.read_token_file.is_some() {
        let m = if bearer(authorization).is_some() {
            "bad token"
        } else {
            "reads need 'Authorization: Bearer TOKEN' (the read token or the admin token)"
        };
        return Err(Reply::error(StatusCode::UNAUTHORIZED, m));
    }
    Ok(known)
}
