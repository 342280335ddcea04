//! Property-based fuzzing of the parsers that read what others send or write: the PROXY
//! header writer (against a reference reader), the `NB_SRVID` cookie, the config file, the
//! admin API's JSON bodies and state file, the HTTP/1 response head and chunked framing, and
//! the relay's request head reader and rewriter.
//!
//! proptest rather than libFuzzer, because it runs on stable Rust inside `cargo test`: every
//! `cargo test` (and so CI) runs each target briefly, and `cargo xtask fuzz [TARGET] --cases N`
//! runs the same tests with many more cases (it sets [`CASES_ENV`]).
//!
//! proptest's failure persistence is off: every failure it finds becomes a named `#[test]`
//! beside its target, with the shrunk input written out, which reads better in review than a
//! seed file and does not go stale when a strategy changes shape (a persisted seed replays
//! whatever the changed strategy now makes of it). A failure prints its shrunk input;
//! `PROPTEST_RNG_SEED=N` replays a run's inputs.

mod api;
mod config;
mod cookie;
mod h1;
mod proxy_header;
mod relay;
pub(crate) mod request_heads;

use proptest::test_runner::Config;

/// Environment variable that replaces every target's case count, for long runs.
pub(crate) const CASES_ENV: &str = "NB_FUZZ_CASES";

/// The proptest settings of a target whose bounded run inside `cargo test` is `short` cases:
/// few enough that all targets together add seconds, not minutes, to the test suite.
pub(crate) fn settings(short: u32) -> Config {
    let cases = std::env::var(CASES_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(short);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}
