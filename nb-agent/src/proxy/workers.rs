//! The serving workers: the runtimes that serve the ports, and which one the current thread
//! is. Listeners bind a socket per worker; backend connection pools keep a list per worker,
//! so that a kept-alive connection is only ever used on the runtime whose reactor polls it.

use std::{cell::Cell, sync::OnceLock};

use tokio::runtime::Handle;

/// The runtimes that serve the ports, set once at start (see [`set_runtimes`]).
static SERVING: OnceLock<Vec<Handle>> = OnceLock::new();

thread_local! {
    /// The index of the worker this thread runs (0 on any other thread).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Serves every listener started from now on on the runtimes `hs`: runtimes of their own,
/// apart from the agent's control loop, so that a flow sweep or a reload never stalls a
/// request. Each is a current-thread runtime on a thread of its own (`workers`, README
/// "Every field"): a connection lives on the worker that accepted it, with no work stealing
/// and no cross-thread wake-ups (a one-worker multi-thread runtime served about 20% fewer
/// requests per CPU, measured with `cargo xtask bench l7`).
pub fn set_runtimes(hs: Vec<Handle>) {
    let _ = SERVING.set(hs);
}

/// Tells this thread that it runs worker `i` of the runtimes given to [`set_runtimes`].
pub fn enter_worker(i: usize) {
    WORKER.set(i);
}

/// The serving runtimes; empty until [`set_runtimes`] (unit tests).
pub(crate) fn runtimes() -> &'static [Handle] {
    SERVING.get().map_or(&[], |hs| &hs[..])
}

/// How many workers serve: at least one (the current runtime, in unit tests).
pub(crate) fn count() -> usize {
    runtimes().len().max(1)
}

/// The worker the current thread runs (0 outside the workers).
pub(crate) fn current() -> usize {
    WORKER.get()
}
