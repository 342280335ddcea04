//! The process's file-descriptor budget.
//!
//! Every client connection of an http/https (or user-space tcp) port costs a descriptor, and
//! so does every connection to a node, every health check and every admin API call. When the
//! process runs out, `connect(2)` fails with EMFILE: counted as the node's failure, that took
//! every node of every port DOWN (checks run in the same process). So nb raises its soft
//! `RLIMIT_NOFILE` to the hard limit at start, and then gives client connections at most half
//! of what is left after a reserve (for checks, the admin API, logs, BPF maps): new clients
//! are refused while that half is used, and the other half stays for connections to nodes.
//! A connect that still fails for lack of descriptors is nb's own failure, never the node's
//! (`ForwardError::LocalResources`, and the health checker's equivalent).

use std::sync::atomic::{AtomicUsize, Ordering};

use log::{info, warn};

/// Descriptors kept out of the client budget: listeners, BPF maps and programs, health
/// checks, the admin API, the journal.
const RESERVE: usize = 256;

/// Client connections the process admits at once (see the module docs); until [`init`] runs
/// (unit tests), effectively unlimited.
static CLIENT_BUDGET: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Client connections open now, over every port.
static CLIENTS: AtomicUsize = AtomicUsize::new(0);

/// Raises the soft descriptor limit to the hard one and sets the client budget from it; the
/// budget, for the log and the status.
pub fn init() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        warn!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
        return CLIENT_BUDGET.load(Ordering::Relaxed);
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the rlimit it is given, which lives on this stack.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        } else {
            warn!(
                "raising RLIMIT_NOFILE to {}: {}",
                lim.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
    let limit = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    let budget = budget_for(limit);
    CLIENT_BUDGET.store(budget, Ordering::Relaxed);
    if limit < 4096 {
        warn!(
            "open-file limit {limit}: at most {budget} client connections at once; raise \
             LimitNOFILE (systemd) or `ulimit -n` for more"
        );
    } else {
        info!("open-file limit {limit}: at most {budget} client connections at once");
    }
    budget
}

/// Client connections a process allowed `limit` descriptors admits.
fn budget_for(limit: usize) -> usize {
    (limit.saturating_sub(RESERVE) / 2).max(1)
}

/// One client connection's share of the budget, while it lives.
#[derive(Debug)]
pub struct ClientSlot(());

impl ClientSlot {
    /// A slot for a new client connection, or `None` when the budget is used up (the
    /// connection is then refused).
    pub fn take() -> Option<ClientSlot> {
        let budget = CLIENT_BUDGET.load(Ordering::Relaxed);
        let before = CLIENTS.fetch_add(1, Ordering::AcqRel);
        if before >= budget {
            CLIENTS.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ClientSlot(()))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        CLIENTS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Client connections open now, over every port.
pub fn clients() -> usize {
    CLIENTS.load(Ordering::Relaxed)
}

/// Whether `e` says this process (or the system) ran out of descriptors or socket memory:
/// nb's own limit, not the peer's failure.
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// How often a listener's accept(2) failures are logged: at EMFILE every accept fails, and a
/// line per failure would flood the journal.
const ACCEPT_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The accept(2) failures of one listener: logged at most once per [`ACCEPT_LOG_EVERY`],
/// with how many there were, and each followed by a pause, so a listener at EMFILE neither
/// spins nor floods the log (the connections wait in the listen backlog meanwhile).
#[derive(Debug, Default)]
pub struct AcceptErrors {
    logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    /// Counts `e`, logs if due, and pauses the accept loop.
    pub async fn back_off(&mut self, addr: std::net::SocketAddr, e: &std::io::Error) {
        self.unlogged += 1;
        if self.logged.is_none_or(|t| t.elapsed() >= ACCEPT_LOG_EVERY) {
            let more = match self.unlogged {
                1 => String::new(),
                n => format!(" ({n} failures since the last report)"),
            };
            let hint = if is_exhaustion(e) {
                "; new connections wait in the backlog until descriptors are free"
            } else {
                ""
            };
            warn!("{addr}: accept: {e}{more}{hint}");
            self.logged = Some(std::time::Instant::now());
            self.unlogged = 0;
        }
        let pause = if is_exhaustion(e) { 100 } else { 20 };
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_of_what_the_reserve_leaves_goes_to_clients() {
        assert_eq!(budget_for(1024), 384);
        assert_eq!(budget_for(1_048_576), 524_160);
        assert_eq!(budget_for(100), 1);
    }

    #[test]
    fn exhaustion_is_told_from_a_peer_failure() {
        for (errno, ours) in [
            (libc::EMFILE, true),
            (libc::ENFILE, true),
            (libc::ENOBUFS, true),
            (libc::ECONNREFUSED, false),
            (libc::ETIMEDOUT, false),
        ] {
            assert_eq!(
                is_exhaustion(&std::io::Error::from_raw_os_error(errno)),
                ours
            );
        }
    }
}
