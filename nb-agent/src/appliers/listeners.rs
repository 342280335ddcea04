//! The listening sockets of the http/https proxy and of the user-space tcp proxy as one
//! applier: a reload may move an address from one to the other (an http port turned into a
//! tcp port with a PROXY header, in one reload), and the socket then goes across without
//! being closed, so neither can be prepared or committed without the other.

use std::collections::HashSet;

use super::{Applier, StepError};
use crate::{
    plan::Plan,
    proxy::{Prepared, Proxy, tcp::TcpPrepared, tcp::TcpProxy},
};

/// The listeners' part of a plan (nothing to do when the config stays).
pub struct Listeners<'a> {
    pub http: &'a mut Proxy,
    pub tcp: &'a mut TcpProxy,
    /// Whether XDP serves the tcp ports (then only PROXY-header ports listen in user space).
    pub xdp: bool,
    staged: Option<(Prepared, TcpPrepared)>,
}

impl<'a> Listeners<'a> {
    pub fn new(http: &'a mut Proxy, tcp: &'a mut TcpProxy, xdp: bool) -> Listeners<'a> {
        Listeners {
            http,
            tcp,
            xdp,
            staged: None,
        }
    }
}

impl Applier for Listeners<'_> {
    fn part(&self) -> &'static str {
        "the listeners"
    }

    /// Reads certificates and the stickiness secret and binds the new addresses (taking a
    /// socket over from the other proxy when the address moves); nothing live changes.
    fn prepare(&mut self, plan: &Plan) -> Result<(), StepError> {
        if !plan.changes_config() {
            return Ok(());
        }
        let to = &plan.to;
        let http = self
            .http
            .prepare(to.config, to.public, &|a| self.tcp.listening(a))?;
        let tcp = self
            .tcp
            .prepare(to.config, to.public, self.xdp, &|a| self.http.listening(a))?;
        self.staged = Some((http, tcp));
        Ok(())
    }

    /// Swaps the new listeners in and closes the removed ones; a socket one proxy takes over
    /// from the other stays open when the other lets go.
    fn commit(&mut self, _: &Plan) {
        let Some((http, tcp)) = self.staged.take() else {
            return;
        };
        let (to_http, to_tcp): (HashSet<_>, HashSet<_>) =
            (http.new_addresses(), tcp.new_addresses());
        self.http.commit(http, &to_tcp);
        self.tcp.commit(tcp, &to_http);
    }

    /// Drops what was prepared: new sockets close; a socket taken over is a second
    /// descriptor, so the proxy that has it keeps listening.
    fn abort(&mut self, _: &Plan) {
        self.staged = None;
    }
}
